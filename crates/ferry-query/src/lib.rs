//! Live queries.
