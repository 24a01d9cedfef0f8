//! `cargo xtask <command>`: the project's chores, in Rust so they run
//! wherever cargo does.
//!
//! - `ci`    fmt check, clippy with warnings denied, tidy, and every test
//! - `test`  every test (what `ci` runs last)
//! - `bench` the criterion benchmarks (`--quick` for a short run)
//! - `demo`  the main job: the quickstart example on the embedded default
//! - `tidy`  repository rules that no compiler checks

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = project_root();
    std::env::set_current_dir(&root).with_context(|| format!("entering {}", root.display()))?;
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("test") => test(),
        Some("bench") => bench(&args[1..]),
        Some("demo") => demo(&args[1..]),
        Some("tidy") => tidy(),
        other => {
            eprintln!("usage: cargo xtask <ci|test|bench|demo|tidy>");
            bail!("unknown command {:?}", other.unwrap_or(""))
        }
    }
}

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn cargo(args: &[&str]) -> Result<()> {
    eprintln!("$ cargo {}", args.join(" "));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed with {status}", args.join(" "));
    }
    Ok(())
}

fn ci() -> Result<()> {
    cargo(&["fmt", "--all", "--", "--check"])?;
    tidy()?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--all-features",
        "--",
        "-D",
        "warnings",
    ])?;
    test()
}

fn test() -> Result<()> {
    cargo(&["test", "--workspace", "--all-features"])
}

fn bench(args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    let mut cmd: Vec<&str> = vec!["bench", "--workspace"];
    if quick {
        cmd.extend(["--", "--warm-up-time", "1", "--measurement-time", "2"]);
    }
    cargo(&cmd)
}

fn demo(args: &[String]) -> Result<()> {
    let mut cmd = vec!["run", "--release", "-p", "ferry", "--example", "quickstart", "--"];
    cmd.extend(args.iter().map(String::as_str));
    cargo(&cmd)
}

/// The `.rs` files of a crate's library: everything under `src/` except
/// `main.rs` and `src/bin/`.
fn library_sources(src: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "bin") {
                    stack.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "rs") && path.file_name().is_some_and(|n| n != "main.rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Rules: every crate inherits the workspace lints and is in the code map
/// of ARCHITECTURE.md; no crate outside binaries, xtask and tests uses
/// anyhow.
fn tidy() -> Result<()> {
    let architecture = std::fs::read_to_string("ARCHITECTURE.md").context("reading ARCHITECTURE.md")?;
    let mut problems = Vec::new();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("crates")
        .context("listing crates/")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("Cargo.toml").exists())
        .collect();
    dirs.sort();
    for dir in dirs {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml"))?;
        if !manifest.contains("[lints]\nworkspace = true") {
            problems.push(format!(
                "crates/{name}/Cargo.toml does not inherit [lints] from the workspace"
            ));
        }
        if !architecture.contains(&format!("`{name}`")) {
            problems.push(format!("ARCHITECTURE.md does not describe crate `{name}`"));
        }
        for file in library_sources(&dir.join("src")) {
            let text = std::fs::read_to_string(&file)?;
            if text.contains("anyhow") {
                problems.push(format!(
                    "{} uses anyhow in library code; use a thiserror enum",
                    file.display()
                ));
            }
        }
    }
    if problems.is_empty() {
        eprintln!("tidy: ok");
        Ok(())
    } else {
        for p in &problems {
            eprintln!("tidy: {p}");
        }
        bail!("tidy found {} problem(s)", problems.len())
    }
}
