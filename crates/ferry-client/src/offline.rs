//! Offline restrictions: a client-side [`OfflinePolicy`] that refuses
//! chosen operations while the client is offline, so changes that could
//! conflict (renaming a ticket, deleting it) wait until the client is back
//! online, while conflict-free ones (creating tickets, comments,
//! assignments) keep working.
//!
//! "Offline" means no download stream is connected:
//! [`SyncStatus::connected`](crate::SyncStatus::connected) is `false`
//! (never connected, disconnected, or between reconnect attempts). The
//! policy is checked inside [`Database::write`](crate::Database::write)
//! after the app's closure ran and before anything is committed; a refused
//! transaction writes nothing (not even its allowed ops) and fails with
//! [`QueueError::Refused`] (inside `ClientError::Queue` when the closure's
//! error type is [`ClientError`](crate::ClientError)) whose message names
//! the change, e.g. `offline: changing tickets.title is not allowed while
//! offline`. The status is read when the write starts: a connection that
//! comes up or goes down during the write applies to the next one.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use ferry_core::{CrudOp, Value};
use ferry_queue::{QueueError, WriteTx};

/// What kind of change an op makes, as the offline policy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// A row that did not exist before the transaction (including later
    /// edits of it in the same transaction).
    Insert,
    /// Columns of an existing row.
    Update,
    /// An existing row removed.
    Delete,
}

/// One change of a transaction, as the offline policy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProposedChange<'a> {
    /// Insert, update or delete.
    pub kind: ChangeKind,
    /// The table.
    pub table: &'a str,
    /// The row id.
    pub id: &'a str,
    /// The columns the change sets (for an update, only those whose value
    /// differs from the committed row; empty for a delete).
    pub columns: Vec<&'a str>,
}

