//! Offline restrictions: the offline client refuses risky changes (renames,
//! deletes) with a clear error and keeps conflict-free ones (new tickets,
//! comments, assignments, attachments).
//!
//! ```sh
//! cargo run -p ferry-examples --example restricted
//! ```

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (demo, _refusals) = ferry_examples::scenarios::restricted().await?;
    demo.shutdown().await;
    Ok(())
}
