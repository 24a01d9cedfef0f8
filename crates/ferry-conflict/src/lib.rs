//! Ferry's conflict strategies, decided on the server inside the write
//! transaction with the stored row and the incoming op in hand.
//!
//! The seam is [`ConflictStrategy::resolve`]: a [`ConflictInput`] (table,
//! row id, validated op, its clock, the client's base values, client and
//! user ids, seq, server time, the stored [`CurrentRow`]) gives a
//! [`Decision`]: a [`Resolution`] for the row (write, delete, keep,
//! reject), an optional reason (outcome `merged`), an optional conflict id
//! (outcome `needs_review`) and [`SideWrite`]s the server applies in the
//! same transaction (conflict records, activity rows).
//!
//! Strategies, each with its exact rule on its type:
//! - [`LastWriteWins`] (column level, the default) and [`RowLastWriteWins`];
//! - [`PerColumn`]: a default plus strategies for named columns (per
//!   table composition is the server's `SyncServiceBuilder::strategy`);
//! - [`DomainRules`]: declarative [`Rule`]s and closures before an inner
//!   strategy ([`Rule::done_is_not_reopened`] is the ticket demo's rule);
//! - [`Manual`]: conflicting columns become `ferry_conflicts` records and
//!   the outcome `needs_review`;
//! - [`Crdt`]: columns holding automerge documents, merged
//!   ([`crdt`] has the client helpers);
//! - [`Audited`]: a wrapper writing an `activity` row per op.
//!
//! Deletes. A soft delete (`deleted_at`) is an ordinary column update and
//! follows the column's strategy. A hard DELETE is a write of "nothing"
//! to every column at its clock, under every strategy ([`lww::lww_delete`],
//! `docs/adr/0004-delete-against-write.md`): on a live row it clears every
//! column older than it (NULL, with the delete's clock); the row becomes a
//! tombstone iff no column is newer, else it stays with its newer columns
//! (outcome `merged`, naming them). A PUT or PATCH newer than a tombstone
//! brings the row back with the columns it writes and the others NULL; one
//! older than the delete does nothing (outcome `merged`). So a delete and
//! a write give the same row in either arrival order. Manual resolution
//! does not hold deletes for review; domain rules see deletes only through
//! closures.
//!
//! Invariants:
//! - no I/O, no clock, no randomness: a decision is a function of its
//!   input (time arrives as `hlc` and `now_ms`);
//! - clocks are compared strictly, so on a tie the stored value wins
//!   ("server wins"); a clock beyond the accepted skew is clamped by the
//!   server before any strategy sees it;
//! - a column's clock never goes backwards: strategies that apply a value
//!   regardless of clocks (manual, CRDT) store the later of the two;
//! - disjoint changes never conflict: writes to other rows under every
//!   strategy, writes to other columns of one row under every column-level
//!   strategy (all but [`RowLastWriteWins`], which orders whole rows by
//!   design);
//! - side write ids are deterministic (`{client_id}:{seq}:{column}` for
//!   conflicts, `{client_id}:{seq}:{hlc}` for activity), so a replayed op
//!   cannot duplicate them.

pub mod audit;
pub mod config;
pub mod crdt;
pub mod domain;
pub mod error;
pub mod lww;
pub mod manual;
pub mod per_column;
pub mod side_id;
pub mod strategy;

pub use audit::{Audited, ACTIVITY_TABLE};
pub use config::{StrategyConfig, TableStrategy};
pub use crdt::Crdt;
pub use domain::{DomainRules, Rule, RuleFn};
pub use error::{ConflictError, Result};
pub use lww::{LastWriteWins, RowLastWriteWins};
pub use manual::{conflict_id, Manual, CONFLICTS_TABLE};
pub use per_column::PerColumn;
pub use strategy::{
    json_text, ConflictInput, ConflictStrategy, CurrentRow, Decision, OutcomeKind, Resolution, SideWrite,
};
