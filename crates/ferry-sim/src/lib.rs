//! Deterministic simulation of a whole Ferry fleet.
//!
//! One seed drives everything: the real sync service on a SQLite source,
//! four devices running the real `ferry_client::Database` on real stores
//! (one in memory, three SQLite files), fault-injecting transports (lost,
//! duplicated, delayed and reordered lines, broken streams, failed, lost
//! and repeated uploads), partitions of single devices and of the server,
//! device crashes (the store reopened, everything in memory gone), server
//! crashes (the source file survives), and device clocks seconds slow,
//! seconds fast and ten minutes ahead. The workload writes tickets (puts,
//! patches, deletes and writes the server rejects) and reassigns tickets
//! between users (an assignment is in the shared bucket and in its user's
//! own, so a reassignment leaves one user's bucket) under one conflict
//! strategy per seed.
//!
//! It all runs on one thread: a current-thread tokio runtime with paused
//! time (time moves only when every task waits, straight to the next
//! timer), blocking storage work inline on that thread
//! ([`ferry_transport::blocking`]) and every `select!` biased. So a seed
//! gives the same run, byte for byte: [`SimReport::trace_hash`] proves it.
//!
//! [`check`] reads what happened and reports broken promises with the
//! seed and the part of the history that shows them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use ferry_conflict::{Audited, Crdt, DomainRules, LastWriteWins, Manual, PerColumn, RowLastWriteWins};
use ferry_core::{RandomSource, SeededRandom};
use ferry_server::ConflictStrategy;
use ferry_store::MemoryStore;
use thiserror::Error;

pub mod check;
pub mod clock;
pub mod fleet;
pub mod server;

use check::Violation;
use clock::SimClock;
use fleet::{client_schema, Device, StoreKind, TICKETS};
use server::SimServer;

/// A simulation could not be set up or run (not a broken promise: those
/// are [`Violation`]s).
#[derive(Debug, Error)]
pub enum SimError {
    /// Building the server, a store or the runtime failed.
    #[error("simulation setup failed: {0}")]
    Setup(String),
}

/// What a run does.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Workload and fault steps before quiescence.
    pub steps: usize,
    /// Most simulated time allowed to reach quiescence, ms.
    pub quiesce_limit_ms: u64,
    /// Switch on ferry-queue's planted "confirm one checkpoint early" bug,
    /// to show the checker catches it.
    pub planted_confirm_early: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            steps: 60,
            quiesce_limit_ms: 600_000,
            planted_confirm_early: false,
        }
    }
}

/// Faults the harness injected (the transports inject their own on top,
/// from the same seed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Devices taken offline or back.
    pub device_partitions: u64,
    /// Device process crashes.
    pub device_crashes: u64,
    /// Server crashes.
    pub server_crashes: u64,
    /// Whole-server partitions.
    pub server_partitions: u64,
}

impl FaultCounts {
    /// All of them.
    pub fn total(&self) -> u64 {
        self.device_partitions + self.device_crashes + self.server_crashes + self.server_partitions
    }
}

/// What one seed did.
#[derive(Clone, Debug)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// The conflict strategy of the tickets table.
    pub strategy: &'static str,
    /// FNV-1a 64 of the trace: equal for equal seeds.
    pub trace_hash: u64,
    /// The trace, one line per event.
    pub trace: Vec<String>,
    /// Broken promises (empty when all held).
    pub violations: Vec<Violation>,
    /// Writes queued by the devices.
    pub writes: u64,
    /// Faults injected by the harness.
    pub faults: FaultCounts,
    /// Simulated time the run took, ms.
    pub simulated_ms: u64,
}

impl SimReport {
    /// A report of the first violation: the seed, what broke, the history
    /// of that row, and how to replay it.
    pub fn explain(&self) -> Option<String> {
        let v = self.violations.first()?;
        let history: Vec<&String> = match &v.row {
            Some(row) => {
                let id = row.rsplit('/').next().unwrap_or(row);
                let needle = format!("\"{id}\"");
                self.trace
                    .iter()
                    .filter(|l| l.contains(&needle) || l.starts_with("fault") || l.starts_with("check"))
                    .collect()
            }
            None => self.trace.iter().collect(),
        };
        let mut out = format!(
            "seed {} ({}): {} violated: {}\nhistory ({} of {} events):\n",
            self.seed,
            self.strategy,
            v.check,
            v.message,
            history.len(),
            self.trace.len()
        );
        for l in history {
            out.push_str("  ");
            out.push_str(l);
            out.push('\n');
        }
        out.push_str(&format!("replay: cargo xtask sim --seed {}\n", self.seed));
        Some(out)
    }
}

