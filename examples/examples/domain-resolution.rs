//! Domain-specific resolution: a ticket that is `done` on the server is not
//! reopened by a stale offline status change.
//!
//! ```sh
//! cargo run -p ferry-examples --example domain-resolution
//! ```

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let demo = ferry_examples::scenarios::domain_resolution().await?;
    demo.shutdown().await;
    Ok(())
}
