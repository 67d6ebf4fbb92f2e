//! End-to-end tests of the real `kvd` binary driven by real client processes.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvd_client::{BlockKey, ClientError, PutOutcome};
use kvd_proto::ring::Status;
use kvd_tests::{bin, pattern, test_namespace, Daemon};

fn key(i: u64) -> BlockKey {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&i.to_le_bytes());
    k[31] = 0x5A;
    BlockKey(k)
}

/// Two client processes concurrently put and verify overlapping and distinct blocks.
#[test]
fn two_client_processes_concurrently() {
    let d = Daemon::start(&[]);
    let spawn = |seed: &str| {
        Command::new(bin("kvd-test-client"))
            .arg("--socket")
            .arg(&d.socket)
            .args([
                "--mode",
                "churn",
                "--seed",
                seed,
                "--blocks",
                "96",
                "--iterations",
                "6",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn client")
    };
    // Two with the same seed (racing on the same keys) and one with another.
    let kids = [spawn("7"), spawn("7"), spawn("8")];
    for k in kids {
        let out = k.wait_with_output().expect("wait client");
        assert!(
            out.status.success(),
            "client failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("client prints JSON");
        assert!(v["verified"].as_u64().unwrap_or(0) > 0, "{v}");
    }
    let s = d.admin().stats().expect("stats");
    let ns = &s.namespaces[0];
    assert_eq!(
        (ns.leases, ns.reserved),
        (0, 0),
        "clients left nothing behind: {ns:?}"
    );
    assert!(ns.blocks > 0 && ns.hits > 0);
}

/// Killing clients mid-PUT (holding reservations) and mid-GET (holding leases), 100 times,
/// never leaks a slot or a lease.
#[test]
fn killed_clients_release_everything() {
    let d = Daemon::start(&[]);
    let admin = d.admin();
    let mut rng = 0x1234_5678u64;
    for i in 0..100 {
        let mode = if i % 2 == 0 { "hold-put" } else { "hold-get" };
        let mut child = Command::new(bin("kvd-test-client"))
            .arg("--socket")
            .arg(&d.socket)
            .args([
                "--mode",
                mode,
                "--seed",
                &format!("{}", 100 + i % 7),
                "--blocks",
                "32",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("read ready");
        assert_eq!(line.trim(), "ready", "iteration {i}");
        let s = admin.stats().expect("stats");
        let held: u64 = s.namespaces.iter().map(|n| n.leases + n.reserved).sum();
        assert!(
            held > 0,
            "iteration {i}: the client holds nothing before the kill"
        );
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_micros(rng % 5000));
        child.kill().expect("kill -9");
        child.wait().expect("reap");
        let t = Instant::now();
        loop {
            let s = admin.stats().expect("stats");
            let held: u64 = s.namespaces.iter().map(|n| n.leases + n.reserved).sum();
            let others = s.clients.iter().filter(|c| c.name != "test-admin").count();
            if held == 0 && others == 0 {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "iteration {i}: still held {held}, clients {others}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // With everything released, evicting all blocks must return every byte: no slot leaked.
    admin.evict(None, &[]).expect("evict all");
    let s = admin.stats().expect("stats");
    for n in &s.namespaces {
        assert_eq!((n.used_bytes, n.blocks), (0, 0), "leaked slots: {n:?}");
    }
}

#[test]
fn put_get_lookup_pin_delete_through_the_api() {
    let d = Daemon::start(&[]);
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("api")).expect("open");
    let keys: Vec<BlockKey> = (0..8).map(key).collect();
    let data: Vec<Vec<u8>> = (0..8).map(|i| pattern(9, i, 40_000 + i as usize)).collect();
    let items: Vec<(BlockKey, &[u8])> = keys.iter().zip(&data).map(|(k, d)| (*k, &d[..])).collect();
    assert!(c
        .put_many(&ns, &items[..5])
        .expect("put")
        .iter()
        .all(|o| *o == PutOutcome::Stored));
    assert_eq!(
        c.put(&ns, &keys[0], &data[0]).expect("put"),
        PutOutcome::Exists
    );
    let l = c.lookup(&ns.id, &keys).expect("lookup");
    assert_eq!(l.prefix_len, 5);
    assert_eq!(l.tiers.get(kvd_client::Tier::Dram), 5);
    let got = c.get_many(&ns, &keys).expect("get");
    for (i, g) in got.iter().enumerate() {
        match g {
            Some(lease) => {
                assert_eq!(&lease[..], &data[i][..]);
                assert_ne!(lease.verify(), Some(false));
            }
            None => assert!(i >= 5),
        }
    }
    drop(got);
    let mut buf = vec![0u8; 64 << 10];
    assert_eq!(
        c.get_into(&ns, &keys[2], &mut buf).expect("get_into"),
        Some(data[2].len())
    );
    assert_eq!(&buf[..data[2].len()], &data[2][..]);
    // Checksums are sealed off the request path, shortly after commit; a block being sealed is
    // held like a read, so wait for all of them before testing eviction.
    for k in &keys[..5] {
        let t = Instant::now();
        let lease = loop {
            let l = c.get(&ns, k).expect("get").expect("hit");
            if l.checksum().is_some() {
                break l;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "block never sealed");
            drop(l);
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(lease.verify(), Some(true));
    }
    c.flush().expect("releases applied");
    assert_eq!(c.pin(&ns.id, &keys[..2]).expect("pin"), 2);
    assert_eq!(
        c.evict(Some(ns.id), &[]).expect("evict"),
        3,
        "pinned blocks survive evict"
    );
    assert_eq!(c.lookup(&ns.id, &keys).expect("lookup").prefix_len, 2);
    let info = c.inspect(&keys[0]).expect("inspect");
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].pins, 1);
    assert_eq!(info[0].checksum, kvd_client::kvd_checksum(&data[0]));
    assert_eq!(c.unpin(&ns.id, &keys[..2]).expect("unpin"), 2);
    assert_eq!(c.delete(&ns.id, &keys).expect("delete"), 2);
    assert_eq!(c.lookup(&ns.id, &keys).expect("lookup").prefix_len, 0);
    c.nop().expect("nop");
}

#[test]
fn limits_give_typed_errors() {
    let d = Daemon::start(&["dram.arena_bytes=16MiB"]);
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("limits")).expect("open");
    // Larger than dram.max_block_bytes.
    let e = c.put(&ns, &key(1), &vec![0u8; (4 << 20) + 1]).unwrap_err();
    assert_eq!(e.status(), Some(Status::TooLarge), "{e}");
    // Fill with pinned blocks until the arena is exhausted: "cache full", not a hang.
    let mut i = 0;
    let full = loop {
        match c.put(&ns, &key(100 + i), &pattern(1, i, 1 << 20)) {
            Ok(_) => {
                c.pin(&ns.id, &[key(100 + i)]).expect("pin");
                i += 1;
                assert!(i < 100, "arena never filled");
            }
            Err(e) => break e,
        }
    };
    assert_eq!(full.status(), Some(Status::CacheFull), "{full}");
    assert!(full.is_retryable());
    // Once unpinned, eviction makes room again.
    let all: Vec<_> = (100..100 + i).map(key).collect();
    c.unpin(&ns.id, &all).expect("unpin");
    c.put(&ns, &key(1), &pattern(1, 1, 1 << 20))
        .expect("put after unpin");
    // Another namespace's id is refused for a non-admin client that did not open it.
    let plain = kvd_client::Client::connect(&d.socket).expect("connect");
    let e = plain.lookup(&ns.id, &[key(1)]).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Server {
                code: kvd_proto::ErrorCode::UnknownNamespace,
                ..
            }
        ),
        "{e}"
    );
    // Non-admins may not list.
    assert!(matches!(
        plain.list(None, None, 10),
        Err(ClientError::Server {
            code: kvd_proto::ErrorCode::Unauthorized,
            ..
        })
    ));
    // More namespaces than arenas: a clear error.
    plain
        .open_namespace(&test_namespace("second"))
        .expect("second ns");
    let e = plain.open_namespace(&test_namespace("third")).unwrap_err();
    assert!(e.to_string().contains("max_namespaces"), "{e}");
}

#[test]
fn not_running_error_names_the_socket() {
    let e = kvd_client::Client::connect("/nonexistent/kvd.sock").unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("/nonexistent/kvd.sock") && msg.contains("start it"),
        "{msg}"
    );
    assert!(e.is_retryable());
}

#[test]
fn sigterm_shuts_down_cleanly_and_removes_the_socket() {
    let mut d = Daemon::start(&[]);
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("term")).expect("open");
    c.put(&ns, &key(1), &[1u8; 5000]).expect("put");
    let lease = c.get(&ns, &key(1)).expect("get").expect("hit");
    let status = d
        .terminate(Duration::from_secs(15))
        .expect("kvd exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(!d.socket.exists(), "socket file removed");
    drop(lease);
    assert!(c.stats().is_err(), "connection closed");
}

#[test]
fn bad_config_fails_at_start_naming_the_key() {
    for (set, needle) in [
        ("dram.arena_bites=1", "arena_bites"),
        ("ring.entries=3", "ring.entries"),
        ("dram.huge_pages=maybe", "maybe"),
        (
            "events.endpoint=ipc:///nonexistent-kvd-dir/ev.ipc",
            "KV events: cannot bind ipc:///nonexistent-kvd-dir/ev.ipc",
        ),
    ] {
        let out = Command::new(bin("kvd"))
            .args(["--socket", "/tmp/kvd-never.sock", "--set", set])
            .output()
            .expect("run kvd");
        assert!(!out.status.success(), "{set} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{set}: {err}");
    }
}

#[test]
fn kvd_ctl_commands_in_json_and_tables() {
    let d = Daemon::start(&[]);
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("ctl")).expect("open");
    c.put(&ns, &key(1), &[7u8; 10_000]).expect("put");
    c.put(&ns, &key(2), &[8u8; 10_000]).expect("put");
    let ctl = |args: &[&str]| d.ctl(args);
    let json = |args: &[&str]| -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&ctl(&a)).expect("json")
    };
    let s = json(&["status"]);
    assert_eq!(s["tiers"][0]["tier"], "dram");
    assert_eq!(s["tiers"][0]["blocks"], 2);
    assert_eq!(s["namespaces"][0]["model"], "ctl");
    assert!(ctl(&["status"]).contains("CAPACITY"));
    let nsid = ns.id.to_hex();
    let ls = json(&["ls", "--ns", &nsid]);
    assert_eq!(ls["blocks"].as_array().map(Vec::len), Some(2));
    assert!(ctl(&["ls"]).contains(&key(1).short()));
    let k1 = key(1).to_hex();
    let k3 = key(3).to_hex();
    assert_eq!(json(&["inspect", &k1])["copies"][0]["len"], 10_000);
    assert!(ctl(&["inspect", &k3]).contains("not stored"));
    assert_eq!(json(&["lookup", "--ns", &nsid, &k1, &k3])["prefix_len"], 1);
    assert_eq!(json(&["pin", "--ns", &nsid, &k1])["pinned"], 1);
    assert_eq!(json(&["evict", "--all"])["evicted"], 1);
    assert_eq!(json(&["unpin", "--ns", &nsid, &k1])["unpinned"], 1);
    assert_eq!(json(&["evict", &k1])["evicted"], 1);
    // Errors are clear and non-zero.
    let out = Command::new(bin("kvd-ctl"))
        .args(["--socket", "/nonexistent.sock", "status"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not running"));
    let out = Command::new(bin("kvd-ctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["inspect", "xyz"])
        .output()
        .expect("run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("64 hex digits"));
}

#[test]
fn kvd_ctl_top_runs_live_in_a_terminal_and_once_as_text() {
    let d = Daemon::start(&[]);
    let c = d.admin();
    let ns = c
        .open_namespace(&test_namespace("top-model"))
        .expect("open");
    c.put(&ns, &key(1), &[7u8; 10_000]).expect("put");
    let once = d.ctl(&["top", "--once", "--interval-ms", "200"]);
    for want in [
        "kvd top",
        "dram",
        "top-model",
        "OWNER",
        "HIT RATE",
        "kvd-ctl",
    ] {
        assert!(once.contains(want), "{want} missing:\n{once}");
    }
    // Live, in a real terminal: tmux runs it, its screen is read back, q quits.
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("SKIPPED: tmux not installed (scripts/system-deps.sh installs it)");
        return;
    }
    let server = format!("kvdtop{}", std::process::id());
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .args(["-L", &server])
            .args(args)
            .output()
            .expect("run tmux")
    };
    let cmd = format!(
        "{} --socket {} top --interval-ms 200",
        bin("kvd-ctl").display(),
        d.socket.display()
    );
    let started = tmux(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "120",
        "-y",
        "40",
        &cmd,
    ]);
    assert!(started.status.success(), "{started:?}");
    kvd_tests::wait_for("top's screen", Duration::from_secs(15), || {
        let out = tmux(&["capture-pane", "-p", "-t", "top"]);
        let screen = String::from_utf8_lossy(&out.stdout).into_owned();
        (screen.contains("top-model") && screen.contains("tiers")).then_some(())
    });
    tmux(&["send-keys", "-t", "top", "q"]);
    kvd_tests::wait_for("top to quit on q", Duration::from_secs(10), || {
        (!tmux(&["has-session", "-t", "top"]).status.success()).then_some(())
    });
    let _ = tmux(&["kill-server"]);
}
