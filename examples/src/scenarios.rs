//! The blog's story, once per strategy. Each function prints as it goes
//! and returns the [`Demo`] (both clients still connected) so tests can
//! check what each client ends up seeing.

use std::sync::Arc;

use ferry_client::{OfflinePolicy, Resolution};
use ferry_conflict::{crdt, Audited, DomainRules, LastWriteWins, Manual, PerColumn, ACTIVITY_TABLE};
use ferry_core::{row_data, Value};

use crate::{tick, Client, Demo, ExampleError, Result, TrackerRules, DONE, IN_PROGRESS, PENDING};

/// The ticket every story is about.
pub const TICKET: &str = "t-1";

/// Start the demo on `rules` with `configure`, create the ticket with
/// `extra` columns, sync both clients and take bob offline.
async fn setup(
    title: &str,
    rules: TrackerRules,
    configure: impl FnOnce(ferry_server::SyncServiceBuilder) -> ferry_server::SyncServiceBuilder,
    extra: ferry_core::RowData,
) -> Result<Demo> {
    let demo = Demo::start(rules, configure).await?;
    demo.step(&format!(
        "alice creates ticket {TICKET} {title:?} ({PENDING}); both clients sync"
    ));
    demo.alice.create_ticket(TICKET, title, extra)?;
    demo.catch_up().await?;
    demo.print_views()?;
    demo.step("bob goes offline");
    demo.bob.go_offline().await;
    Ok(demo)
}

/// Bob reconnects; both catch up; print views and outcomes.
async fn reconnect(demo: &Demo) -> Result<()> {
    demo.step("bob comes back online; both clients catch up");
    demo.bob.go_online();
    demo.catch_up().await?;
    demo.print_outcomes();
    demo.print_views()
}

/// Column-level last-write-wins (the server's default): A; alice sets B
/// online; bob sets C offline, later; after reconnecting both see C.
pub async fn last_write_wins() -> Result<Demo> {
    println!("== last write wins: the default ==");
    let demo = setup("A", TrackerRules::Base, |b| b, Default::default()).await?;
    demo.step("alice (online) sets title = \"B\"");
    demo.alice
        .update_ticket(TICKET, row_data([("title", Value::from("B"))]))?;
    demo.alice.catch_up(&demo.service).await?;
    tick().await;
    demo.step("bob (offline) sets title = \"C\", later than alice");
    demo.bob
        .update_ticket(TICKET, row_data([("title", Value::from("C"))]))?;
    demo.print_views()?;
    reconnect(&demo).await?;
    println!(
        "\nwhy: each column keeps the write with the highest hybrid logical clock; bob's offline \
         edit was made after alice's, so \"C\" replaced \"B\" on the server and on both clients \
         (alice's \"B\" is lost without a trace: see the audit-log example)."
    );
    Ok(demo)
}

/// Disjoint changes never conflict: alice renames the ticket while bob,
/// offline, edits its description and adds a ticket of his own.
pub async fn disjoint_changes(
    configure: impl FnOnce(ferry_server::SyncServiceBuilder) -> ferry_server::SyncServiceBuilder,
) -> Result<Demo> {
    println!("== disjoint changes ==");
    let demo = setup("A", TrackerRules::Base, configure, Default::default()).await?;
    demo.step("alice (online) sets title = \"B\"; bob (offline) sets the description and creates t-2");
    demo.alice
        .update_ticket(TICKET, row_data([("title", Value::from("B"))]))?;
    demo.alice.catch_up(&demo.service).await?;
    tick().await;
    demo.bob
        .update_ticket(TICKET, row_data([("description", Value::from("paper jam in tray 2"))]))?;
    demo.bob.create_ticket("t-2", "Order toner", Default::default())?;
    reconnect(&demo).await?;
    println!("\nwhy: different rows and different columns of one row never conflict: both edits are kept.");
    Ok(demo)
}

/// The offline policy bob's app installs: no renames, deletes or status
/// changes of tickets while offline.
pub fn restricted_policy() -> OfflinePolicy {
    OfflinePolicy::new()
        .deny_delete("tickets")
        .deny_update_of("tickets", ["title", "description", "status", "deleted_at"])
}

