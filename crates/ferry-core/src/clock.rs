//! Time, through a trait, and a hybrid logical clock on top of it.
//!
//! Library code never reads the system clock directly: it takes a
//! [`Clock`]. [`SystemClock`] is the one adaptor that reads real time;
//! [`ManualClock`] is moved by hand in tests and simulations.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::error::CoreError;

/// A source of wall-clock time in milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now_ms(&self) -> u64 {
        (**self).now_ms()
    }
}

/// Real time.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// A clock that only moves when told to.
#[derive(Debug, Default)]
pub struct ManualClock {
    now_ms: AtomicU64,
}

impl ManualClock {
    /// A clock standing at `now_ms`.
    pub fn new(now_ms: u64) -> Self {
        ManualClock {
            now_ms: AtomicU64::new(now_ms),
        }
    }

    /// Move the clock forward (or backward, to simulate a bad clock).
    pub fn set_ms(&self, now_ms: u64) {
        self.now_ms.store(now_ms, Ordering::SeqCst);
    }

    /// Move the clock forward by `delta_ms`.
    pub fn advance_ms(&self, delta_ms: u64) {
        self.now_ms.fetch_add(delta_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}

/// A hybrid logical clock timestamp: wall time, a counter for events within
/// one millisecond, and the node that made it as the final tie-break.
///
/// Ordered by `(wall_ms, counter, node)`. Its string form
/// `<wall_ms:015>-<counter:05>-<node>` sorts the same way.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HlcTimestamp {
    /// Milliseconds since the Unix epoch.
    pub wall_ms: u64,
    /// Logical counter within `wall_ms`.
    pub counter: u32,
    /// The node (client id or server id) that issued it.
    pub node: String,
}

impl fmt::Display for HlcTimestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:015}-{:05}-{}", self.wall_ms, self.counter, self.node)
    }
}

impl FromStr for HlcTimestamp {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || CoreError::InvalidHlc(crate::error::truncate_for_message(s.to_owned()));
        let mut parts = s.splitn(3, '-');
        let wall = parts.next().ok_or_else(bad)?;
        let counter = parts.next().ok_or_else(bad)?;
        let node = parts.next().ok_or_else(bad)?;
        Ok(HlcTimestamp {
            wall_ms: wall.parse().map_err(|_| bad())?,
            counter: counter.parse().map_err(|_| bad())?,
            node: node.to_owned(),
        })
    }
}

impl Serialize for HlcTimestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HlcTimestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A hybrid logical clock: timestamps that follow wall time when it moves
/// forward, never go backwards, and move past every remote timestamp seen.
#[derive(Debug)]
pub struct HybridClock<C: Clock> {
    clock: C,
    node: String,
    max_skew_ms: u64,
    last: Mutex<(u64, u32)>,
}

impl<C: Clock> HybridClock<C> {
    /// A clock for `node` on top of `clock`. Remote timestamps more than
    /// `max_skew_ms` ahead of local wall time are refused by [`Self::observe`].
    pub fn new(clock: C, node: impl Into<String>, max_skew_ms: u64) -> Self {
        HybridClock {
            clock,
            node: node.into(),
            max_skew_ms,
            last: Mutex::new((0, 0)),
        }
    }

