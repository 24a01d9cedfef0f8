//! `cargo xtask <command>`: the project's chores, in Rust so they run
//! wherever cargo does.
//!
//! - `ci`    fmt check, clippy with warnings denied, tidy, and every test
//! - `test`  every test (what `ci` runs last)
//! - `bench` the criterion benchmarks (`--quick` for a short run)
//! - `demo`  the main job: the sync server on the embedded default and
//!   two tracker devices (alice on :3001, bob on :3002), until Ctrl-C
//! - `tidy`  repository rules that no compiler checks
//! - `sim`   `cargo xtask sim [--seeds N] [--first S] [--seed S] [--release]
//!   [--planted-bug] [--trace]`: the deterministic fleet simulation
//!   (`ferry-sim`), N seeds from S (default 200 from 0), or one seed
//! - `fuzz`  `cargo xtask fuzz [target] [--seconds S]`: the cargo-fuzz
//!   targets of `fuzz/` on nightly, one or all in turn, S seconds each
//!   (default 60), with the executions and time libFuzzer reports

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

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
        Some("fuzz") => fuzz(&args[1..]),
        Some("sim") => sim(&args[1..]),
        other => {
            eprintln!(
                "usage: cargo xtask <ci|test|bench|demo|tidy|sim [--seeds N] [--seed S]|fuzz [target] [--seconds S]>"
            );
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

/// The PostgreSQL the tests use (`FERRY_TEST_DATABASE_URL`, default the
/// machine's): fail at once, with a message, when it does not answer,
/// rather than in the middle of the test run (the tests never skip).
fn check_test_database() -> Result<()> {
    let url = std::env::var("FERRY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    // postgres://user[:password]@host[:port]/db[?options]
    let after_scheme = url.split("://").nth(1).unwrap_or_default();
    let authority = after_scheme.split('/').next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    let (host, port) = match host_port.rsplit_once(':') {
        Some((h, p)) => (h.to_owned(), p.parse::<u16>().unwrap_or(5432)),
        None => (host_port.to_owned(), 5432),
    };
    let host = if host.is_empty() { "127.0.0.1".to_owned() } else { host };
    let addrs: Vec<std::net::SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
        .map(Iterator::collect)
        .unwrap_or_default();
    let reachable = addrs
        .iter()
        .any(|a| std::net::TcpStream::connect_timeout(a, std::time::Duration::from_secs(3)).is_ok());
    if !reachable {
        bail!(
            "PostgreSQL is not reachable at {host}:{port}: the PostgreSQL tests need it (start it, or point \
             FERRY_TEST_DATABASE_URL at one)"
        );
    }
    eprintln!("postgresql: {host}:{port} answers");
    Ok(())
}

fn test() -> Result<()> {
    check_test_database()?;
    browser_test_packages()?;
    cargo(&["test", "--workspace", "--all-features"])?;
    // The fleet simulation: a few hundred seeds per run; the long runs
    // (`cargo xtask sim --seeds 10000 --release`) are commands, not CI.
    sim(&["--seeds".into(), "200".into()])
}

/// The npm packages of the browser tests (`examples/browser-tests`,
/// puppeteer-core), installed from the lock file when absent. Chromium
/// itself comes from the system (`.ci/run` installs Debian's); the test
/// fails with a message when it is missing.
fn browser_test_packages() -> Result<()> {
    let dir = Path::new("examples").join("browser-tests");
    if dir
        .join("node_modules")
        .join("puppeteer-core")
        .join("package.json")
        .exists()
    {
        return Ok(());
    }
    eprintln!("$ npm ci (in {})", dir.display());
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .status()
        .context("running npm ci for the browser tests (Node 20 or newer is needed)")?;
    if !status.success() {
        bail!("npm ci in {} failed with {status}", dir.display());
    }
    Ok(())
}

/// `cargo xtask sim`: runs `ferry-sim` (debug build unless `--release`),
/// passing the other arguments on; with no `--seeds`/`--seed`, 200 seeds.
fn sim(args: &[String]) -> Result<()> {
    let release = args.iter().any(|a| a == "--release");
    let mut cmd: Vec<&str> = vec!["run", "-q", "-p", "ferry-sim"];
    if release {
        cmd.push("--release");
    }
    cmd.push("--");
    let rest: Vec<&str> = args.iter().map(String::as_str).filter(|a| *a != "--release").collect();
    if !rest.iter().any(|a| *a == "--seeds" || *a == "--seed") {
        cmd.extend(["--seeds", "200"]);
    }
    cmd.extend(rest);
    cargo(&cmd)
}

fn bench(args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    let mut cmd: Vec<&str> = vec!["bench", "--workspace"];
    if quick {
        cmd.extend(["--", "--warm-up-time", "1", "--measurement-time", "2"]);
    }
    cargo(&cmd)
}

/// The main job: the sync server on the embedded default (SQLite under
/// `data/server`, 127.0.0.1:8080, the ticket-tracker rules) and two
/// tracker devices, alice on http://127.0.0.1:3001/ and bob on
/// http://127.0.0.1:3002/ (data under `data/tracker-<user>`), until
/// Ctrl-C. Extra arguments go to `ferry-server serve`.
fn demo(args: &[String]) -> Result<()> {
    cargo(&["build", "-p", "ferry-server", "--bin", "ferry-server"])?;
    cargo(&["build", "-p", "ferry-examples", "--bin", "tracker"])?;
    let target = std::env::var("CARGO_TARGET_DIR").map_or_else(|_| PathBuf::from("target"), PathBuf::from);
    let server_bin = target.join("debug").join("ferry-server");
    let tracker_bin = target.join("debug").join("tracker");
    let server = Command::new(&server_bin)
        .arg("serve")
        .args(args)
        .spawn()
        .with_context(|| format!("starting {}", server_bin.display()))?;
    let mut children = vec![("ferry-server".to_owned(), server)];
    // The trackers derive their client schema from the rules the server
    // runs (`--rules FILE` or `--rules=FILE`).
    let rules = args
        .iter()
        .enumerate()
        .find_map(|(i, a)| match a.strip_prefix("--rules=") {
            Some(file) => Some(file.to_owned()),
            None if a == "--rules" => args.get(i + 1).cloned(),
            None => None,
        });
    let result = demo_run(&tracker_bin, rules.as_deref(), &mut children);
    // Ctrl-C reaches every process of the terminal's group; anything
    // still running here (an error, another signal) is stopped.
    for (_, child) in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
    result
}

/// Wait for the server, start alice's and bob's trackers, print their
/// URLs and keep everything running until one exits (Ctrl-C ends all).
fn demo_run(tracker_bin: &Path, rules: Option<&str>, children: &mut Vec<(String, std::process::Child)>) -> Result<()> {
    let server_url = "http://127.0.0.1:8080";
    wait_for_port("ferry-server", "127.0.0.1:8080", children)?;
    let mut urls = Vec::new();
    for (user, port) in [("alice", 3001), ("bob", 3002)] {
        let data_dir = Path::new("data").join(format!("tracker-{user}"));
        let mut cmd = Command::new(tracker_bin);
        if let Some(rules) = rules {
            cmd.args(["--rules", rules]);
        }
        let child = cmd
            .args([
                "--server",
                server_url,
                "--user",
                user,
                "--port",
                &port.to_string(),
                "--data-dir",
            ])
            .arg(&data_dir)
            .spawn()
            .with_context(|| format!("starting {}", tracker_bin.display()))?;
        let name = format!("{user}'s tracker");
        children.push((name.clone(), child));
        wait_for_port(&name, &format!("127.0.0.1:{port}"), children)?;
        urls.push((user, format!("http://127.0.0.1:{port}/")));
    }
    eprintln!("\nferry-server is serving on {server_url} (data in data/server), with two devices:");
    for (user, url) in &urls {
        eprintln!("  {user:<5}  {url}");
    }
    eprintln!(
        "Open both in a browser, switch one offline, edit on both, switch it back. Without a browser:\n  \
         curl {}api/tickets\n  \
         curl -H 'content-type: application/json' -d '{{\"title\":\"Printer on fire\"}}' {}api/tickets\n\
         Ctrl-C stops everything.",
        urls[1].1, urls[0].1
    );
    loop {
        for (name, child) in children.iter_mut() {
            if let Some(status) = child.try_wait()? {
                // Ctrl-C: the server and the trackers stop cleanly.
                if status.success() {
                    eprintln!("{name} stopped; stopping the demo");
                    return Ok(());
                }
                bail!("{name} exited with {status}");
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Wait until `addr` accepts connections, failing when one of the
/// demo's processes exits first.
fn wait_for_port(name: &str, addr: &str, children: &mut [(String, std::process::Child)]) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        for (child_name, child) in children.iter_mut() {
            if let Some(status) = child.try_wait()? {
                bail!("{child_name} exited with {status} before {name} listened on {addr} (is the port in use?)");
            }
        }
        if std::time::Instant::now() > deadline {
            bail!("{name} did not listen on {addr} within 30 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
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
/// anyhow; `ferry-client`'s library code reaches the store only through
/// `LocalDb` (see [`STORE_THROUGH_LOCALDB`]).
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
        problems.extend(layer_problems(&name, &manifest));
        for file in library_sources(&dir.join("src")) {
            let text = std::fs::read_to_string(&file)?;
            if text.contains("anyhow") {
                problems.push(format!(
                    "{} uses anyhow in library code; use a thiserror enum",
                    file.display()
                ));
            }
            if STORE_THROUGH_LOCALDB.contains(&name.as_str()) && text.contains(".store()") {
                problems.push(format!(
                    "{} calls .store(): ferry-client reaches the store only through LocalDb's own methods",
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

/// Crates whose library code reaches the store only through `LocalDb`
/// (its reads, `staging_area` and `apply_server_changes`), never through
/// `LocalDb::store()`: a text check for `.store()`.
const STORE_THROUGH_LOCALDB: &[&str] = &["ferry-client"];

/// Which workspace crates a crate may depend on (its `[dependencies]`;
/// dev-dependencies are free): the layering ARCHITECTURE.md describes.
/// Client-side crates never reach the server side or the other way round;
/// storage backends depend on their seam, never on what uses it. Crates
/// not listed (`ferry`, `ferry-sim`, `ferry-fuzz`: the umbrella and the
/// harnesses) may depend on anything.
const LAYERS: &[(&str, &[&str])] = &[
    ("ferry-core", &[]),
    ("ferry-store", &["ferry-core"]),
    ("ferry-protocol", &["ferry-core"]),
    ("ferry-query", &["ferry-core"]),
    ("ferry-conflict", &["ferry-core"]),
    ("ferry-sqlite", &["ferry-core", "ferry-store"]),
    ("ferry-sled", &["ferry-core", "ferry-store"]),
    ("ferry-queue", &["ferry-core", "ferry-store"]),
    ("ferry-transport", &["ferry-core", "ferry-protocol"]),
    ("ferry-http", &["ferry-core", "ferry-protocol", "ferry-transport"]),
    ("ferry-source", &["ferry-core", "ferry-conflict", "ferry-protocol"]),
    ("ferry-source-sqlite", &["ferry-core", "ferry-protocol", "ferry-source"]),
    ("ferry-postgres", &["ferry-core", "ferry-protocol", "ferry-source"]),
    (
        "ferry-client",
        &[
            "ferry-core",
            "ferry-store",
            "ferry-queue",
            "ferry-protocol",
            "ferry-transport",
            "ferry-query",
        ],
    ),
    (
        "ferry-server",
        &[
            "ferry-core",
            "ferry-conflict",
            "ferry-protocol",
            "ferry-transport",
            "ferry-http",
            "ferry-source",
            "ferry-source-sqlite",
            "ferry-postgres",
        ],
    ),
];

/// The workspace crates a manifest's `[dependencies]` names.
fn ferry_dependencies(manifest: &str) -> Vec<String> {
    let mut in_deps = false;
    let mut out = Vec::new();
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_deps = line == "[dependencies]";
            continue;
        }
        if in_deps && line.starts_with("ferry") {
            let name: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .collect();
            out.push(name);
        }
    }
    out
}

/// A crate's dependencies outside its layer.
fn layer_problems(name: &str, manifest: &str) -> Vec<String> {
    let Some((_, allowed)) = LAYERS.iter().find(|(c, _)| *c == name) else {
        return Vec::new();
    };
    ferry_dependencies(manifest)
        .into_iter()
        .filter(|d| !allowed.contains(&d.as_str()))
        .map(|d| {
            format!(
                "crates/{name} depends on {d}, outside its layer (allowed: {})",
                allowed.join(", ")
            )
        })
        .collect()
}

/// The fuzz targets: the files of `fuzz/fuzz_targets/`.
fn fuzz_targets() -> Result<Vec<String>> {
    let mut targets: Vec<String> = std::fs::read_dir("fuzz/fuzz_targets")
        .context("listing fuzz/fuzz_targets")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    targets.sort();
    Ok(targets)
}

/// What one libFuzzer run reported.
#[derive(Debug)]
struct FuzzRun {
    target: String,
    executions: Option<u64>,
    seconds: f64,
    crash: Option<String>,
}

/// `cargo` through rustup's proxy, so `+nightly` picks the toolchain (the
/// `CARGO` that runs xtask is the stable toolchain's own binary).
fn rustup_cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.env_remove("CARGO").env_remove("RUSTUP_TOOLCHAIN");
    cmd
}

/// Run one target for `seconds`, echoing libFuzzer's output and keeping its
/// final figures: `Done N runs in S second(s)`, or on a crash the executed
/// units of `-print_final_stats` and the artifact path.
fn fuzz_one(target: &str, seconds: u64) -> Result<FuzzRun> {
    let max_time = format!("-max_total_time={seconds}");
    let args = [
        "+nightly",
        "fuzz",
        "run",
        target,
        "--",
        &max_time,
        "-print_final_stats=1",
    ];
    eprintln!("$ cargo {}", args.join(" "));
    let mut child = rustup_cargo()
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .context("running cargo +nightly fuzz run")?;
    let stderr = child.stderr.take().context("libFuzzer's stderr")?;
    let mut run = FuzzRun {
        target: target.to_owned(),
        executions: None,
        seconds: 0.0,
        crash: None,
    };
    let mut started: Option<Instant> = None;
    let mut done_seconds = None;
    for line in BufReader::new(stderr).lines() {
        let line = line.context("reading libFuzzer's output")?;
        eprintln!("{line}");
        if started.is_none() && line.starts_with("INFO: Seed:") {
            started = Some(Instant::now());
        }
        if let Some(rest) = line.strip_prefix("Done ") {
            // "Done 123456 runs in 60 second(s)"
            let mut words = rest.split_whitespace();
            run.executions = words.next().and_then(|n| n.parse().ok());
            done_seconds = words.nth(2).and_then(|s| s.parse::<f64>().ok());
        }
        if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
            run.executions = run.executions.or_else(|| n.trim().parse().ok());
        }
        if let Some(path) = line.split("Test unit written to ").nth(1) {
            run.crash = Some(path.trim().to_owned());
        }
    }
    let status = child.wait().context("waiting for cargo fuzz")?;
    run.seconds = done_seconds.unwrap_or_else(|| started.map_or(0.0, |s| s.elapsed().as_secs_f64()));
    if !status.success() && run.crash.is_none() {
        if started.is_none() {
            bail!("cargo fuzz run {target} failed with {status} before fuzzing (build error?)");
        }
        run.crash = Some(format!("exit status {status}"));
    }
    Ok(run)
}

/// `cargo xtask fuzz [target] [--seconds S]`: install cargo-fuzz if needed,
/// then run one target or every target in turn, and print per target the
/// executions, the seconds and whether it crashed.
fn fuzz(args: &[String]) -> Result<()> {
    let mut seconds: u64 = 60;
    let mut only: Option<&str> = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--seconds" => {
                let s = rest.next().context("--seconds needs a number")?;
                seconds = s.parse().with_context(|| format!("--seconds {s:?} is not a number"))?;
            }
            a if a.starts_with('-') => bail!("unknown option {a:?} (usage: cargo xtask fuzz [target] [--seconds S])"),
            a if only.is_none() => only = Some(a),
            a => bail!("one target at most; got {a:?} after {:?}", only.unwrap_or_default()),
        }
    }
    let all = fuzz_targets()?;
    let targets: Vec<String> = match only {
        Some(t) if all.iter().any(|a| a == t) => vec![t.to_owned()],
        Some(t) => bail!("no fuzz target {t:?}; targets: {}", all.join(", ")),
        None => all,
    };
    let installed = rustup_cargo()
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        cargo(&["install", "cargo-fuzz", "--locked"])?;
    }
    let mut runs = Vec::new();
    for target in &targets {
        let run = fuzz_one(target, seconds)?;
        eprintln!(
            "fuzz: {}: {} executions in {:.0} s, {}",
            run.target,
            run.executions.map_or_else(|| "?".to_owned(), |n| n.to_string()),
            run.seconds,
            run.crash
                .as_deref()
                .map_or_else(|| "no crash".to_owned(), |c| format!("CRASH ({c})"))
        );
        runs.push(run);
    }
    eprintln!("\n{:<14} {:>12} {:>8}  result", "target", "executions", "seconds");
    for r in &runs {
        eprintln!(
            "{:<14} {:>12} {:>8.0}  {}",
            r.target,
            r.executions.map_or_else(|| "?".to_owned(), |n| n.to_string()),
            r.seconds,
            r.crash.as_deref().unwrap_or("ok")
        );
    }
    let crashed = runs.iter().filter(|r| r.crash.is_some()).count();
    if crashed > 0 {
        bail!("{crashed} fuzz target(s) crashed; inputs under fuzz/artifacts/");
    }
    Ok(())
}

#[cfg(test)]
mod layer_tests {
    use super::{ferry_dependencies, layer_problems};

    #[test]
    fn a_backend_that_depends_on_the_server_is_refused() {
        let manifest = "[package]\nname = \"x\"\n[dependencies]\nferry-core.workspace = true\n\
                        ferry-server = { workspace = true }\n[dev-dependencies]\nferry-client.workspace = true\n";
        assert_eq!(ferry_dependencies(manifest), vec!["ferry-core", "ferry-server"]);
        let problems = layer_problems("ferry-postgres", manifest);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("depends on ferry-server"), "{problems:?}");
        assert!(layer_problems("ferry-sim", manifest).is_empty(), "harnesses are free");
    }
}