fn fnv1a(lines: &[String]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for l in lines {
        for b in l.bytes().chain(std::iter::once(b'\n')) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The strategy of the tickets table for a seed.
fn strategy(seed: u64) -> (&'static str, Arc<dyn ConflictStrategy>) {
    // Every strategy but plain LWW keeps the CRDT document column merged.
    let crdt = |inner: Arc<dyn ConflictStrategy>| -> Arc<dyn ConflictStrategy> {
        Arc::new(Crdt::with_fallback([fleet::DOC_COLUMN], inner))
    };
    match seed % 6 {
        0 => ("lww", Arc::new(LastWriteWins)),
        1 => ("row_lww", crdt(Arc::new(RowLastWriteWins))),
        2 => ("domain", crdt(Arc::new(DomainRules::ticket_status()))),
        3 => (
            "manual",
            crdt(Arc::new(PerColumn::new(LastWriteWins).column("status", Manual))),
        ),
        4 => ("audited", crdt(Arc::new(Audited::new(LastWriteWins)))),
        _ => ("crdt", crdt(Arc::new(LastWriteWins))),
    }
}

/// Devices per user: devices `2u` and `2u + 1` are user `u`'s.
const DEVICES_PER_USER: usize = 2;

/// Device clock skews, ms: on time, seconds slow, ten minutes ahead
/// (clamped by the server), seconds fast.
const CLOCK_OFFSETS_MS: [i64; 4] = [0, -3_000, 600_000, 2_000];

/// Run one seed to quiescence and check it.
pub fn run_seed(seed: u64, options: &SimOptions) -> Result<SimReport, SimError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .map_err(|e| SimError::Setup(e.to_string()))?;
    ferry_transport::blocking::set_inline_on_this_thread(true);
    ferry_queue::planted::set_confirm_early(options.planted_confirm_early);
    let result = runtime.block_on(run(seed, options));
    ferry_queue::planted::set_confirm_early(false);
    ferry_transport::blocking::set_inline_on_this_thread(false);
    result
}

async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

async fn run(seed: u64, options: &SimOptions) -> Result<SimReport, SimError> {
    let dir = tempfile::tempdir().map_err(|e| SimError::Setup(e.to_string()))?;
    let start = tokio::time::Instant::now();
    let mut rng = SeededRandom::new(seed);
    let (strategy_name, tickets_strategy) = strategy(seed);
    let rules = server::rules()?;
    let server = Arc::new(SimServer::start(
        dir.path().join("server"),
        rules,
        Some(("tickets".into(), tickets_strategy)),
        SimClock::new(start, 0),
    )?);
    let schema = client_schema(&server)?;
    let columns: Vec<String> = schema
        .table("tickets")
        .map_err(|e| SimError::Setup(e.to_string()))?
        .columns
        .iter()
        .map(|c| c.name.clone())
        .collect();
    let mut devices = Vec::new();
    for (i, offset_ms) in CLOCK_OFFSETS_MS.into_iter().enumerate() {
        let store = if i == 0 {
            StoreKind::Memory(Arc::new(MemoryStore::new(schema.clone())))
        } else {
            StoreKind::Sqlite(dir.path().join(format!("device{i}.db")))
        };
        let device_seed = seed.wrapping_mul(31).wrapping_add(i as u64 + 1);
        devices.push(Device::new(
            i,
            fleet::user_name(i / DEVICES_PER_USER),
            store,
            SimClock::new(start, offset_ms),
            &server,
            device_seed,
        )?);
    }
    let mut trace = vec![format!("start seed={seed} strategy={strategy_name}")];
    let mut violations: Vec<Violation> = Vec::new();
    let mut faults = FaultCounts::default();
    let mut writes = 0u64;
    let tickets: Vec<String> = (0..TICKETS).map(|t| format!("t{t}")).collect();
    let device_seed = |i: usize| seed.wrapping_mul(31).wrapping_add(i as u64 + 1);

    for step in 0..options.steps {
        let roll = rng.next_u64() % 100;
        let d = (rng.next_u64() % devices.len() as u64) as usize;
        let now = start.elapsed().as_millis();
        match roll {
            0..=44 => {
                let ticket = (rng.next_u64() % TICKETS as u64) as usize;
                let kind = match rng.next_u64() % 43 {
                    0..=13 => 0,  // put
                    14..=25 => 1, // patch
                    26..=30 => 2, // delete
                    31..=33 => 3, // a write the server rejects
                    34..=37 => 4, // a CRDT edit
                    38 => 5,      // a transaction refused whole
                    39..=41 => 6, // an assignment (re)given to a user
                    _ => {
                        if devices[d].resolve_conflict(&mut rng)? {
                            writes += 1;
                            trace.push(format!("{now} resolve device {d}"));
                        }
                        continue_step(&mut devices, &server, &columns, &mut violations, &mut trace);
                        continue;
                    }
                };
                if devices[d].write(ticket, kind, &mut rng)? {
                    writes += 1;
                    if let Some(w) = devices[d].writes.values().next_back() {
                        trace.push(format!("{now} write device {d} seq {} {:?}", w.seq, w.op));
                    }
                }
            }
            45..=54 => {
                let off = !devices[d].net.is_offline();
                devices[d].net.set_offline(off);
                faults.device_partitions += 1;
                trace.push(format!("{now} fault device {d} offline={off}"));
            }
            55..=59 => {
                sample_all(&mut devices, &server, &columns, &mut violations, &mut trace);
                devices[d].crash();
                faults.device_crashes += 1;
                let down_ms = rng.next_u64() % 1_000;
                trace.push(format!("{now} fault device {d} crashes for {down_ms} ms"));
                sleep_ms(down_ms).await;
                devices[d].start(&server, device_seed(d))?;
            }
            60..=63 => {
                server.crash();
                faults.server_crashes += 1;
                let down_ms = rng.next_u64() % 3_000;
                trace.push(format!("{now} fault server crashes for {down_ms} ms"));
                sleep_ms(down_ms).await;
                server.restart()?;
            }
            64..=66 => {
                let was: Vec<bool> = devices.iter().map(|d| d.net.is_offline()).collect();
                for dev in &devices {
                    dev.net.set_offline(true);
                }
                faults.server_partitions += 1;
                let ms = rng.next_u64() % 3_000;
                trace.push(format!("{now} fault server partitioned for {ms} ms"));
                sleep_ms(ms).await;
                for (dev, off) in devices.iter().zip(was) {
                    dev.net.set_offline(off);
                }
            }
            _ => {
                let ms = rng.next_u64() % 500;
                sleep_ms(ms).await;
            }
        }
        let _ = step;
        sample_all(&mut devices, &server, &columns, &mut violations, &mut trace);
    }

    // Quiescence: the network heals (the transports stay hostile), the
    // server is up, and every device catches up.
    for dev in &devices {
        dev.net.set_offline(false);
    }
    let deadline_ms = start.elapsed().as_millis() as u64 + options.quiesce_limit_ms;
    loop {
        sleep_ms(200).await;
        sample_all(&mut devices, &server, &columns, &mut violations, &mut trace);
        if settled(&devices, &server) {
            break;
        }
        if start.elapsed().as_millis() as u64 > deadline_ms {
            violations.push(Violation {
                check: "liveness",
                message: format!(
                    "the fleet did not settle within {} ms of simulated time",
                    options.quiesce_limit_ms
                ),
                row: None,
            });
            break;
        }
    }
    trace.push(format!("{} quiescent", start.elapsed().as_millis()));
    // Manual resolution decides `status` by values (a write whose base
    // matches applies whatever its clock): the clock check leaves it out.
    let value_based: &[&str] = if strategy_name == "manual" { &["status"] } else { &[] };
    let mut found = check::at_quiescence(&mut devices, &server, &tickets, value_based);
    if strategy_name != "lww" {
        found.extend(check::doc_edits_kept(&devices, &server));
    }
    for v in &found {
        trace.push(format!("check {}: {}", v.check, v.message));
    }
    violations.extend(found);
    // The final state, into the trace.
    if let Some(svc) = server.service() {
        if let Ok(table) = server.rules().schema().table("tickets") {
            for id in &tickets {
                let row = svc.db().get_row(table, id).ok().flatten();
                trace.push(format!("final server \"{id}\" {:?}", row.and_then(|r| r.data)));
            }
        }
    }
    for dev in &mut devices {
        if let Some(db) = dev.db.take() {
            db.disconnect().await;
        }
    }
    server.crash();
    let simulated_ms = start.elapsed().as_millis() as u64;
    Ok(SimReport {
        seed,
        strategy: strategy_name,
        trace_hash: fnv1a(&trace),
        trace,
        violations,
        writes,
        faults,
        simulated_ms,
    })
}

fn continue_step(
    devices: &mut [Device],
    server: &SimServer,
    columns: &[String],
    violations: &mut Vec<Violation>,
    trace: &mut Vec<String>,
) {
    sample_all(devices, server, columns, violations, trace);
}

fn sample_all(
    devices: &mut [Device],
    server: &SimServer,
    columns: &[String],
    violations: &mut Vec<Violation>,
    trace: &mut Vec<String>,
) {
    let mut seen: BTreeSet<(&'static str, String)> = violations.iter().map(|v| (v.check, v.message.clone())).collect();
    let mut state = String::from("state");
    for dev in devices.iter() {
        match &dev.db {
            Some(db) => {
                let s = db.status();
                state.push_str(&format!(
                    " | d{} cp={:?} queue={} pending={} connected={}",
                    dev.index,
                    s.last_applied_op_id,
                    db.local().upload_queue_len(),
                    db.local().pending_len().unwrap_or(0),
                    s.connected
                ));
            }
            None => state.push_str(&format!(" | d{} down", dev.index)),
        }
    }
    state.push_str(&format!(" | server answered {}", server.log.lock().answered));
    trace.push(state);
    for dev in devices.iter_mut() {
        for v in check::sample(dev, server, columns) {
            if seen.insert((v.check, v.message.clone())) {
                trace.push(format!("check {}: {}", v.check, v.message));
                violations.push(v);
            }
        }
    }
}

fn settled(devices: &[Device], server: &SimServer) -> bool {
    let Some(svc) = server.service() else { return false };
    let Ok(cp) = svc.db().checkpoint("", &[]) else {
        return false;
    };
    devices.iter().all(|d| {
        let Some(db) = &d.db else { return false };
        let status = db.status();
        db.local().upload_queue_len() == 0
            && db.local().pending_len().unwrap_or(1) == 0
            && status.connected
            && status.last_applied_op_id.is_some_and(|a| a >= cp.last_op_id)
    })
}

/// Run seeds `first..first + count`; returns the reports with violations
/// and totals.
pub fn run_seeds(first: u64, count: u64, options: &SimOptions) -> Result<Totals, SimError> {
    let mut totals = Totals::default();
    for seed in first..first.saturating_add(count) {
        let report = run_seed(seed, options).map_err(|e| SimError::Setup(format!("seed {seed}: {e}")))?;
        totals.seeds += 1;
        totals.writes += report.writes;
        totals.faults += report.faults.total();
        totals.simulated_ms += report.simulated_ms;
        if !report.violations.is_empty() {
            totals.failed.push(report);
        }
    }
    Ok(totals)
}

/// Totals over many seeds.
#[derive(Debug, Default)]
pub struct Totals {
    /// Seeds run.
    pub seeds: u64,
    /// Writes queued.
    pub writes: u64,
    /// Harness faults injected.
    pub faults: u64,
    /// Simulated time, ms.
    pub simulated_ms: u64,
    /// Reports of seeds with violations.
    pub failed: Vec<SimReport>,
}

/// Per-strategy counts of a report list, for summaries.
pub fn by_strategy(reports: &[SimReport]) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for r in reports {
        *m.entry(r.strategy).or_insert(0) += 1;
    }
    m
}
