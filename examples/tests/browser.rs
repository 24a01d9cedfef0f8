//! The tracker in real Chromium: this test starts a real `ferry-server`
//! binary and two `tracker` processes (alice and bob) on free loopback
//! ports, then runs `node examples/browser-tests/tracker.test.mjs`, which
//! drives Chromium with puppeteer-core through the scenarios of issue 12
//! (live updates, last write wins after an offline edit, the server
//! killed and restarted, bad form input) and saves a screenshot of each
//! step under `target/browser-screenshots/<suite>/` (logs of the three processes
//! next to them); a second script, `strategies.test.mjs`, runs the
//! blog's other strategies against `examples/tracker-strategies.toml`,
//! `crdt.test.mjs` the CRDT description, `initial-sync.test.mjs` the
//! download progress of a third device's initial sync and
//! `untrusted.test.mjs` rows another user wrote straight to the sync API
//! (the script gets `SERVER_URL` and a token of that user, `MALLORY_TOKEN`).
//!
//! Needs Chromium (`/usr/bin/chromium`, or `FERRY_CHROMIUM`), Node and
//! the npm packages of `examples/browser-tests` (`npm ci` there);
//! `.ci/run` installs them. Missing ones fail the test with a message:
//! it never skips.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

type Result<T> = anyhow::Result<T>;

/// A child process killed when dropped.
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from(".."), Path::to_path_buf)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_for_port(proc: &mut Proc, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Some(status) = proc.child.try_wait()? {
            anyhow::bail!("{} exited with {status} before listening on port {port}", proc.name);
        }
        if Instant::now() > deadline {
            anyhow::bail!("{} did not listen on port {port} within 60 s", proc.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn(name: &str, program: &Path, args: &[String], log: &Path) -> Result<Proc> {
    let out = File::options().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting {}: {e}", program.display()))?;
    Ok(Proc {
        name: name.to_owned(),
        child,
    })
}

/// `ferry-server` is another package's binary: build it (as the demo
/// does) next to this package's `tracker`.
fn ferry_server_bin(tracker: &Path) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "ferry-server", "--bin", "ferry-server"])
        .current_dir(workspace_root());
    let profile_dir = tracker.parent().map(Path::to_path_buf).unwrap_or_default();
    if profile_dir.ends_with("release") {
        cmd.arg("--release");
    }
    let status = cmd.status()?;
    anyhow::ensure!(status.success(), "cargo build -p ferry-server failed with {status}");
    let bin = profile_dir.join(format!("ferry-server{}", std::env::consts::EXE_SUFFIX));
    anyhow::ensure!(bin.exists(), "no ferry-server binary at {}", bin.display());
    Ok(bin)
}

/// What the browser tests need, or a message saying how to get it.
fn check_prerequisites(tests_dir: &Path) -> Result<PathBuf> {
    let chromium = std::env::var_os("FERRY_CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    anyhow::ensure!(
        chromium.exists(),
        "Chromium is not installed at {} (the browser tests need it): `apt-get install -y chromium` \
         (Debian's package; .ci/run installs it), or set FERRY_CHROMIUM",
        chromium.display()
    );
    let node = Command::new("node").arg("--version").output();
    anyhow::ensure!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "node does not run (the browser tests need Node 20 or newer): {node:?}"
    );
    let puppeteer = tests_dir
        .join("node_modules")
        .join("puppeteer-core")
        .join("package.json");
    anyhow::ensure!(
        puppeteer.exists(),
        "{} is missing: run `npm ci` in {} (.ci/run does)",
        puppeteer.display(),
        tests_dir.display()
    );
    Ok(chromium)
}

/// One browser test script against a fresh server and two trackers.
struct Suite {
    /// Its folder under `target/browser-screenshots/`.
    name: &'static str,
    /// The script in `examples/browser-tests`.
    script: &'static str,
    /// A sync rules file (relative to the workspace) for `ferry-server`
    /// and the trackers.
    rules: Option<&'static str>,
    /// Start bob's tracker with `--restricted`.
    bob_restricted: bool,
    /// A `ferry-server` config file's text (`--config`).
    server_config: Option<&'static str>,
}

/// The suites share the machine's two cores: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn tracker_in_chromium() -> Result<()> {
    run_suite(&Suite {
        name: "tracker",
        script: "tracker.test.mjs",
        rules: None,
        bob_restricted: false,
        server_config: None,
    })
}

/// The conflict strategies of the blog post: ferry-server on
/// `examples/tracker-strategies.toml` (domain rule on status, manual
/// resolution of descriptions, the audit log) and bob's tracker with the
/// offline restrictions.
#[test]
fn tracker_strategies_in_chromium() -> Result<()> {
    run_suite(&Suite {
        name: "strategies",
        script: "strategies.test.mjs",
        rules: Some("examples/tracker-strategies.toml"),
        bob_restricted: true,
        server_config: None,
    })
}

/// CRDT descriptions: ferry-server and both trackers on
/// `examples/tracker-crdt.toml`; concurrent offline edits of a
/// description both survive.
#[test]
fn tracker_crdt_in_chromium() -> Result<()> {
    run_suite(&Suite {
        name: "crdt",
        script: "crdt.test.mjs",
        rules: Some("examples/tracker-crdt.toml"),
        bob_restricted: false,
        server_config: None,
    })
}

/// Initial sync progress: alice fills the server with tickets, then a
/// third device, carol, starts offline and syncs from its page, which
/// shows the download's progress; the server sends few ops per line so
/// the download takes a while.
#[test]
fn tracker_initial_sync_in_chromium() -> Result<()> {
    run_suite(&Suite {
        name: "initial-sync",
        script: "initial-sync.test.mjs",
        rules: None,
        bob_restricted: false,
        server_config: Some("max_ops_per_line = 5\n"),
    })
}