type CustomRule = Arc<dyn Fn(&ProposedChange<'_>) -> Option<String> + Send + Sync>;

#[derive(Clone)]
enum Rule {
    DenyInsert(String),
    DenyDelete(String),
    /// `None`: any column.
    DenyUpdate(String, Option<BTreeSet<String>>),
    Custom(CustomRule),
}

impl fmt::Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::DenyInsert(t) => f.debug_tuple("DenyInsert").field(t).finish(),
            Rule::DenyDelete(t) => f.debug_tuple("DenyDelete").field(t).finish(),
            Rule::DenyUpdate(t, c) => f.debug_tuple("DenyUpdate").field(t).field(c).finish(),
            Rule::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// Operations refused while offline. Build it with the `deny_*` methods
/// and install it with
/// [`Database::set_offline_policy`](crate::Database::set_offline_policy).
///
/// ```
/// use ferry_client::OfflinePolicy;
/// let policy = OfflinePolicy::new()
///     .deny_delete("tickets")
///     .deny_update_of("tickets", ["title", "deleted_at"]);
/// # let _ = policy;
/// ```
#[derive(Clone, Debug, Default)]
pub struct OfflinePolicy {
    rules: Vec<Rule>,
}

impl OfflinePolicy {
    /// A policy that allows everything.
    pub fn new() -> Self {
        Self::default()
    }

    /// Refuse creating rows of `table` while offline.
    pub fn deny_insert(mut self, table: &str) -> Self {
        self.rules.push(Rule::DenyInsert(table.to_owned()));
        self
    }

    /// Refuse deleting rows of `table` while offline.
    pub fn deny_delete(mut self, table: &str) -> Self {
        self.rules.push(Rule::DenyDelete(table.to_owned()));
        self
    }

    /// Refuse changing any column of existing rows of `table` while offline.
    pub fn deny_update(mut self, table: &str) -> Self {
        self.rules.push(Rule::DenyUpdate(table.to_owned(), None));
        self
    }

    /// Refuse changing these columns of existing rows of `table` while
    /// offline (other columns stay editable). A soft delete is an update
    /// of its `deleted_at` column.
    pub fn deny_update_of<I, S>(mut self, table: &str, columns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let columns = columns.into_iter().map(Into::into).collect();
        self.rules.push(Rule::DenyUpdate(table.to_owned(), Some(columns)));
        self
    }

    /// Refuse any change for which `rule` returns a reason (the error reads
    /// `offline: <reason>`).
    pub fn deny_if<F>(mut self, rule: F) -> Self
    where
        F: Fn(&ProposedChange<'_>) -> Option<String> + Send + Sync + 'static,
    {
        self.rules.push(Rule::Custom(Arc::new(rule)));
        self
    }

    /// Why this change is refused while offline, if it is.
    pub fn refusal(&self, change: &ProposedChange<'_>) -> Option<String> {
        self.rules.iter().find_map(|rule| match rule {
            Rule::DenyInsert(t) if change.kind == ChangeKind::Insert && t == change.table => {
                Some(format!("creating rows in {t} is not allowed while offline"))
            }
            Rule::DenyDelete(t) if change.kind == ChangeKind::Delete && t == change.table => {
                Some(format!("deleting {t}/{} is not allowed while offline", change.id))
            }
            Rule::DenyUpdate(t, columns) if change.kind == ChangeKind::Update && t == change.table => {
                let hit = change
                    .columns
                    .iter()
                    .find(|c| columns.as_ref().is_none_or(|set| set.contains(**c)))?;
                Some(format!("changing {t}.{hit} is not allowed while offline"))
            }
            Rule::Custom(f) => f(change),
            _ => None,
        })
    }

    /// Check every op of a transaction; the first refused change fails it
    /// with [`QueueError::Refused`].
    pub fn check(&self, tx: &WriteTx<'_>) -> Result<(), QueueError> {
        for op in tx.ops() {
            let before = tx.get_committed(op.table(), op.id())?;
            let change = match (op, &before) {
                // A row created in this transaction cannot conflict with
                // anyone; deleting it again is no change at all.
                (CrudOp::Delete { .. }, None) => continue,
                (CrudOp::Delete { table, id }, Some(_)) => ProposedChange {
                    kind: ChangeKind::Delete,
                    table,
                    id,
                    columns: Vec::new(),
                },
                (CrudOp::Put { table, id, data } | CrudOp::Patch { table, id, data }, None) => ProposedChange {
                    kind: ChangeKind::Insert,
                    table,
                    id,
                    columns: data.keys().map(String::as_str).collect(),
                },
                (CrudOp::Patch { table, id, data }, Some(_)) => ProposedChange {
                    kind: ChangeKind::Update,
                    table,
                    id,
                    columns: data.keys().map(String::as_str).collect(),
                },
                (CrudOp::Put { table, id, data }, Some(old)) => ProposedChange {
                    kind: ChangeKind::Update,
                    table,
                    id,
                    columns: data
                        .iter()
                        .filter(|(c, v)| old.get(*c).unwrap_or(&Value::Null) != *v)
                        .map(|(c, _)| c.as_str())
                        .collect(),
                },
            };
            if change.kind == ChangeKind::Update && change.columns.is_empty() {
                continue;
            }
            if let Some(reason) = self.refusal(&change) {
                return Err(QueueError::Refused {
                    reason: format!("offline: {reason}"),
                });
            }
        }
        Ok(())
    }
}

impl crate::Database {
    /// Install (or with `None` remove) the policy of operations refused
    /// while offline (see [`OfflinePolicy`]).
    pub fn set_offline_policy(&self, policy: Option<OfflinePolicy>) {
        *self.inner.offline_policy.write() = policy.map(Arc::new);
    }

    /// The offline policy in force.
    pub fn offline_policy(&self) -> Option<OfflinePolicy> {
        self.inner.offline_policy.read().as_deref().cloned()
    }

    /// Whether the client is offline as the offline policy sees it: no
    /// download stream connected.
    pub fn is_offline(&self) -> bool {
        !self.inner.status.borrow().connected
    }

    /// The policy to enforce on a write starting now: the installed one
    /// while offline, none while online.
    pub(crate) fn offline_policy_in_force(&self) -> Option<Arc<OfflinePolicy>> {
        if self.is_offline() {
            self.inner.offline_policy.read().clone()
        } else {
            None
        }
    }
}
