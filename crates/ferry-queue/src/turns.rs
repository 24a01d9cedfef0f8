//! Commit-ordered turns for telling the observer, outside the write lock.
//!
//! A commit takes a ticket while it still holds the write lock (so tickets
//! follow commit order), releases the lock, then waits for its turn to call
//! the observer. The next write commits while the observer of the last one
//! runs (live queries diff and call their callbacks), and the observer
//! still hears every commit once, in commit order.

use parking_lot::{Condvar, Mutex};

/// The turn counter: the ticket whose turn it is.
#[derive(Default)]
pub(crate) struct Turns {
    next: Mutex<u64>,
    changed: Condvar,
}

/// A ticket handed out under the write lock. Every ticket must be waited
/// for (`Turns::wait`), even when there is nothing to tell: a ticket never
/// waited for would block every later one.
#[must_use = "a ticket must be waited for, or every later commit's turn blocks"]
pub(crate) struct Ticket(u64);

/// It is a ticket's turn while this lives; dropping it (also when the
/// observer panics) passes the turn on.
pub(crate) struct Turn<'a> {
    turns: &'a Turns,
}

impl Turns {
    /// Wait until every earlier ticket's turn ended.
    pub(crate) fn wait(&self, ticket: Ticket) -> Turn<'_> {
        let mut next = self.next.lock();
        while *next != ticket.0 {
            self.changed.wait(&mut next);
        }
        Turn { turns: self }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut next = self.turns.next.lock();
        *next = next.wrapping_add(1);
        self.turns.changed.notify_all();
    }
}

/// Hands out tickets; lives in the state the write lock guards.
#[derive(Debug, Default)]
pub(crate) struct TicketRoll {
    next: u64,
}

impl TicketRoll {
    /// The next ticket. Call only with the write lock held, after the
    /// commit succeeded.
    pub(crate) fn take(&mut self) -> Ticket {
        let t = Ticket(self.next);
        self.next = self.next.wrapping_add(1);
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn turns_follow_ticket_order_whatever_order_threads_arrive_in() {
        let turns = Arc::new(Turns::default());
        let mut roll = TicketRoll::default();
        let tickets: Vec<Ticket> = (0..8).map(|_| roll.take()).collect();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        // Threads start in reverse ticket order.
        for (i, ticket) in tickets.into_iter().enumerate().rev() {
            let (turns, seen) = (turns.clone(), seen.clone());
            handles.push(std::thread::spawn(move || {
                let _turn = turns.wait(ticket);
                seen.lock().push(i);
            }));
        }
        for h in handles {
            h.join().expect("thread");
        }
        assert_eq!(*seen.lock(), (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn a_panicking_turn_passes_the_turn_on() {
        let turns = Arc::new(Turns::default());
        let mut roll = TicketRoll::default();
        let (first, second) = (roll.take(), roll.take());
        let t = turns.clone();
        let panicked = std::thread::spawn(move || {
            let _turn = t.wait(first);
            panic!("observer failed");
        })
        .join();
        assert!(panicked.is_err());
        let _turn = turns.wait(second);
    }
}
