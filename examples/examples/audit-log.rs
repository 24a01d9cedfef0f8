//! Audit log: last write wins, and every change leaves an `activity` row
//! (written by the server in the same transaction) that syncs to everyone.
//!
//! ```sh
//! cargo run -p ferry-examples --example audit-log
//! ```

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let demo = ferry_examples::scenarios::audit_log().await?;
    demo.shutdown().await;
    Ok(())
}