/// What bob's refused writes said, in order.
#[derive(Debug, Default)]
pub struct Refusals(pub Vec<String>);

/// Offline restrictions: bob's app refuses the risky title change while
/// offline, with a clear error, but still creates a ticket, a comment, an
/// assignment and an attachment, which sync once he is back.
pub async fn restricted() -> Result<(Demo, Refusals)> {
    println!("== offline restrictions: destructive changes wait for a connection ==");
    let demo = setup("A", TrackerRules::Base, |b| b, Default::default()).await?;
    demo.bob.db.set_offline_policy(Some(restricted_policy()));
    demo.step("alice (online) sets title = \"B\"");
    demo.alice
        .update_ticket(TICKET, row_data([("title", Value::from("B"))]))?;
    demo.alice.catch_up(&demo.service).await?;

    let mut refusals = Refusals::default();
    demo.step("bob (offline) tries to set title = \"C\" and to delete the ticket");
    for attempt in [
        demo.bob.update_ticket(TICKET, row_data([("title", Value::from("C"))])),
        demo.bob.write(&format!("tickets/{TICKET} deleted"), |tx| {
            tx.delete("tickets", TICKET).map(drop)
        }),
    ] {
        match attempt {
            Ok(()) => {
                return Err(ExampleError::Unexpected(
                    "bob's risky offline write was accepted".into(),
                ))
            }
            Err(e) => {
                println!("  refused: {e}");
                refusals.0.push(e.to_string());
            }
        }
    }
    demo.step("bob (offline) creates t-2, comments on t-1, assigns himself and attaches a photo");
    demo.bob.create_ticket("t-2", "Order toner", Default::default())?;
    demo.bob.comment("c-1", TICKET, "on my way with a new fuser")?;
    demo.bob.assign("a-1", TICKET, "bob")?;
    demo.bob.attach("f-1", TICKET, "https://example.invalid/printer.jpg")?;
    println!(
        "  all accepted; bob's upload queue holds {} ops",
        demo.bob.db.local().upload_queue_len()
    );
    demo.print_views()?;
    reconnect(&demo).await?;
    demo.step("online again, bob's rename is allowed");
    demo.bob
        .update_ticket(TICKET, row_data([("title", Value::from("C"))]))?;
    demo.catch_up().await?;
    demo.print_views()?;
    println!(
        "\nwhy: bob's app refuses changes that could overwrite someone else's work while it has no \
         connection (OfflinePolicy: deny_delete, deny_update_of title/description/status), and \
         allows what cannot conflict: new rows. Nothing conflicted, nothing was lost."
    );
    Ok((demo, refusals))
}

/// The server configuration of the domain example: tickets follow the
/// ticket demo's rule (`done` on the server is not reopened by a change
/// made from a stale base), other columns last write wins.
pub fn domain_strategy(b: ferry_server::SyncServiceBuilder) -> ferry_server::SyncServiceBuilder {
    b.strategy("tickets", Arc::new(DomainRules::ticket_status()))
}

/// Domain-specific resolution: alice (online) closes the ticket; bob,
/// offline and still seeing `pending`, moves it to `in_progress`. The
/// ticket stays `done` on both clients; bob's write is answered `merged`
/// with the rule's reason.
pub async fn domain_resolution() -> Result<Demo> {
    println!("== domain-specific resolution: done stays done ==");
    let demo = setup(
        "Printer on fire",
        TrackerRules::Base,
        domain_strategy,
        Default::default(),
    )
    .await?;
    demo.step("alice (online) sets status = \"done\"");
    demo.alice
        .update_ticket(TICKET, row_data([("status", Value::from(DONE))]))?;
    demo.alice.catch_up(&demo.service).await?;
    tick().await;
    demo.step("bob (offline, still seeing \"pending\") sets status = \"in_progress\", later than alice");
    demo.bob
        .update_ticket(TICKET, row_data([("status", Value::from(IN_PROGRESS))]))?;
    demo.print_views()?;
    reconnect(&demo).await?;
    println!(
        "\nwhy: plain last-write-wins would reopen the ticket (bob's edit is later). The server's \
         domain rule (DomainRules::ticket_status: deny status changes away from \"done\" unless the \
         client's base was \"done\") sees that bob changed the status from \"pending\", a stale \
         base, and keeps \"done\"; bob's other columns still apply (outcome merged)."
    );
    Ok(demo)
}

