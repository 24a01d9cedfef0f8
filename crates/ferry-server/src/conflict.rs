//! The conflict seam, re-exported from `ferry-conflict`: a
//! [`ConflictStrategy`] decides, inside the write transaction, what an
//! incoming op does to the stored row and which side rows (conflict
//! records, activity) are written with it. Column-level [`LastWriteWins`]
//! is the default; other strategies plug in per table through
//! `SyncServiceBuilder::strategy` or the `[[strategies]]` of the sync
//! rules.

pub use ferry_conflict::{
    conflict_id, Audited, ConflictInput, ConflictStrategy, Crdt, CurrentRow, Decision, DomainRules, LastWriteWins,
    Manual, OutcomeKind, PerColumn, Resolution, RowLastWriteWins, Rule, SideWrite, StrategyConfig, TableStrategy,
    ACTIVITY_TABLE, CONFLICTS_TABLE,
};
