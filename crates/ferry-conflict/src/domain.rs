//! Domain rules: declarative [`Rule`]s and closures, in front of an inner
//! strategy.

use std::fmt;
use std::sync::Arc;

use ferry_core::{RowData, Value};
use serde::{Deserialize, Serialize};

use crate::lww::LastWriteWins;
use crate::strategy::{ConflictInput, ConflictStrategy, Decision, Resolution};

/// A declarative rule about one column, loadable from TOML or JSON
/// (`kind = "deny_transition"`, ...). Rules only look at PUTs and PATCHes
/// of a live row that change the column's stored value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Rule {
    /// Keep the stored value of `column` when it matches `from_server`
    /// and the op sets a value matching `to`, unless the client's base
    /// value matches `unless_base` (the client saw the stored value and
    /// changed it knowingly). An empty list matches any value. When
    /// `unless_base` is non-empty and the client sent no base for the
    /// column, the rule does not fire (staleness cannot be told).
    DenyTransition {
        /// The column.
        column: String,
        /// Stored values the rule protects (empty: any).
        #[serde(default)]
        from_server: Vec<Value>,
        /// New values it refuses (empty: any).
        #[serde(default)]
        to: Vec<Value>,
        /// Base values that exempt the op (empty: none does).
        #[serde(default)]
        unless_base: Vec<Value>,
        /// The outcome's reason (default: one naming the values).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Once the column holds a non-NULL value, ops do not change it.
    Immutable {
        /// The column.
        column: String,
    },
}

impl Rule {
    /// A [`Rule::DenyTransition`] of `column` with every list empty (it
    /// denies any change); narrow it with the builder methods.
    pub fn deny_transition(column: impl Into<String>) -> Self {
        Rule::DenyTransition {
            column: column.into(),
            from_server: Vec::new(),
            to: Vec::new(),
            unless_base: Vec::new(),
            reason: None,
        }
    }

    /// Set `from_server` of a deny transition.
    pub fn from_server<V: Into<Value>>(mut self, values: impl IntoIterator<Item = V>) -> Self {
        if let Rule::DenyTransition { from_server, .. } = &mut self {
            *from_server = values.into_iter().map(Into::into).collect();
        }
        self
    }

    /// Set `to` of a deny transition.
    pub fn to<V: Into<Value>>(mut self, values: impl IntoIterator<Item = V>) -> Self {
        if let Rule::DenyTransition { to, .. } = &mut self {
            *to = values.into_iter().map(Into::into).collect();
        }
        self
    }

    /// Set `unless_base` of a deny transition.
    pub fn unless_base<V: Into<Value>>(mut self, values: impl IntoIterator<Item = V>) -> Self {
        if let Rule::DenyTransition { unless_base, .. } = &mut self {
            *unless_base = values.into_iter().map(Into::into).collect();
        }
        self
    }

    /// The example rule of the ticket demo: a ticket whose status is
    /// `done` on the server is not reopened by a change made from a stale
    /// base (the client had not seen `done`).
    pub fn done_is_not_reopened() -> Self {
        Rule::deny_transition("status")
            .from_server(["done"])
            .unless_base(["done"])
    }

    /// The column the rule is about.
    pub fn column(&self) -> &str {
        match self {
            Rule::DenyTransition { column, .. } | Rule::Immutable { column } => column,
        }
    }

    /// Why the rule keeps the stored value, or `None` when it does not
    /// fire for this op.
    pub fn check(&self, input: &ConflictInput<'_>) -> Option<String> {
        let column = self.column();
        let new = input.op_data()?.get(column)?;
        let stored = input.server_value(column)?;
        if new == stored {
            return None;
        }
        let table = &input.table.name;
        match self {
            Rule::DenyTransition {
                from_server,
                to,
                unless_base,
                reason,
                ..
            } => {
                let matches = |set: &[Value], v: &Value| set.is_empty() || set.contains(v);
                if !matches(from_server, stored) || !matches(to, new) {
                    return None;
                }
                let base = input.base_of(column);
                if !unless_base.is_empty() {
                    let base = base?;
                    if unless_base.contains(base) {
                        return None;
                    }
                }
                Some(reason.clone().unwrap_or_else(|| {
                    let base = base.map_or_else(|| "unknown".to_owned(), ToString::to_string);
                    format!("{table}.{column} stays {stored}: the change to {new} was made from base {base}")
                }))
            }
            Rule::Immutable { .. } => (!stored.is_null())
                .then(|| format!("{table}.{column} is immutable once set; it stays {stored}, not {new}")),
        }
    }
}

