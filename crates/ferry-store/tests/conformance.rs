//! The conformance suite against the in-memory backend.

ferry_store::conformance_tests!(ferry_store::testkit::MemoryBackend);
