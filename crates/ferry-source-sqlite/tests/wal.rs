//! WAL checkpoints off the writer's commit path: the writer's bound on the
//! WAL (checked at the limit), the background checkpointer in normal
//! operation, and a clean close.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_source::SourceDb;
use ferry_source_sqlite::{SqliteSourceDb, WalLimits};

/// A WAL frame's header, and the WAL header (which names the page size).
const FRAME_HEADER_BYTES: u64 = 24;
const WAL_HEADER_BYTES: u64 = 32;
/// Write transactions each test makes.
const WRITES: usize = 300;
/// Most pages one test write transaction adds to the WAL (a 6 KiB meta
/// value: up to two overflow pages, the leaf, and when the leaf splits, its
/// new sibling, the tree above it and the database header), with room.
const MAX_PAGES_PER_WRITE: u64 = 16;

fn wal_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push("-wal");
    PathBuf::from(p)
}

/// Frames the WAL file has room for (it is reused from its start, never
/// shrunk, so this is the most it ever held).
fn wal_frames(db: &Path) -> u64 {
    let wal = std::fs::read(wal_path(db)).unwrap_or_default();
    // The page size: the WAL header's third big-endian u32.
    let page_bytes = wal
        .get(8..12)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(4_096, |b| u64::from(u32::from_be_bytes(b)));
    (wal.len() as u64).saturating_sub(WAL_HEADER_BYTES) / (page_bytes + FRAME_HEADER_BYTES)
}

fn write_values(db: &SqliteSourceDb, n: usize) {
    let value = "v".repeat(6 * 1024);
    for i in 0..n {
        db.write(&mut |tx| tx.set_meta(&format!("key {i}"), &value))
            .expect("write");
    }
}

/// Writes alone, background checkpointer off: the writer keeps the WAL
/// within the limit plus one transaction.
fn max_frames_with(max_wal_pages: u64) -> u64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("source.db");
    let db = SqliteSourceDb::open_with_wal_limits(
        &path,
        WalLimits {
            background_checkpoint_pages: u64::MAX,
            max_wal_pages,
        },
    )
    .expect("open");
    write_values(&db, WRITES);
    wal_frames(&path)
}

#[test]
fn the_writer_bounds_the_wal_at_its_limit() {
    let max_wal_pages = 64;
    let frames = max_frames_with(max_wal_pages);
    assert!(
        frames <= max_wal_pages + MAX_PAGES_PER_WRITE,
        "the wal grew to {frames} frames, over {max_wal_pages} pages plus one write"
    );
    // Without the bound nothing checkpoints: the WAL holds every write.
    let unbounded = max_frames_with(u64::MAX);
    assert!(
        unbounded > WRITES as u64,
        "{unbounded} frames: the writes did not fill the wal"
    );
}

#[test]
fn the_background_checkpointer_checkpoints_in_normal_operation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("source.db");
    let db = SqliteSourceDb::open_with_wal_limits(
        &path,
        WalLimits {
            background_checkpoint_pages: 16,
            max_wal_pages: u64::MAX,
        },
    )
    .expect("open");
    let before = std::fs::metadata(&path).expect("db file").len();
    write_values(&db, 100);
    // The checkpointer runs beside the writes: wait for it to copy the
    // rows into the database file.
    let deadline = Instant::now() + Duration::from_secs(30);
    let grown = || std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) > before + 100 * 6 * 1024;
    while !(db.background_checkpoints() > 0 && grown()) {
        assert!(Instant::now() < deadline, "no background checkpoint copied the writes");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn closing_checkpoints_everything_and_removes_the_wal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("source.db");
    {
        let db = SqliteSourceDb::open(&path).expect("open");
        write_values(&db, 50);
        assert_eq!(db.meta("key 49").expect("read").map(|v| v.len()), Some(6 * 1024));
    }
    assert!(!wal_path(&path).exists(), "the wal outlived the database");
    let db = SqliteSourceDb::open(&path).expect("reopen");
    assert_eq!(db.meta("key 49").expect("read").map(|v| v.len()), Some(6 * 1024));
}
