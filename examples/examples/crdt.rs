//! CRDT: concurrent offline and online edits of an automerge text document
//! merge on the server; both clients read the same text with both edits.
//!
//! ```sh
//! cargo run -p ferry-examples --example crdt
//! ```

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let demo = ferry_examples::scenarios::crdt_text().await?;
    demo.shutdown().await;
    Ok(())
}