/// The server configuration of the manual example: ticket titles are
/// resolved by a person, other columns last write wins.
pub fn manual_strategy(b: ferry_server::SyncServiceBuilder) -> ferry_server::SyncServiceBuilder {
    b.strategy(
        "tickets",
        Arc::new(PerColumn::new(LastWriteWins).column("title", Manual)),
    )
}

/// Manual resolution: bob's offline title change conflicts with alice's;
/// the server keeps "B", answers `needs_review` and records the conflict,
/// which both clients see; bob resolves it (keeping his "C"), which closes
/// it everywhere.
pub async fn manual_resolution() -> Result<Demo> {
    let demo = manual_conflict().await?;
    let open = demo.bob.db.open_conflicts()?;
    let Some(conflict) = open.first() else {
        return Err(ExampleError::Unexpected("bob sees no open conflict".into()));
    };
    demo.step(&format!(
        "bob resolves conflict {} by keeping his value {} (server had {}, both started from {})",
        conflict.id, conflict.local, conflict.server, conflict.base
    ));
    demo.bob.resolve(&conflict.id, Resolution::Local)?;
    demo.catch_up().await?;
    demo.print_outcomes();
    demo.print_views()?;
    println!(
        "\nwhy: the title column uses the manual strategy: bob's base \"A\" differs from the \
         server's \"B\", so the server kept \"B\", recorded a ferry_conflicts row (synced to \
         everyone) and answered needs_review. Resolving wrote the chosen value with a fresh base \
         and closed the record in one transaction, so every client sees the value and no open \
         conflict."
    );
    Ok(demo)
}

/// The first half of [`manual_resolution`]: the story up to both clients
/// seeing the open conflict.
pub async fn manual_conflict() -> Result<Demo> {
    println!("== manual resolution: a person decides ==");
    let demo = setup("A", TrackerRules::Base, manual_strategy, Default::default()).await?;
    demo.step("alice (online) sets title = \"B\"");
    demo.alice
        .update_ticket(TICKET, row_data([("title", Value::from("B"))]))?;
    demo.alice.catch_up(&demo.service).await?;
    tick().await;
    demo.step("bob (offline) sets title = \"C\"");
    demo.bob
        .update_ticket(TICKET, row_data([("title", Value::from("C"))]))?;
    demo.print_views()?;
    reconnect(&demo).await?;
    Ok(demo)
}

/// The text of a client's ticket description document.
pub fn description_text(client: &Client) -> Result<String> {
    match client.ticket_value(TICKET, "description_doc")? {
        Value::Blob(doc) => crdt::read_text(&doc).map_err(|e| ExampleError::Unexpected(e.to_string())),
        other => Err(ExampleError::Unexpected(format!(
            "{}'s description_doc is not a document: {other}",
            client.name
        ))),
    }
}

