//! The source of truth, behind [`SourceDb`]: the seam lives in
//! `ferry-source` (the trait, its types and errors, and the conformance
//! suite); this module re-exports it and adds the service's way to run a
//! write transaction with its own errors.

pub use ferry_source::{
    BucketState, CaptureKind, CapturedChange, ChangesSince, CheckpointState, ClientProgress, CommitReceiver, Lease,
    NewOp, OpRange, RowClocks, RowWrite, SourceDb, SourceError, SourceTx, StoredOutcome, StoredRow, VanishedRows,
};

use crate::error::{Result, ServiceError};

/// Run `work` in one write transaction of `db` (see [`SourceDb::write`]):
/// the service's errors go through the database as the work's own and
/// come back unchanged; the database's become [`ServiceError`]s.
pub fn write(db: &dyn SourceDb, mut work: impl FnMut(&mut dyn SourceTx) -> Result<()>) -> Result<()> {
    db.write(&mut |tx| work(tx).map_err(SourceError::aborted))
        .map_err(ServiceError::from)
}
