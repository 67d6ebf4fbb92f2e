//! The metrics endpoint of the real daemon, read over plain HTTP/1.1 as Prometheus and the
//! kubelet's probes do: what `kvd-ctl status` knows, latency histograms of the operations
//! served, ring queue depths, health and readiness (503 during the shutdown drain), clear
//! answers to requests it does not serve, and a data path that stalled scrapers cannot hold up.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use kvd_client::BlockKey;
use kvd_proto::ring::{Op, Submission};
use kvd_tests::redis::free_port;
use kvd_tests::{http_get as get, http_request as http, pattern, test_namespace, Daemon};

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
        value(&body, "kvd_tier_in_bytes_total{tier=\"dram\"}"),
        Some(3.0 * 10_000.0),
        "{body}"
    );
    assert_eq!(
        value(&body, "kvd_tier_out_bytes_total{tier=\"dram\"}"),
        Some(3.0 * 10_000.0),
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
        "peer.tls=off".into(),
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

#[test]
fn ring_queue_depths_are_exported_per_client() {
    let port = free_port();
    let listen = format!("metrics.listen=127.0.0.1:{port}");
    let d = Daemon::start(&[&listen]);
    // A raw client (no kvd-client): it can leave completions unreaped.
    let (_ctl, mut ring, h) = kvd_tests::raw_client(&d, "slow-reaper", "depth");
    // Five submissions the client never reaps: kvd answers them all, and the answers wait
    // in the completion queue.
    for i in 0..5 {
        assert!(ring.push(&Submission::new(Op::Nop, h, i)).expect("push"));
    }
    ring.notify();
    let admin = d.admin();
    let id = kvd_tests::wait_for("5 completions waiting", Duration::from_secs(10), || {
        let s = admin.stats().ok()?;
        let c = s.clients.iter().find(|c| c.name == "slow-reaper")?;
        (c.cq_depth == 5 && c.sq_depth == 0).then_some(c.id)
    });
    let (_, body) = get(port, "/metrics");
    let cq = format!("kvd_ring_completion_queue_depth{{client=\"{id}\"}}");
    let sq = format!("kvd_ring_submission_queue_depth{{client=\"{id}\"}}");
    assert_eq!(value(&body, &cq), Some(5.0), "{body}");
    assert_eq!(value(&body, &sq), Some(0.0), "{body}");
    let status: serde_json::Value =
        serde_json::from_str(&d.ctl(&["status", "--json"])).expect("json");
    let me = status["clients"]
        .as_array()
        .expect("clients")
        .iter()
        .find(|c| c["id"] == id)
        .cloned()
        .expect("listed");
    assert_eq!(
        (me["cq_depth"].clone(), me["sq_depth"].clone()),
        (5.into(), 0.into())
    );
    // Reaped: the depth falls back to zero.
    for _ in 0..5 {
        ring.pop().expect("a completion");
    }
    let (_, body) = get(port, "/metrics");
    assert_eq!(value(&body, &cq), Some(0.0), "{body}");
}

#[test]
fn readiness_turns_503_while_the_shutdown_drain_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut sets = kvd_tests::disk_sets(dir.path(), "256MiB", "0.99");
    sets.push(format!("metrics.listen=127.0.0.1:{port}"));
    sets.push("dram.arena_bytes=128MiB".into());
    let mut d = kvd_tests::start_with(&sets);
    {
        let c = d.admin();
        let ns = c.open_namespace(&test_namespace("ready")).expect("ns");
        // ~96 MiB that only DRAM holds: the shutdown drain has real work to do.
        for i in 0..96 {
            c.put(&ns, &key(i), &pattern(2, i, 1 << 20)).expect("put");
        }
        c.flush().expect("flush");
    }
    assert_eq!(get(port, "/readyz").0, 200);
    let pid = d.child.id() as i32;
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let mut seen = Vec::new();
    let t = std::time::Instant::now();
    // Until the endpoint goes away with the process (bounded by the hang guard).
    while t.elapsed() < Duration::from_secs(60) {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
            break;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        if let Some(code) = out.split_whitespace().nth(1) {
            seen.push(code.to_owned());
        }
    }
    assert!(seen.iter().any(|c| c == "503"), "never saw 503: {seen:?}");
    let first = seen.iter().position(|c| c == "503").expect("a 503");
    assert!(
        seen[first..].iter().all(|c| c == "503"),
        "ready again after shutdown began: {seen:?}"
    );
    assert!(d
        .terminate(Duration::from_secs(30))
        .is_some_and(|s| s.success()));
    d.expect_log("shutdown drain: DRAM blocks written to disk");
}

#[test]
fn stalled_scrapes_never_hold_up_the_data_path() {
    let port = free_port();
    let listen = format!("metrics.listen=127.0.0.1:{port}");
    let d = Daemon::start(&[&listen]);
    // More scrapers than the endpoint serves at once, each stuck halfway through its
    // request head.
    let stalled: Vec<TcpStream> = (0..24)
        .filter_map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").ok()?;
            Some(s)
        })
        .collect();
    assert!(!stalled.is_empty());
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("stalled")).expect("ns");
    for i in 0..200 {
        let data = pattern(3, i, 64 << 10);
        c.put(&ns, &key(i), &data).expect("put");
        let got = c.get(&ns, &key(i)).expect("get").expect("hit");
        assert!(got[..] == data[..], "block {i}");
    }
    assert_eq!(
        c.lookup(&ns.id, &[key(0), key(199)])
            .expect("lookup")
            .prefix_len,
        2
    );
    drop(stalled);
    // And the endpoint itself recovers once they are gone.
    let body = kvd_tests::wait_for("a scrape", Duration::from_secs(30), || {
        let (code, body) = get(port, "/metrics");
        (code == 200).then_some(body)
    });
    assert_eq!(value(&body, "kvd_tier_blocks{tier=\"dram\"}"), Some(200.0));
}

/// A flood of idle connections (from another address, then from the prober's own) neither
/// delays a probe nor outlives the header deadline. (40 idle connections used to make
/// `/healthz` take 19.5 s.)
#[test]
fn probes_are_answered_through_a_flood_of_idle_connections() {
    let port = free_port();
    let d = Daemon::start(&[&format!("metrics.listen=127.0.0.1:{port}")]);
    d.expect_log("metrics: /metrics /healthz /readyz");
    let flood = kvd_tests::idle_flood(port, 200);
    assert!(flood.len() >= 100, "{} connected", flood.len());
    let t = std::time::Instant::now();
    let (code, _) = get(port, "/healthz");
    assert_eq!(code, 200);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // Idle connections are closed at the 2 s header deadline: the flooding address itself is
    // served again afterwards.
    std::thread::sleep(Duration::from_secs(3));
    let mut s = kvd_tests::connect_from([127, 0, 0, 2], port).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    use std::io::{Read, Write};
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    drop(flood);
}
