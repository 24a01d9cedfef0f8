//! Bugs planted on purpose, to prove the simulator's checker catches them
//! (feature `planted-bugs`; off unless switched on, per thread, so only a
//! simulation that asks for one runs with it).

use std::cell::Cell;

thread_local! {
    static CONFIRM_EARLY: Cell<bool> = const { Cell::new(false) };
}

/// Switch the "confirm one checkpoint early" bug on or off for this
/// thread: a checkpoint also confirms the write after its write
/// checkpoint, which no checkpoint covers yet, so that pending write
/// vanishes from the visible state (and, not yet uploaded, from the queue).
pub fn set_confirm_early(on: bool) {
    CONFIRM_EARLY.with(|c| c.set(on));
}

pub(crate) fn confirm_early() -> bool {
    CONFIRM_EARLY.with(Cell::get)
}