/// Edit a client's description document and write the whole new document.
fn edit_description(client: &Client, f: impl FnOnce(&mut crdt::TextEdit<'_>)) -> Result<()> {
    let Value::Blob(doc) = client.ticket_value(TICKET, "description_doc")? else {
        return Err(ExampleError::Unexpected(format!(
            "{} has no description document",
            client.name
        )));
    };
    let edited =
        crdt::edit_text(&doc, client.db.client_id(), f).map_err(|e| ExampleError::Unexpected(e.to_string()))?;
    client.update_ticket(TICKET, row_data([("description_doc", Value::Blob(edited))]))?;
    Ok(())
}

/// CRDT: alice appends to the description while bob, offline, prefixes
/// it; after reconnecting both clients read the same text with both edits.
pub async fn crdt_text() -> Result<Demo> {
    println!("== CRDT: concurrent text edits merge ==");
    let doc = crdt::new_text_doc("Printer is broken.");
    // The CRDT rules (`examples/tracker-crdt.toml`) add the document
    // column to tickets and merge it with the Crdt strategy.
    let demo = setup(
        "Printer",
        TrackerRules::Crdt,
        |b| b,
        row_data([("description_doc", Value::Blob(doc))]),
    )
    .await?;
    for c in [&demo.alice, &demo.bob] {
        println!("  {} reads: {:?}", c.name, description_text(c)?);
    }
    demo.step("alice (online) appends \" Toner replaced.\"");
    edit_description(&demo.alice, |e| {
        e.push(" Toner replaced.");
    })?;
    demo.alice.catch_up(&demo.service).await?;
    demo.step("bob (offline) inserts \"URGENT: \" at the start");
    edit_description(&demo.bob, |e| {
        e.insert(0, "URGENT: ");
    })?;
    for c in [&demo.alice, &demo.bob] {
        println!("  {} reads: {:?}", c.name, description_text(c)?);
    }
    reconnect(&demo).await?;
    for c in [&demo.alice, &demo.bob] {
        println!("  {} reads: {:?}", c.name, description_text(c)?);
    }
    println!(
        "\nwhy: description_doc holds an automerge document; each client edits its copy and \
         uploads the whole document; the server merges it with the stored one (Crdt strategy) and \
         every client downloads the merge, so both edits survive, in the same order everywhere."
    );
    Ok(demo)
}

/// The server configuration of the audit-log example: last write wins on
/// tickets, with an `activity` row written with every change.
pub fn audit_strategy(b: ferry_server::SyncServiceBuilder) -> ferry_server::SyncServiceBuilder {
    b.strategy("tickets", Arc::new(Audited::new(LastWriteWins)))
}

/// One activity row in words: who did what to which title.
pub fn describe_activity(row: &ferry_core::RowData) -> String {
    let text = |c: &str| row.get(c).and_then(Value::as_text).unwrap_or("null").to_owned();
    let title = |c: &str| {
        serde_json::from_str::<serde_json::Value>(&text(c))
            .ok()
            .and_then(|v| v.get("title").cloned())
            .map_or_else(|| "-".to_owned(), |t| t.to_string())
    };
    format!(
        "{} {} {}/{}: title {} -> {} ({})",
        text("user_id"),
        text("op"),
        text("table_name"),
        text("row_id"),
        title("old_value"),
        title("new_value"),
        text("outcome")
    )
}

/// Audit log: last write wins as in the first example, but every change
/// leaves an `activity` row (written by the server in the same transaction)
/// that syncs to everyone, so alice can see that her "B" was overwritten
/// by bob's offline "C".
pub async fn audit_log() -> Result<Demo> {
    println!("== audit log: last write wins, with the history visible ==");
    let demo = setup("A", TrackerRules::Base, audit_strategy, Default::default()).await?;
    demo.step("alice (online) sets title = \"B\"");
    demo.alice
        .update_ticket(TICKET, row_data([("title", Value::from("B"))]))?;
    demo.alice.catch_up(&demo.service).await?;
    tick().await;
    demo.step("bob (offline) sets title = \"C\"");
    demo.bob
        .update_ticket(TICKET, row_data([("title", Value::from("C"))]))?;
    reconnect(&demo).await?;
    for c in [&demo.alice, &demo.bob] {
        println!("  activity as {} sees it (oldest first):", c.name);
        let mut rows = c.rows(ACTIVITY_TABLE)?;
        rows.sort_by_key(|(_, r)| {
            r.get("created_at")
                .and_then(Value::as_text)
                .unwrap_or("")
                .parse::<u64>()
                .unwrap_or(0)
        });
        for (_, row) in rows {
            println!("    {}", describe_activity(&row));
        }
    }
    println!(
        "\nwhy: the tickets strategy is Audited(LastWriteWins): the later edit (bob's \"C\") wins, \
         and the server writes an activity row in the same transaction as each change, so the \
         overwritten \"B\" stays visible in the history on every client."
    );
    Ok(demo)
}