    /// The node id stamped on every timestamp.
    pub fn node(&self) -> &str {
        &self.node
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, u32)> {
        // The guarded data is two integers that are always valid, so a
        // poisoned lock carries no broken invariant.
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new timestamp, greater than every one issued or observed before.
    pub fn now(&self) -> HlcTimestamp {
        let wall = self.clock.now_ms();
        let mut last = self.lock();
        let next = if wall > last.0 { (wall, 0) } else { bump(*last) };
        *last = next;
        HlcTimestamp {
            wall_ms: next.0,
            counter: next.1,
            node: self.node.clone(),
        }
    }

    /// The latest timestamp this clock handed out or took in (wall time 0
    /// before any): what to persist so a restarted clock never goes back
    /// ([`HybridClock::advance_to`] it on start).
    pub fn high_water(&self) -> HlcTimestamp {
        let last = *self.lock();
        HlcTimestamp {
            wall_ms: last.0,
            counter: last.1,
            node: self.node.clone(),
        }
    }

    /// Move past `remote` without a skew bound, for timestamps from a
    /// trusted source (the server): the next [`HybridClock::now`] is
    /// greater than `remote`.
    pub fn advance_to(&self, remote: &HlcTimestamp) {
        let mut last = self.lock();
        let remote_pair = (remote.wall_ms, remote.counter);
        if remote_pair > *last {
            *last = remote_pair;
        }
    }

    /// Take in a remote timestamp so later local ones order after it.
    /// Refuses one further ahead of local wall time than the skew bound.
    pub fn observe(&self, remote: &HlcTimestamp) -> Result<(), CoreError> {
        let wall = self.clock.now_ms();
        if remote.wall_ms > wall.saturating_add(self.max_skew_ms) {
            return Err(CoreError::ClockSkew {
                skew_ms: remote.wall_ms - wall,
                max_skew_ms: self.max_skew_ms,
            });
        }
        self.advance_to(remote);
        Ok(())
    }
}

/// The next logical time after `t` within the same or the next millisecond.
fn bump(t: (u64, u32)) -> (u64, u32) {
    match t.1.checked_add(1) {
        Some(c) => (t.0, c),
        None => (t.0 + 1, 0),
    }
}

/// Column clocks as stored JSON text. When every column has the same
/// clock (every fresh row: one op wrote them all), the array
/// `["<clock>","<column>",...]` (the clock in its string form, then the
/// columns in order): a third of the object's size. Otherwise the object
/// `serde_json::to_string` writes for the map, each distinct clock
/// formatted once. [`parse_clocks_json`] reads both (texts written as
/// objects before the array form existed included).
pub fn clocks_json(clocks: &BTreeMap<String, HlcTimestamp>) -> serde_json::Result<String> {
    let mut values = clocks.values();
    let shared = match values.next() {
        Some(first) if values.all(|c| c == first) => Some(first),
        _ => None,
    };
    if let Some(hlc) = shared {
        return shared_clocks_json(hlc, clocks.keys().map(String::as_str));
    }
    let names: usize = clocks.keys().map(|k| k.len() + 4).sum();
    let mut out = String::with_capacity(2 + names + clocks.len() * 48);
    out.push('{');
    let mut last: Option<(&HlcTimestamp, String)> = None;
    for (i, (column, hlc)) in clocks.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        push_json_str(&mut out, column)?;
        out.push_str("\":");
        match &last {
            Some((h, encoded)) if *h == hlc => out.push_str(encoded),
            _ => {
                let encoded = serde_json::to_string(hlc)?;
                out.push_str(&encoded);
                last = Some((hlc, encoded));
            }
        }
    }
    out.push('}');
    Ok(out)
}

/// [`clocks_json`] of `hlc` for each of `columns` (in ascending order,
/// as a map's keys), without the map: `["<clock>","<column>",...]`, or
/// `{}` for no columns.
pub fn shared_clocks_json<'a>(
    hlc: &HlcTimestamp,
    columns: impl IntoIterator<Item = &'a str> + Clone,
) -> serde_json::Result<String> {
    let names: usize = columns.clone().into_iter().map(|k| k.len() + 4).sum();
    if names == 0 {
        return Ok("{}".to_owned());
    }
    let mut out = String::with_capacity(32 + hlc.node.len() + names);
    out.push_str("[\"");
    // The string form has no character JSON escapes but the node's.
    push_hlc_json(&mut out, hlc)?;
    out.push('"');
    for column in columns {
        out.push_str(",\"");
        push_json_str(&mut out, column)?;
        out.push('"');
    }
    out.push(']');
    Ok(out)
}

/// [`shared_clocks_json`] for row after row: the columns' part (after
/// the clock) written once and reused while rows have the same columns,
/// as a bulk load's rows have. Keeps one row's column names.
#[derive(Debug, Default)]
pub struct SharedClocksJson {
    /// The columns of `tail`.
    columns: Vec<String>,
    /// `,"<column>",...]` of `columns`.
    tail: String,
}

