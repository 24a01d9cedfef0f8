//! Last write wins (the server's default): the later edit of a column wins
//! on every client.
//!
//! ```sh
//! cargo run -p ferry-examples --example lww
//! ```

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let demo = ferry_examples::scenarios::last_write_wins().await?;
    demo.shutdown().await;
    Ok(())
}