/// Rows other users wrote are untrusted on the page: mallory writes
/// attachments straight to ferry-server's sync API (a `javascript:` url,
/// an id that reads as a path) and alice's page must not turn them into
/// something that runs or a request to another endpoint.
#[test]
fn tracker_untrusted_rows_in_chromium() -> Result<()> {
    run_suite(&Suite {
        name: "untrusted",
        script: "untrusted.test.mjs",
        rules: None,
        bob_restricted: false,
        server_config: None,
    })
}

/// A dev token of `user` from the `ferry-server` binary.
fn dev_token(server_bin: &Path, user: &str) -> Result<String> {
    let out = Command::new(server_bin).args(["dev-token", "--user", user]).output()?;
    anyhow::ensure!(out.status.success(), "ferry-server dev-token failed: {out:?}");
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

fn run_suite(suite: &Suite) -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let root = workspace_root();
    let tests_dir = root.join("examples").join("browser-tests");
    let chromium = check_prerequisites(&tests_dir)?;
    let tracker = PathBuf::from(env!("CARGO_BIN_EXE_tracker"));
    let server_bin = ferry_server_bin(&tracker)?;

    let target = tracker
        .parent()
        .and_then(Path::parent)
        .map_or_else(|| root.join("target"), Path::to_path_buf);
    let out = target.join("browser-screenshots").join(suite.name);
    if out.exists() {
        std::fs::remove_dir_all(&out)?;
    }
    std::fs::create_dir_all(&out)?;
    let data = tempfile::tempdir()?;

    let server_port = free_port()?;
    let mut server_args = vec![
        "serve".to_owned(),
        "--data-dir".to_owned(),
        data.path().join("server").display().to_string(),
        "--listen".to_owned(),
        format!("127.0.0.1:{server_port}"),
    ];
    if let Some(rules) = suite.rules {
        server_args.push("--rules".to_owned());
        server_args.push(root.join(rules).display().to_string());
    }
    if let Some(text) = suite.server_config {
        let file = data.path().join("ferry-server.toml");
        std::fs::write(&file, text)?;
        server_args.push("--config".to_owned());
        server_args.push(file.display().to_string());
    }
    let start_server = || -> Result<Proc> {
        let mut p = spawn("ferry-server", &server_bin, &server_args, &out.join("ferry-server.log"))?;
        wait_for_port(&mut p, server_port)?;
        Ok(p)
    };
    let mut server = Some(start_server()?);
    let start_tracker = |user: &str, extra: &[&str]| -> Result<(Proc, String)> {
        let port = free_port()?;
        let mut args = vec![
            "--server".to_owned(),
            format!("http://127.0.0.1:{server_port}"),
            "--user".to_owned(),
            user.to_owned(),
            "--port".to_owned(),
            port.to_string(),
            "--data-dir".to_owned(),
            data.path().join(user).display().to_string(),
        ];
        if let Some(rules) = suite.rules {
            args.push("--rules".to_owned());
            args.push(root.join(rules).display().to_string());
        }
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let mut p = spawn(
            &format!("{user}'s tracker"),
            &tracker,
            &args,
            &out.join(format!("{user}.log")),
        )?;
        wait_for_port(&mut p, port)?;
        Ok((p, format!("http://127.0.0.1:{port}/")))
    };
    let mut trackers = Vec::new();
    let mut urls = Vec::new();
    for user in ["alice", "bob"] {
        let extra: &[&str] = if user == "bob" && suite.bob_restricted {
            &["--restricted"]
        } else {
            &[]
        };
        let (p, url) = start_tracker(user, extra)?;
        trackers.push(p);
        urls.push(url);
    }

    let mut node = Command::new("node")
        .arg(suite.script)
        .current_dir(&tests_dir)
        .env("ALICE_URL", &urls[0])
        .env("BOB_URL", &urls[1])
        .env("SERVER_URL", format!("http://127.0.0.1:{server_port}"))
        .env("MALLORY_TOKEN", dev_token(&server_bin, "mallory")?)
        .env("CHROMIUM", &chromium)
        .env("SCREENSHOT_DIR", &out)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdin = node.stdin.take().ok_or_else(|| anyhow::anyhow!("no stdin"))?;
    let stdout = node.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut failures = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        match line.trim() {
            "@@server stop" => {
                if let Some(mut s) = server.take() {
                    s.stop();
                }
                writeln!(stdin, "@@ok")?;
            }
            "@@server start" => {
                server = Some(start_server()?);
                writeln!(stdin, "@@ok")?;
            }
            l if l.starts_with("@@tracker start ") => {
                // `@@tracker start <user> [flags]`: a further device.
                let mut words = l.split_whitespace().skip(2);
                let user = words.next().unwrap_or("carol").to_owned();
                let flags: Vec<&str> = words.collect();
                let (p, url) = start_tracker(&user, &flags)?;
                trackers.push(p);
                writeln!(stdin, "@@ok {url}")?;
            }
            l if l.starts_with("not ok") => failures.push(line.clone()),
            _ => {}
        }
    }
    let status = node.wait()?;
    drop(trackers);
    drop(server);
    println!("screenshots and process logs: {}", out.display());
    anyhow::ensure!(
        status.success() && failures.is_empty(),
        "the browser tests of {} failed ({status}): {failures:?}; screenshots and logs in {}",
        suite.script,
        out.display()
    );
    Ok(())
}
