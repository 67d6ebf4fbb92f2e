//! The metrics endpoint of the real daemon, read over plain HTTP/1.1 as Prometheus and the
//! kubelet's probes do: what `kvd-ctl status` knows, latency histograms of the operations
//! served, health and readiness, and clear answers to requests it does not serve.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use kvd_client::BlockKey;
use kvd_tests::redis::free_port;
use kvd_tests::{pattern, test_namespace, Daemon};

/// Sends `request` raw; returns (status code, body).
fn http(port: u16, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(request.as_bytes()).expect("send");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

fn get(port: u16, path: &str) -> (u16, String) {
    http(
        port,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
}

/// The value of the sample line starting with `series` (name and labels), if present.
fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn key(i: u64) -> BlockKey {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&i.to_le_bytes());
    k[31] = 0x3E;
    BlockKey(k)
}

#[test]
fn metrics_health_and_readiness_over_http() {
    let port = free_port();
    let listen = format!("metrics.listen=127.0.0.1:{port}");
    let d = Daemon::start(&[&listen]);
    d.expect_log("metrics: /metrics /healthz /readyz");
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("metrics")).expect("ns");
    for i in 0..3 {
        c.put(&ns, &key(i), &pattern(1, i, 10_000)).expect("put");
    }
    for i in 0..5 {
        let _ = c.get(&ns, &key(i)).expect("get");
    }
    c.lookup(&ns.id, &[key(0), key(1), key(9)]).expect("lookup");
    c.flush().expect("flush");

    let (code, body) = get(port, "/metrics");
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        value(&body, "kvd_tier_blocks{tier=\"dram\"}"),
        Some(3.0),
        "{body}"
    );
    assert_eq!(
        value(&body, "kvd_hits_total{tier=\"dram\"}"),
        Some(3.0),
        "{body}"
    );
    assert_eq!(
        value(&body, "kvd_misses_total{tier=\"dram\"}"),
        Some(2.0),
        "{body}"
    );
    assert_eq!(
        value(&body, "kvd_tier_used_bytes{tier=\"dram\"}"),
        Some(3.0 * 12_288.0),
        "{body}"
    );
    assert_eq!(
        value(&body, "kvd_op_duration_seconds_count{op=\"commit\"}"),
        Some(3.0),
        "{body}"
    );
    assert_eq!(
        value(&body, "kvd_op_duration_seconds_count{op=\"get\"}"),
        Some(3.0),
        "{body}"
    );
    assert_eq!(
        value(&body, "kvd_op_duration_seconds_count{op=\"lookup\"}"),
        Some(1.0),
        "{body}"
    );
    assert!(
        value(&body, "kvd_clients").is_some_and(|n| n >= 1.0),
        "{body}"
    );
    assert!(body.contains("# TYPE kvd_hits counter"), "{body}");
    assert!(body.ends_with("# EOF\n"), "{body}");

    assert_eq!(get(port, "/healthz"), (200, "ok\n".into()));
    assert_eq!(get(port, "/readyz"), (200, "ready\n".into()));
    assert_eq!(get(port, "/nothing").0, 404);
    let (code, _) = http(
        port,
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(code, 405);
    // Not HTTP at all: refused, and the endpoint keeps serving.
    let (code, _) = http(port, "\x00\x01garbage\r\n\r\n");
    assert_eq!(code, 400);
    // A request head larger than the endpoint reads is refused too.
    let big = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    assert_ne!(http(port, &big).0, 200);
    assert_eq!(get(port, "/healthz").0, 200);
}

#[test]
fn bad_metrics_address_fails_the_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let out = std::process::Command::new(kvd_tests::bin("kvd"))
        .args(["--socket", "/tmp/kvd-metrics-never.sock"])
        .args(["--set", &format!("metrics.listen=127.0.0.1:{port}")])
        .args(["--set", "dram.arena_bytes=64MiB"])
        .output()
        .expect("run kvd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "cannot bind the metrics endpoint 127.0.0.1:{port}"
        )),
        "{err}"
    );
}

/// Every series the example Grafana dashboard queries exists in a daemon's /metrics (with
/// every optional part on), so the dashboard does not silently show "no data".
#[test]
fn the_grafana_dashboard_only_queries_series_kvd_exports() {
    let Some(redis) = kvd_tests::redis::Redis::start(None) else {
        return;
    };
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/grafana/kvd-dashboard.json"
    ))
    .expect("dashboard");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut names = std::collections::BTreeSet::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            for tok in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if tok.starts_with("kvd_") {
                    names.insert(tok.to_owned());
                }
            }
        }
    }
    assert!(names.len() >= 15, "{names:?}");

    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut sets = kvd_tests::disk_sets(dir.path(), "64MiB", "0");
    sets.extend([
        format!("metrics.listen=127.0.0.1:{port}"),
        format!("index.redis_urls={}", redis.url()),
        format!("peer.listen=127.0.0.1:{}", free_port()),
        format!(
            "events.endpoint=ipc://{}",
            dir.path().join("ev.ipc").display()
        ),
    ]);
    let d = kvd_tests::start_with(&sets);
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("dash")).expect("ns");
    c.put(&ns, &key(1), &pattern(2, 1, 8000)).expect("put");
    let _ = c.get(&ns, &key(1)).expect("get");
    c.lookup(&ns.id, &[key(1)]).expect("lookup");
    let (code, body) = get(port, "/metrics");
    assert_eq!(code, 200);
    for n in &names {
        let present = body.lines().any(|l| {
            l.strip_prefix(n.as_str())
                .is_some_and(|r| r.starts_with([' ', '{']))
        });
        assert!(
            present,
            "the dashboard queries {n}, which /metrics does not have:\n{body}"
        );
    }
}