impl SharedClocksJson {
    /// [`shared_clocks_json`] of `hlc` for each of `columns`.
    pub fn encode<'a>(
        &mut self,
        hlc: &HlcTimestamp,
        columns: impl IntoIterator<Item = &'a str> + Clone,
    ) -> serde_json::Result<String> {
        if !self.columns.iter().map(String::as_str).eq(columns.clone()) {
            self.columns.clear();
            self.tail.clear();
            for column in columns {
                self.tail.push_str(",\"");
                push_json_str(&mut self.tail, column)?;
                self.tail.push('"');
                self.columns.push(column.to_owned());
            }
            self.tail.push(']');
        }
        if self.columns.is_empty() {
            return Ok("{}".to_owned());
        }
        let mut out = String::with_capacity(32 + hlc.node.len() + self.tail.len());
        out.push_str("[\"");
        push_hlc_json(&mut out, hlc)?;
        out.push('"');
        out.push_str(&self.tail);
        Ok(out)
    }
}

/// `hlc`'s string form (its `Display`) inside a JSON string: the digits
/// written straight in (no formatter), the node escaped as JSON needs.
fn push_hlc_json(out: &mut String, hlc: &HlcTimestamp) -> serde_json::Result<()> {
    push_padded(out, hlc.wall_ms, 15);
    out.push('-');
    push_padded(out, u64::from(hlc.counter), 5);
    out.push('-');
    push_json_str(out, &hlc.node)
}

/// `v` in decimal, zero-padded to at least `width` digits (`{:0width$}`).
fn push_padded(out: &mut String, v: u64, width: usize) {
    let mut buf = itoa::Buffer::new();
    let digits = buf.format(v);
    for _ in digits.len()..width {
        out.push('0');
    }
    out.push_str(digits);
}

/// `s` as the inside of a JSON string (no quotes): a text that needs no
/// escape as it is, anything else escaped as `serde_json` escapes it.
fn push_json_str(out: &mut String, s: &str) -> serde_json::Result<()> {
    if crate::json::plain(s) {
        out.push_str(s);
    } else {
        let quoted = serde_json::to_string(s)?;
        out.push_str(&quoted[1..quoted.len() - 1]);
    }
    Ok(())
}