/// A closure rule: `Some(decision)` decides the op, `None` passes it on.
pub type RuleFn = dyn Fn(&ConflictInput<'_>) -> Option<Decision> + Send + Sync;

/// Domain rules in front of an inner strategy.
///
/// Rule: closures run first, in order; the first to return a decision
/// decides the whole op. Then every declarative [`Rule`] is checked: the
/// columns of fired rules keep their stored values (they are `lost`, the
/// outcome is `merged` with the rules' reasons) and the op's other columns
/// go to the inner strategy (default [`LastWriteWins`]). When no rule
/// fires, the inner strategy decides the op unchanged.
#[derive(Clone)]
pub struct DomainRules {
    closures: Vec<Arc<RuleFn>>,
    rules: Vec<Rule>,
    inner: Arc<dyn ConflictStrategy>,
}

impl fmt::Debug for DomainRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DomainRules")
            .field("closures", &self.closures.len())
            .field("rules", &self.rules)
            .field("inner", &self.inner)
            .finish()
    }
}

impl Default for DomainRules {
    fn default() -> Self {
        DomainRules::new()
    }
}

impl DomainRules {
    /// No rules, falling back to [`LastWriteWins`].
    pub fn new() -> Self {
        DomainRules {
            closures: Vec::new(),
            rules: Vec::new(),
            inner: Arc::new(LastWriteWins),
        }
    }

    /// The ticket demo's rules: [`Rule::done_is_not_reopened`].
    pub fn ticket_status() -> Self {
        DomainRules::new().declare(Rule::done_is_not_reopened())
    }

    /// Add a closure rule.
    pub fn rule(mut self, f: impl Fn(&ConflictInput<'_>) -> Option<Decision> + Send + Sync + 'static) -> Self {
        self.closures.push(Arc::new(f));
        self
    }

    /// Add a declarative rule.
    pub fn declare(mut self, rule: Rule) -> Self {
        self.rules.push(rule);
        self
    }

    /// Add declarative rules.
    pub fn declare_all(mut self, rules: impl IntoIterator<Item = Rule>) -> Self {
        self.rules.extend(rules);
        self
    }

    /// The strategy for ops (and columns) no rule decides.
    pub fn fallback(mut self, inner: impl ConflictStrategy + 'static) -> Self {
        self.inner = Arc::new(inner);
        self
    }

    /// Like [`DomainRules::fallback`] with a shared strategy.
    pub fn fallback_arc(mut self, inner: Arc<dyn ConflictStrategy>) -> Self {
        self.inner = inner;
        self
    }
}

impl ConflictStrategy for DomainRules {
    fn resolve(&self, input: &ConflictInput<'_>) -> Decision {
        for f in &self.closures {
            if let Some(d) = f(input) {
                return d;
            }
        }
        let fired: Vec<(&str, String)> = self
            .rules
            .iter()
            .filter_map(|r| r.check(input).map(|why| (r.column(), why)))
            .collect();
        if fired.is_empty() {
            return self.inner.resolve(input);
        }
        let (Some(data), Some(live)) = (input.op_data(), input.live()) else {
            // Rules only fire on a live row with op data.
            return self.inner.resolve(input);
        };
        let reason = fired.iter().map(|(_, w)| w.as_str()).collect::<Vec<_>>().join("; ");
        let rest: RowData = data
            .iter()
            .filter(|(c, _)| !fired.iter().any(|(f, _)| f == c))
            .map(|(c, v)| (c.clone(), v.clone()))
            .collect();
        let denied = fired.iter().map(|(c, _)| (*c).to_owned());
        if rest.is_empty() {
            return Decision::from(Resolution::Keep {
                row: Some(live.clone()),
                reason: reason.clone(),
            })
            .with_reason(reason);
        }
        let op = input.patch_of(rest);
        let mut d = self.inner.resolve(&input.with_op(&op));
        let inner_reason = d.outcome_reason();
        d.resolution = match d.resolution {
            Resolution::Write { row, clocks, mut lost } => {
                lost.extend(denied);
                Resolution::Write { row, clocks, lost }
            }
            other => other,
        };
        if !matches!(d.resolution, Resolution::Reject { .. }) {
            d.reason = Some(match inner_reason {
                Some(r) => format!("{reason}; {r}"),
                None => reason,
            });
        }
        d
    }
}
