//! The built binary: `serve --admin-token` and `inspect` reading the
//! running server's admin API (buckets, a user's buckets, a client,
//! metrics); a wrong token is refused with the server's message.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const ADMIN: &str = "inspect-admin-token-0123456789";
const SECRET: &str = "inspect-secret";

fn http(addr: &str, request: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(request.as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn inspect(exe: &str, addr: &str, token: &str, args: &[&str]) -> anyhow::Result<Output> {
    Ok(Command::new(exe)
        .args(["inspect", "--server", &format!("http://{addr}")])
        .args(args)
        .env("FERRY_ADMIN_TOKEN", token)
        .output()?)
}

fn stdout_of(out: &Output) -> String {
    assert!(
        out.status.success(),
        "inspect failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn inspect_prints_a_running_servers_diagnostics() -> anyhow::Result<()> {
    let exe = env!("CARGO_BIN_EXE_ferry-server");
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(exe)
        .args(["serve", "--listen", &addr, "--data-dir"])
        .arg(dir.path())
        .env("FERRY_JWT_SECRET", SECRET)
        .env("FERRY_ADMIN_TOKEN", ADMIN)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let result = (|| -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            match http(&addr, "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") {
                Ok(r) if r.starts_with("HTTP/1.1 200") => break,
                _ if start.elapsed() < Duration::from_secs(20) => std::thread::sleep(Duration::from_millis(50)),
                other => anyhow::bail!("the server did not start: {other:?}"),
            }
        }
        let token = ferry_server::mint_token(SECRET, "u1", 600, &serde_json::Map::new());
        let put =
            |seq: u64, table: &str, id: &str, data: &[(&str, ferry_core::Value)]| ferry_protocol::UploadTransaction {
                tx_id: seq,
                ops: vec![ferry_core::CrudEntry {
                    seq,
                    tx_id: seq,
                    op: ferry_core::CrudOp::Put {
                        table: table.into(),
                        id: id.into(),
                        data: data.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect(),
                    },
                    previous: None,
                    metadata: None,
                    hlc: None,
                }],
            };
        let request = ferry_protocol::UploadRequest {
            client_id: "c1".into(),
            transactions: vec![
                put(
                    1,
                    "tickets",
                    "t1",
                    &[("title", "a".into()), ("status", "open".into()), ("version", 1.into())],
                ),
                put(2, "activity", "x1", &[("op", "x".into())]),
            ],
        };
        let body = serde_json::to_string(&request)?;
        let answer = http(
            &addr,
            &format!(
                "POST /sync/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        )?;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.contains("\"applied\"") && answer.contains("\"rejected\""),
            "{answer}"
        );

        let buckets = stdout_of(&inspect(exe, &addr, ADMIN, &["buckets"])?);
        assert!(buckets.contains("1 buckets"), "{buckets}");
        let line = buckets
            .lines()
            .find(|l| l.starts_with("global[]"))
            .unwrap_or_else(|| panic!("no global bucket in:\n{buckets}"));
        assert_eq!(line.split_whitespace().nth(1), Some("1"), "{line}");

        let user = stdout_of(&inspect(exe, &addr, ADMIN, &["user", "u1"])?);
        assert!(user.starts_with("user u1;"), "{user}");
        assert!(user.contains("my_assignments[\"u1\"]"), "{user}");

        let client = stdout_of(&inspect(exe, &addr, ADMIN, &["client", "c1"])?);
        assert!(client.contains("user u1"), "{client}");
        assert!(client.contains("last seq 2"), "{client}");
        assert!(client.contains("seq        1  applied"), "{client}");
        assert!(client.contains("seq        2  rejected: permission denied"), "{client}");

        let json = stdout_of(&inspect(
            exe,
            &addr,
            ADMIN,
            &["--json", "client", "c1", "--limit", "1"],
        )?);
        let v: serde_json::Value = serde_json::from_str(&json)?;
        assert_eq!(v["user_id"], "u1");
        assert_eq!(v["outcomes"].as_array().map(Vec::len), Some(1));
        assert_eq!(v["next_after_seq"], 1);

        let metrics = stdout_of(&inspect(exe, &addr, ADMIN, &["metrics"])?);
        assert!(metrics.contains("ferry_ops_total{outcome=\"applied\"} 1"), "{metrics}");
        assert!(metrics.contains("ferry_ops_total{outcome=\"rejected\"} 1"), "{metrics}");

        // A wrong token, a user's token, a limit over the maximum.
        for bad in ["wrong-admin-token", &token[..]] {
            let out = inspect(exe, &addr, bad, &["buckets"])?;
            assert!(!out.status.success());
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("401") && err.contains("wrong admin token"), "{err}");
            assert!(out.stdout.is_empty());
        }
        let out = inspect(exe, &addr, ADMIN, &["buckets", "--limit", "5000"])?;
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("limit 5000 is outside 1..=1000"), "{err}");
        // An unknown client.
        let out = inspect(exe, &addr, ADMIN, &["client", "nobody"])?;
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("never uploaded"));
        Ok(())
    })();
    child.kill()?;
    child.wait()?;
    result
}
