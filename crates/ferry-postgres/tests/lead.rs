//! One server at a time: `try_lead` on PostgreSQL is an advisory lock
//! held by a connection of its own; a second database handle (another
//! server) gets no lease until the first is dropped, and a dropped or
//! dead holder frees it.

use ferry_postgres::scratch::ScratchSchemas;
use ferry_postgres::PgSourceDb;
use ferry_source::SourceDb;

#[test]
fn one_leader_per_job_until_it_lets_go() {
    let s = ScratchSchemas::for_test();
    let a = PgSourceDb::connect(&s.options()).expect("server a");
    let b = PgSourceDb::connect(&s.options()).expect("server b");
    let lease = a.try_lead("capture").expect("ask").expect("a leads");
    assert!(lease.is_held());
    assert!(b.try_lead("capture").expect("ask").is_none(), "b waits while a leads");
    let other = b.try_lead("compact").expect("ask").expect("another job is free");
    drop(lease);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if b.try_lead("capture").expect("ask").is_some() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the lead was never freed");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    drop(other);
    // A server that dies frees its lead with its connection.
    let c = PgSourceDb::connect(&s.options()).expect("server c");
    let held = c.try_lead("rebucket").expect("ask").expect("c leads");
    assert!(a.try_lead("rebucket").expect("ask").is_none());
    // c's runtime (its connections' I/O) ends: its sessions end, the
    // lease object still exists but no longer holds anything.
    drop(c);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while a.try_lead("rebucket").expect("ask").is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "a dead server's lead was never freed"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    drop(held);
}
