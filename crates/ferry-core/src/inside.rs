//! Which objects this thread is inside a call of (a write, a callback),
//! so a call back into the same object is refused instead of waiting for
//! a lock this thread holds. Each use declares its own set:
//!
//! ```
//! std::thread_local! {
//!     static WRITING: ferry_core::inside::Marks = ferry_core::inside::Marks::default();
//! }
//! let db = 7u32;
//! assert!(!ferry_core::inside::is_inside(&WRITING, &db));
//! let guard = ferry_core::inside::Inside::enter(&WRITING, &db);
//! assert!(ferry_core::inside::is_inside(&WRITING, &db));
//! drop(guard);
//! assert!(!ferry_core::inside::is_inside(&WRITING, &db));
//! ```

use std::cell::RefCell;
use std::thread::LocalKey;

/// A thread's set of objects it is inside, by address.
#[derive(Debug, Default)]
pub struct Marks(RefCell<Vec<usize>>);

/// `of`'s address, its identity while it is borrowed.
fn address<T>(of: &T) -> usize {
    std::ptr::from_ref(of) as usize
}

/// Whether this thread is inside a call of `of` (in `marks`).
pub fn is_inside<T>(marks: &'static LocalKey<Marks>, of: &T) -> bool {
    let at = address(of);
    marks.with(|m| m.0.borrow().contains(&at))
}

/// This thread inside a call of an object until dropped.
#[derive(Debug)]
pub struct Inside {
    marks: &'static LocalKey<Marks>,
    at: usize,
}

impl Inside {
    /// Mark this thread inside a call of `of` (in `marks`).
    pub fn enter<T>(marks: &'static LocalKey<Marks>, of: &T) -> Inside {
        let at = address(of);
        marks.with(|m| m.0.borrow_mut().push(at));
        Inside { marks, at }
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        self.marks.with(|m| {
            let mut m = m.0.borrow_mut();
            if let Some(i) = m.iter().rposition(|at| *at == self.at) {
                m.remove(i);
            }
        });
    }
}
