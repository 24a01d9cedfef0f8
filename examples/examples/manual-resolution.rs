//! Manual resolution: the conflicting offline title change is recorded as a
//! `ferry_conflicts` row for a person to resolve; resolving closes it everywhere.
//!
//! ```sh
//! cargo run -p ferry-examples --example manual-resolution
//! ```

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let demo = ferry_examples::scenarios::manual_resolution().await?;
    demo.shutdown().await;
    Ok(())
}