/// Why stored clock text could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ClocksTextError {
    /// Not JSON of either form.
    #[error("clocks are not JSON of a known form: {0}")]
    Json(#[from] serde_json::Error),
    /// The array form without its clock.
    #[error("clocks array without a clock")]
    NoClock,
    /// The array form's clock does not parse.
    #[error(transparent)]
    Clock(#[from] CoreError),
}

/// Column clocks from the text [`clocks_json`] writes (either form).
pub fn parse_clocks_json(s: &str) -> Result<BTreeMap<String, HlcTimestamp>, ClocksTextError> {
    if !s.trim_start().starts_with('[') {
        return Ok(serde_json::from_str(s)?);
    }
    let mut parts = serde_json::from_str::<Vec<String>>(s)?.into_iter();
    let hlc: HlcTimestamp = parts.next().ok_or(ClocksTextError::NoClock)?.parse()?;
    Ok(parts.map(|column| (column, hlc.clone())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hlc_json_text_is_the_display_form() {
        for (wall_ms, counter, node) in [
            (0, 0, "s"),
            (1_764_150_000_123, 42, "server-ab12"),
            (u64::MAX, u32::MAX, "client \"x\" é"),
            (123_456_789_012_345, 99_999, ""),
        ] {
            let hlc = HlcTimestamp {
                wall_ms,
                counter,
                node: node.to_owned(),
            };
            let mut out = String::new();
            push_hlc_json(&mut out, &hlc).expect("encode");
            let quoted = serde_json::to_string(&hlc.to_string()).expect("encode");
            assert_eq!(out, quoted[1..quoted.len() - 1]);
        }
    }

    #[test]
    fn monotonic_even_when_wall_time_goes_back() {
        let clock = Arc::new(ManualClock::new(1_000));
        let hlc = HybridClock::new(clock.clone(), "a", 60_000);
        let t1 = hlc.now();
        clock.set_ms(500);
        let t2 = hlc.now();
        assert!(t2 > t1);
        clock.set_ms(2_000);
        let t3 = hlc.now();
        assert_eq!((t3.wall_ms, t3.counter), (2_000, 0));
    }

    #[test]
    fn observe_moves_past_remote_and_bounds_skew() {
        let clock = Arc::new(ManualClock::new(1_000));
        let hlc = HybridClock::new(clock.clone(), "a", 100);
        let remote = HlcTimestamp {
            wall_ms: 1_050,
            counter: 3,
            node: "b".into(),
        };
        hlc.observe(&remote).expect("within skew");
        let t = hlc.now();
        assert!(t > remote, "{t} > {remote}");
        let far = HlcTimestamp {
            wall_ms: 5_000,
            counter: 0,
            node: "b".into(),
        };
        let err = hlc.observe(&far).expect_err("too far ahead");
        assert_eq!(err.to_string(), "clock skew of 4000 ms exceeds the limit of 100 ms");
    }

    #[test]
    fn string_form_round_trips_and_sorts() {
        let a = HlcTimestamp {
            wall_ms: 9,
            counter: 10,
            node: "x-y".into(),
        };
        let b = HlcTimestamp {
            wall_ms: 10,
            counter: 0,
            node: "a".into(),
        };
        let (sa, sb) = (a.to_string(), b.to_string());
        assert!(sa < sb);
        assert_eq!(sa.parse::<HlcTimestamp>().expect("parse"), a);
        assert!("nope".parse::<HlcTimestamp>().is_err());
    }

    fn at(wall_ms: u64, node: &str) -> HlcTimestamp {
        HlcTimestamp {
            wall_ms,
            counter: 3,
            node: node.to_owned(),
        }
    }

    #[test]
    fn clocks_text_round_trips_in_both_forms() {
        let maps: Vec<BTreeMap<String, HlcTimestamp>> = vec![
            BTreeMap::new(),
            [("title".to_owned(), at(1, "server"))].into_iter().collect(),
            [
                ("a".to_owned(), at(1, "n \"q\" é")),
                ("b c".to_owned(), at(1, "n \"q\" é")),
            ]
            .into_iter()
            .collect(),
            [
                ("a".to_owned(), at(1, "server")),
                ("b".to_owned(), at(1, "server")),
                ("c".to_owned(), at(2, "client \"x\"")),
                ("d\"e".to_owned(), at(1, "server")),
                ("é".to_owned(), at(2, "client \"x\"")),
            ]
            .into_iter()
            .collect(),
        ];
        for m in maps {
            let text = clocks_json(&m).expect("encode");
            assert_eq!(parse_clocks_json(&text).expect("parse"), m, "{text}");
            let shared = m.values().next().is_some_and(|f| m.values().all(|c| c == f));
            if let Some(first) = m.values().next().filter(|_| shared) {
                // Written from the one clock and the names alone: the same.
                assert_eq!(
                    shared_clocks_json(first, m.keys().map(String::as_str)).expect("encode"),
                    text
                );
            }
            if m.is_empty() {
                assert_eq!(shared_clocks_json(&at(1, "s"), []).expect("encode"), text);
            }
            if let Some(first) = m.values().next().filter(|_| shared) {
                // Row after row, the columns changing or not: the same.
                let mut rows = SharedClocksJson::default();
                for names in [&["x"][..], &[], &["x"], &["x", "y"]] {
                    let one = rows.encode(first, names.iter().copied()).expect("encode");
                    assert_eq!(one, shared_clocks_json(first, names.iter().copied()).expect("encode"));
                    for _ in 0..2 {
                        let text_again = rows.encode(first, m.keys().map(String::as_str)).expect("encode");
                        assert_eq!(text_again, text);
                    }
                }
            }
            if shared {
                assert!(text.starts_with('['), "{text}");
                assert_eq!(
                    serde_json::from_str::<Vec<String>>(&text).expect("an array").len(),
                    m.len() + 1
                );
            } else {
                // The object form is what serde_json writes.
                assert_eq!(text, serde_json::to_string(&m).expect("encode"));
            }
        }
    }

    #[test]
    fn clocks_text_reads_objects_and_refuses_bad_arrays() {
        let m: BTreeMap<String, HlcTimestamp> = [("a".to_owned(), at(1, "s")), ("b".to_owned(), at(1, "s"))]
            .into_iter()
            .collect();
        let object = serde_json::to_string(&m).expect("encode");
        assert_eq!(parse_clocks_json(&object).expect("parse"), m);
        assert!(parse_clocks_json("[]").is_err());
        assert!(parse_clocks_json("[\"nope\",\"a\"]").is_err());
        assert!(parse_clocks_json("[1]").is_err());
    }
}
