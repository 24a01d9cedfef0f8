//! Ferry's sync protocol, sans-IO: the wire messages, op checksums, bucket
//! compaction, the line codec and the client's download state machine.
//! Transports only move the bytes this crate produces and parses.
//!
//! Invariants: no I/O, no clock, no threads; decoding bad input is an
//! error, never a panic; compaction never changes what a client converges
//! to; a checkpoint is handed out for applying only after every bucket
//! checksum validated.

pub mod checksum;
pub mod compact;
pub mod data_line;
pub mod download;
pub mod error;
pub mod lines;
pub mod messages;

pub use checksum::{op_checksum, op_checksum_encoded};
pub use compact::compact;
pub use data_line::DataLineWriter;
pub use download::{
    AppliedBucket, BucketApply, BucketProgress, CheckpointApply, Download, DownloadLimits, DownloadProgress,
    StagedRange, Step,
};
pub use error::ProtocolError;
pub use ferry_core::StagedSummary;
pub use lines::{decode_line, encode_line, encode_stream_line, LineSplitter, DEFAULT_MAX_LINE_BYTES};
pub use messages::*;
