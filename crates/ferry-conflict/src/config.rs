//! Strategies described as data (e.g. `[[strategies]]` in the sync rules
//! TOML) and built into [`ConflictStrategy`] objects.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::audit::Audited;
use crate::crdt::Crdt;
use crate::domain::{DomainRules, Rule};
use crate::error::{ConflictError, Result};
use crate::lww::{LastWriteWins, RowLastWriteWins};
use crate::manual::Manual;
use crate::per_column::PerColumn;
use crate::strategy::ConflictStrategy;

/// One strategy, by kind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StrategyConfig {
    /// [`LastWriteWins`] (column level).
    Lww,
    /// [`RowLastWriteWins`].
    RowLww,
    /// [`Manual`].
    Manual,
    /// [`DomainRules`] with declarative rules.
    Domain {
        /// The rules.
        #[serde(default)]
        rules: Vec<Rule>,
        /// The inner strategy (default `lww`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fallback: Option<Box<StrategyConfig>>,
    },
    /// [`Crdt`] columns.
    Crdt {
        /// The columns holding automerge documents.
        columns: Vec<String>,
        /// The strategy of the other columns (default `lww`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fallback: Option<Box<StrategyConfig>>,
    },
    /// [`PerColumn`].
    PerColumn {
        /// The default (default `lww`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        default: Option<Box<StrategyConfig>>,
        /// Strategies of named columns.
        #[serde(default)]
        columns: BTreeMap<String, StrategyConfig>,
    },
}

/// A table's strategy: `table = "tickets"`, `kind = ...` with the kind's
/// fields, and `audit = true` to wrap it in [`Audited`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TableStrategy {
    /// The table.
    pub table: String,
    /// Write an activity row for every op.
    #[serde(default)]
    pub audit: bool,
    /// The strategy.
    #[serde(flatten)]
    pub strategy: StrategyConfig,
}

impl StrategyConfig {
    /// Build the strategy (`table` names it in errors).
    pub fn build(&self, table: &str) -> Result<Arc<dyn ConflictStrategy>> {
        let sub = |c: &Option<Box<StrategyConfig>>| -> Result<Arc<dyn ConflictStrategy>> {
            match c {
                Some(c) => c.build(table),
                None => Ok(Arc::new(LastWriteWins)),
            }
        };
        Ok(match self {
            StrategyConfig::Lww => Arc::new(LastWriteWins),
            StrategyConfig::RowLww => Arc::new(RowLastWriteWins),
            StrategyConfig::Manual => Arc::new(Manual),
            StrategyConfig::Domain { rules, fallback } => Arc::new(
                DomainRules::new()
                    .declare_all(rules.iter().cloned())
                    .fallback_arc(sub(fallback)?),
            ),
            StrategyConfig::Crdt { columns, fallback } => {
                if columns.is_empty() {
                    return Err(ConflictError::Config {
                        table: table.to_owned(),
                        reason: "crdt strategy names no columns".into(),
                    });
                }
                Arc::new(Crdt::with_fallback(columns.iter().cloned(), sub(fallback)?))
            }
            StrategyConfig::PerColumn { default, columns } => {
                let mut p = PerColumn::with_default(sub(default)?);
                for (c, s) in columns {
                    p = p.column_arc(c.clone(), s.build(table)?);
                }
                Arc::new(p)
            }
        })
    }
}

impl TableStrategy {
    /// Build the table's strategy, audited when asked.
    pub fn build(&self) -> Result<Arc<dyn ConflictStrategy>> {
        let s = self.strategy.build(&self.table)?;
        Ok(if self.audit { Arc::new(Audited::new(s)) } else { s })
    }

    /// Check the columns the strategy names exist, given the table's
    /// column names.
    pub fn check_columns(&self, columns: &[&str]) -> Result<()> {
        let mut named = Vec::new();
        self.strategy.named_columns(&mut named);
        match named.iter().find(|c| !columns.contains(&c.as_str())) {
            Some(c) => Err(ConflictError::Config {
                table: self.table.clone(),
                reason: format!("unknown column {c:?}"),
            }),
            None => Ok(()),
        }
    }
}

impl StrategyConfig {
    fn named_columns(&self, out: &mut Vec<String>) {
        match self {
            StrategyConfig::Lww | StrategyConfig::RowLww | StrategyConfig::Manual => {}
            StrategyConfig::Domain { rules, fallback } => {
                out.extend(rules.iter().map(|r| r.column().to_owned()));
                if let Some(f) = fallback {
                    f.named_columns(out);
                }
            }
            StrategyConfig::Crdt { columns, fallback } => {
                out.extend(columns.iter().cloned());
                if let Some(f) = fallback {
                    f.named_columns(out);
                }
            }
            StrategyConfig::PerColumn { default, columns } => {
                if let Some(d) = default {
                    d.named_columns(out);
                }
                for (c, s) in columns {
                    out.push(c.clone());
                    s.named_columns(out);
                }
            }
        }
    }
}
