//! Ferry's data model and the traits everything else is written against.
//!
//! Invariant: this crate does no I/O and never reads the system clock on
//! its own; time comes through [`Clock`] ([`SystemClock`] is the single
//! adaptor to real time, used only where an app passes it in) and
//! randomness through [`RandomSource`].

pub mod clock;
pub mod codec;
pub mod error;
pub mod inside;
pub mod json;
pub mod limits;
pub mod op;
pub mod random;
pub mod schema;
pub mod staged;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod value;

pub use clock::{Clock, HlcTimestamp, HybridClock, ManualClock, SystemClock};
pub use error::{error_chain, CoreError, ErrorKind, MAX_ERROR_CAUSES};
pub use limits::Limits;
pub use op::{CrudEntry, CrudOp};
pub use random::{RandomSource, SeededRandom};
pub use schema::{Column, ColumnType, Index, Schema, Table};
pub use staged::StagedSummary;
pub use value::{row_data, row_size_bytes, Row, RowData, Value};
