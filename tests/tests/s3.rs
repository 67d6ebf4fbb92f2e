//! The S3 tier end to end against real S3-compatible servers (s3s-fs, which checks
//! signatures, and moto): blocks packed into segments, read back byte for byte by a restarted
//! node with an empty disk and by another node, warm, reclaim, and the faults S3 shows —
//! down at start, dying mid-upload, slow, 503s, resets, truncated bodies, a corrupted object,
//! wrong credentials, a missing bucket. In every fault DRAM and disk keep serving and no
//! wrong byte is returned.

use std::time::{Duration, Instant};

use kvd_client::{BlockKey, Client, Namespace, Tier};
use kvd_tests::s3::{s3_sets, Fault, FaultProxy, Kind, S3Server, SECRET_KEY};
use kvd_tests::{pattern, start_with, test_namespace, wait_for, Daemon};

const BUCKET: &str = "kvd-test";
const MODEL: &str = "s3-model";

fn key(seed: u64, i: u64) -> BlockKey {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&seed.to_le_bytes());
    k[8..16].copy_from_slice(&i.to_le_bytes());
    k[31] = 0x53;
    BlockKey(k)
}

/// Block sizes from 4 KiB to ~300 KiB, not page multiples, and every 10th 3 MiB (so some
/// segments are larger than a multipart part).
fn len_of(i: u64) -> usize {
    if i % 10 == 9 {
        3 << 20
    } else {
        4096 + ((i * 7919) % 300_000) as usize
    }
}

fn put_all(c: &Client, ns: &Namespace, seed: u64, n: u64) {
    for i in 0..n {
        c.put(ns, &key(seed, i), &pattern(seed, i, len_of(i)))
            .expect("put");
    }
}

/// Reads every block; panics on a wrong byte. Returns how many were served.
fn read_all(c: &Client, ns: &Namespace, seed: u64, n: u64) -> u64 {
    let mut served = 0;
    for i in 0..n {
        if let Some(lease) = c.get(ns, &key(seed, i)).expect("get") {
            assert!(
                lease[..] == pattern(seed, i, len_of(i))[..],
                "block {i} served with wrong bytes"
            );
            served += 1;
        }
    }
    served
}

fn keys(seed: u64, n: u64) -> Vec<BlockKey> {
    (0..n).map(|i| key(seed, i)).collect()
}

fn s3(c: &Client) -> kvd_client::StatsReport {
    c.stats().expect("stats")
}

fn uploaded_blocks(c: &Client) -> u64 {
    s3(c).s3.expect("s3 tier").uploaded_blocks
}

/// A daemon with a disk tier in `disk` and the S3 tier on `endpoint`, plus `extra` sets.
fn daemon(endpoint: &str, disk: &std::path::Path, extra: &[&str]) -> Daemon {
    let mut sets = kvd_tests::disk_sets(disk, "128MiB", "1.0");
    // Room for every block of a test in DRAM (mixed sizes take a slab chunk per size class).
    sets.push("dram.arena_bytes=256MiB".into());
    sets.extend(s3_sets(endpoint, BUCKET));
    sets.extend(extra.iter().map(|s| s.to_string()));
    start_with(&sets)
}

fn wait_scanned(c: &Client) {
    wait_for("the bucket listing", Duration::from_secs(30), || {
        s3(c).s3.expect("s3").scanned.then_some(())
    });
}

/// A fresh node (empty DRAM and disk) on `endpoint` lists the bucket, finds the `n` blocks
/// of `seed` in S3 with one lookup, and reads every one back byte for byte.
fn a_fresh_node_reads_back(endpoint: &str, seed: u64, n: u64) {
    let disk = tempfile::tempdir().expect("disk");
    let d = daemon(endpoint, disk.path(), &[]);
    let c = d.admin();
    wait_scanned(&c);
    let ns = c.open_namespace(&test_namespace(MODEL)).expect("open");
    let l = c.lookup(&ns.id, &keys(seed, n)).expect("lookup");
    assert_eq!(u64::from(l.prefix_len), n, "{l:?}");
    assert_eq!(read_all(&c, &ns, seed, n), n);
}

/// Stores, drains to S3, then a node with an empty disk (and DRAM) reads every block back
/// from S3 byte for byte; a lookup counts them in the S3 tier.
fn round_trip(kind: Kind) {
    let Some(server) = S3Server::start(kind, None, BUCKET) else {
        return;
    };
    let n = 40;
    let disk_a = tempfile::tempdir().expect("disk a");
    let a = daemon(&server.endpoint(), disk_a.path(), &[]);
    let ca = a.admin();
    let ns = ca.open_namespace(&test_namespace(MODEL)).expect("open");
    put_all(&ca, &ns, 1, n);
    let out = a.ctl(&["drain", "--timeout-s", "120"]);
    assert!(out.contains("drained"), "{out}");
    assert_eq!(uploaded_blocks(&ca), n);
    let r = s3(&ca).s3.expect("s3");
    assert!(r.uploaded_segments >= 4, "{r:?}");
    assert_eq!((r.upload_failures, r.corrupt), (0, 0), "{r:?}");
    if kind == Kind::S3sFs {
        // Segments over the 5 MiB part size went up as multipart uploads.
        let objects = server.objects(BUCKET);
        assert!(objects.iter().any(|(_, len)| *len > 5 << 20), "{objects:?}");
    }
    drop(ca);
    drop(a);
    drop(disk_a);

    let disk_b = tempfile::tempdir().expect("disk b");
    let b = daemon(&server.endpoint(), disk_b.path(), &[]);
    let cb = b.admin();
    wait_scanned(&cb);
    let ns = cb.open_namespace(&test_namespace(MODEL)).expect("open");
    let t = Instant::now();
    let l = cb.lookup(&ns.id, &keys(1, n)).expect("lookup");
    let el = t.elapsed();
    let l2 = cb.lookup(&ns.id, &keys(1, n)).expect("lookup");
    assert_eq!(l.prefix_len as u64, n, "{el:?} {l2:?} {:?}", s3(&cb).s3);
    assert_eq!(l.tiers.get(Tier::S3) as u64, n, "{l:?}");
    assert_eq!(read_all(&cb, &ns, 1, n), n);
    let r = s3(&cb).s3.expect("s3");
    assert_eq!((r.read_blocks, r.corrupt), (n, 0), "{r:?}");
}

#[test]
fn blocks_come_back_from_s3_after_dram_and_disk_are_lost_s3s_fs() {
    round_trip(Kind::S3sFs);
}

#[test]
fn blocks_come_back_from_s3_after_dram_and_disk_are_lost_moto() {
    round_trip(Kind::Moto);
}

/// Two nodes share the bucket: what one uploads (write-through) the other reads, found by its
/// listing at start; blocks uploaded after it started are found by `kvd-ctl warm`, which reads
/// them into DRAM with its progress output.
#[test]
fn a_second_node_reads_the_first_nodes_blocks_and_warms_from_s3() {
    let Some(server) = S3Server::start(Kind::S3sFs, None, BUCKET) else {
        return;
    };
    let (disk_a, disk_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = daemon(
        &server.endpoint(),
        disk_a.path(),
        &["s3.write_mode=write-through", "index.node_id=node-a"],
    );
    let ca = a.admin();
    let ns_a = ca.open_namespace(&test_namespace(MODEL)).expect("open");
    put_all(&ca, &ns_a, 2, 20);
    wait_for("write-through uploads", Duration::from_secs(60), || {
        (uploaded_blocks(&ca) == 20).then_some(())
    });

    let b = daemon(&server.endpoint(), disk_b.path(), &["index.node_id=node-b"]);
    let cb = b.admin();
    wait_scanned(&cb);
    let ns_b = cb.open_namespace(&test_namespace(MODEL)).expect("open");
    let l = cb.lookup(&ns_b.id, &keys(2, 20)).expect("lookup");
    assert_eq!((l.prefix_len, l.tiers.get(Tier::S3)), (20, 20), "{l:?}");
    assert_eq!(read_all(&cb, &ns_b, 2, 20), 20);

    // Uploaded after B listed the bucket: B does not know them until a warm lists again.
    put_all(&ca, &ns_a, 3, 12);
    wait_for("write-through uploads", Duration::from_secs(60), || {
        (uploaded_blocks(&ca) == 32).then_some(())
    });
    let out = b.ctl(&[
        "warm",
        "--namespace",
        &ns_b.id.to_hex(),
        "--timeout-s",
        "60",
    ]);
    assert!(out.contains("warmed 12 blocks"), "{out}");
    let l = cb.lookup(&ns_b.id, &keys(3, 12)).expect("lookup");
    assert_eq!((l.prefix_len, l.tiers.get(Tier::Dram)), (12, 12), "{l:?}");
    assert_eq!(read_all(&cb, &ns_b, 3, 12), 12);
    let status = b.ctl(&["status"]);
    assert!(status.contains("s3     http://127.0.0.1:"), "{status}");
    assert!(status.contains("warmed 12"), "{status}");
}

/// A node whose S3 is down at start serves DRAM and disk as usual; when S3 comes up (after the
/// breaker's pause) the queued blocks are uploaded and another node reads them.
#[test]
fn s3_down_at_start_then_up() {
    let port = kvd_tests::redis::free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let disk = tempfile::tempdir().unwrap();
    let a = daemon(&endpoint, disk.path(), &["s3.write_mode=write-through"]);
    let c = a.admin();
    let ns = c.open_namespace(&test_namespace(MODEL)).expect("open");
    put_all(&c, &ns, 4, 10);
    assert_eq!(read_all(&c, &ns, 4, 10), 10, "DRAM serves while S3 is down");
    wait_for(
        "the S3 tier to report the outage",
        Duration::from_secs(30),
        || {
            let r = s3(&c).s3.expect("s3");
            r.last_error.contains("unreachable").then_some(())
        },
    );
    assert_eq!(uploaded_blocks(&c), 0);
    let Some(server) = S3Server::start(Kind::S3sFs, Some(port), BUCKET) else {
        return;
    };
    wait_for("uploads after S3 came up", Duration::from_secs(60), || {
        (uploaded_blocks(&c) == 10).then_some(())
    });
    a_fresh_node_reads_back(&server.endpoint(), 4, 10);
}

/// S3 failing in each way the proxy can make it fail: DRAM keeps serving, a lookup that
/// needs S3 answers a miss within its budget instead of waiting, no wrong byte is served, the
/// breaker opens and `kvd-ctl status` says the tier is degraded; once S3 behaves again the
/// same lookup is a hit.
#[test]
fn faults_between_kvd_and_s3_never_serve_wrong_bytes() {
    let Some(server) = S3Server::start(Kind::S3sFs, None, BUCKET) else {
        return;
    };
    let proxy = FaultProxy::start(server.port);
    // Node A uploads through the proxy while it passes requests on.
    let disk_a = tempfile::tempdir().unwrap();
    let a = daemon(&proxy.endpoint(), disk_a.path(), &[]);
    let ca = a.admin();
    let ns_a = ca.open_namespace(&test_namespace(MODEL)).expect("open");
    put_all(&ca, &ns_a, 5, 12);
    assert!(a.ctl(&["drain", "--timeout-s", "120"]).contains("drained"));
    drop(ca);
    drop(a);

    // Node B reads through the proxy; it listed the bucket while the proxy passed requests.
    let disk_b = tempfile::tempdir().unwrap();
    let b = daemon(
        &proxy.endpoint(),
        disk_b.path(),
        &["s3.lookup_timeout_ms=1500", "s3.breaker_failures=3"],
    );
    let c = b.admin();
    wait_scanned(&c);
    let ns = c.open_namespace(&test_namespace(MODEL)).expect("open");
    // A local block, served throughout.
    c.put(&ns, &key(6, 0), &pattern(6, 0, 5000)).expect("put");
    let ks = keys(5, 12);
    for fault in [
        Fault::Unavailable,
        Fault::Reset,
        Fault::Truncate,
        Fault::Delay(Duration::from_secs(4)),
    ] {
        proxy.set(fault);
        let t = Instant::now();
        let l = c.lookup(&ns.id, &ks).expect("lookup");
        let took = t.elapsed();
        assert_eq!(l.prefix_len, 0, "{fault:?}: {l:?}");
        assert!(
            took < Duration::from_secs(3),
            "{fault:?}: lookup took {took:?}"
        );
        assert_eq!(read_all(&c, &ns, 5, 12), 0, "{fault:?}");
        let lease = c.get(&ns, &key(6, 0)).expect("get").expect("local block");
        assert!(lease[..] == pattern(6, 0, 5000)[..]);
        drop(lease);
    }
    let r = s3(&c).s3.expect("s3");
    assert!(r.retries > 0 && r.failures > 0, "{r:?}");
    assert_eq!(r.read_blocks, 0, "{r:?}");
    // The breaker: consecutive failures opened it; lookups skip S3 without a request.
    proxy.set(Fault::Unavailable);
    for _ in 0..4 {
        let _ = c.lookup(&ns.id, &ks).expect("lookup");
    }
    let r = s3(&c).s3.expect("s3");
    assert!(r.degraded && r.breaker_opened >= 1, "{r:?}");
    let status = b.ctl(&["status"]);
    assert!(status.contains("DEGRADED"), "{status}");
    let seen = proxy.requests.load(std::sync::atomic::Ordering::Relaxed);
    let t = Instant::now();
    let l = c.lookup(&ns.id, &ks).expect("lookup");
    assert_eq!(l.prefix_len, 0);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "an open breaker answers at once"
    );
    assert_eq!(
        proxy.requests.load(std::sync::atomic::Ordering::Relaxed),
        seen,
        "no request while the breaker is open"
    );
    // Every other request failing: retries get through, every byte checked.
    proxy.set(Fault::Flaky);
    std::thread::sleep(Duration::from_millis(1100));
    let l = wait_for("reads through a flaky S3", Duration::from_secs(30), || {
        let l = c.lookup(&ns.id, &ks).expect("lookup");
        (l.prefix_len == 12).then_some(l)
    });
    assert_eq!(l.prefix_len, 12);
    assert_eq!(read_all(&c, &ns, 5, 12), 12);
    let r = s3(&c).s3.expect("s3");
    assert_eq!(r.corrupt, 0, "{r:?}");
}

/// A segment altered in the bucket: the block whose bytes changed fails its checksum and is a
/// miss (counted, logged), never served; the other blocks of the segment are served.
#[test]
fn a_corrupted_object_is_never_served() {
    let Some(server) = S3Server::start(Kind::S3sFs, None, BUCKET) else {
        return;
    };
    let disk_a = tempfile::tempdir().unwrap();
    let a = daemon(
        &server.endpoint(),
        disk_a.path(),
        &["s3.segment_bytes=64MiB"],
    );
    let ca = a.admin();
    let ns_a = ca.open_namespace(&test_namespace(MODEL)).expect("open");
    put_all(&ca, &ns_a, 7, 5);
    assert!(a.ctl(&["drain", "--timeout-s", "60"]).contains("drained"));
    drop(ca);
    drop(a);
    let objects = server.objects(BUCKET);
    assert_eq!(objects.len(), 1, "{objects:?}");
    // Block 0 starts at offset 0 of the segment: flip one of its bytes.
    let path = server.object_path(BUCKET, &objects[0].0);
    let mut bytes = std::fs::read(&path).expect("read segment");
    bytes[100] ^= 0x40;
    std::fs::write(&path, &bytes).expect("write segment");

    let disk_b = tempfile::tempdir().unwrap();
    let b = daemon(&server.endpoint(), disk_b.path(), &[]);
    let c = b.admin();
    wait_scanned(&c);
    let ns = c.open_namespace(&test_namespace(MODEL)).expect("open");
    let l = c.lookup(&ns.id, &keys(7, 5)).expect("lookup");
    assert_eq!(l.prefix_len, 0, "the first block is corrupt: {l:?}");
    assert!(c.get(&ns, &key(7, 0)).expect("get").is_none());
    let l = c.lookup(&ns.id, &keys(7, 5)[1..]).expect("lookup");
    assert_eq!(l.prefix_len, 4, "{l:?}");
    for i in 1..5 {
        let lease = c.get(&ns, &key(7, i)).expect("get").expect("served");
        assert!(lease[..] == pattern(7, i, len_of(i))[..]);
    }
    let r = s3(&c).s3.expect("s3");
    assert_eq!(r.corrupt, 1, "{r:?}");
    b.expect_log("does not match its checksum");
}

/// Wrong credentials and a missing bucket: a clear error naming the endpoint and the bucket,
/// in the log and in `kvd-ctl status`; the secret appears nowhere; DRAM serves.
#[test]
fn wrong_credentials_and_missing_bucket_are_named_clearly() {
    let Some(server) = S3Server::start(Kind::S3sFs, None, BUCKET) else {
        return;
    };
    let wrong = "wrong-secret-do-not-print";
    for (bucket, secret, expect) in [
        (BUCKET, wrong, "access denied"),
        ("no-such-bucket", SECRET_KEY, "does not exist"),
    ] {
        let disk = tempfile::tempdir().unwrap();
        let mut sets = kvd_tests::disk_sets(disk.path(), "64MiB", "1.0");
        sets.extend(s3_sets(&server.endpoint(), bucket));
        sets.push(format!("s3.secret_access_key={secret}"));
        let d = start_with(&sets);
        let c = d.admin();
        wait_for("the start check's error", Duration::from_secs(30), || {
            d.log_contains(expect).then_some(())
        });
        let log = d.log_text();
        let line = log.lines().find(|l| l.contains(expect)).unwrap_or_default();
        assert!(
            line.contains(&server.endpoint()) && line.contains(bucket),
            "{line}"
        );
        let status = d.ctl(&["status"]);
        assert!(status.contains(expect), "{status}");
        let json = d.ctl(&["--json", "status"]);
        for text in [&log, &status, &json] {
            assert!(!text.contains(wrong), "the secret leaked");
        }
        let ns = c.open_namespace(&test_namespace(MODEL)).expect("open");
        c.put(&ns, &key(8, 0), &pattern(8, 0, 9000)).expect("put");
        assert!(c.get(&ns, &key(8, 0)).expect("get").is_some());
    }
}

/// S3 dying in the middle of uploads: the failed segments' blocks stay queued in DRAM and are
/// uploaded once S3 is back; another node then reads every one of them.
#[test]
fn s3_dying_mid_upload_loses_nothing_dram_still_holds() {
    let Some(mut server) = S3Server::start(Kind::S3sFs, None, BUCKET) else {
        return;
    };
    let proxy = FaultProxy::start(server.port);
    proxy.set(Fault::Delay(Duration::from_millis(300)));
    let disk = tempfile::tempdir().unwrap();
    let a = daemon(
        &proxy.endpoint(),
        disk.path(),
        &["s3.write_mode=write-through"],
    );
    let c = a.admin();
    let ns = c.open_namespace(&test_namespace(MODEL)).expect("open");
    put_all(&c, &ns, 9, 30);
    std::thread::sleep(Duration::from_millis(400));
    server.stop();
    assert_eq!(read_all(&c, &ns, 9, 30), 30, "DRAM serves while S3 is down");
    wait_for("failed uploads", Duration::from_secs(60), || {
        (s3(&c).s3.expect("s3").upload_failures > 0).then_some(())
    });
    server.restart();
    proxy.set(Fault::Pass);
    wait_for("every block uploaded", Duration::from_secs(90), || {
        let r = s3(&c).s3.expect("s3");
        (r.uploaded_blocks >= 30 && r.uploading == 0).then_some(())
    });
    a_fresh_node_reads_back(&server.endpoint(), 9, 30);
}

/// Segments past `s3.max_age_secs` are deleted by the node that wrote them, and their blocks
/// stop being found.
#[test]
fn old_segments_are_reclaimed_by_their_writer() {
    let Some(server) = S3Server::start(Kind::S3sFs, None, BUCKET) else {
        return;
    };
    let disk = tempfile::tempdir().unwrap();
    let a = daemon(&server.endpoint(), disk.path(), &["s3.max_age_secs=2"]);
    let c = a.admin();
    let ns = c.open_namespace(&test_namespace(MODEL)).expect("open");
    put_all(&c, &ns, 10, 8);
    assert!(a.ctl(&["drain", "--timeout-s", "60"]).contains("drained"));
    assert!(!server.objects(BUCKET).is_empty());
    wait_for("segments reclaimed", Duration::from_secs(30), || {
        server.objects(BUCKET).is_empty().then_some(())
    });
    let r = s3(&c).s3.expect("s3");
    assert!(r.deleted_segments >= 1 && r.blocks == 0, "{r:?}");
}

/// The disk catalog keeps each segment's index: a node restarted on the same disk knows what
/// S3 holds before (and without) listing the bucket — here S3 is down after the restart.
#[test]
fn the_catalog_remembers_segments_across_a_restart() {
    let Some(mut server) = S3Server::start(Kind::S3sFs, None, BUCKET) else {
        return;
    };
    let disk = tempfile::tempdir().unwrap();
    let a = daemon(&server.endpoint(), disk.path(), &[]);
    let c = a.admin();
    let ns = c.open_namespace(&test_namespace(MODEL)).expect("open");
    put_all(&c, &ns, 11, 15);
    assert!(a.ctl(&["drain", "--timeout-s", "60"]).contains("drained"));
    let before = s3(&c).s3.expect("s3");
    drop(c);
    drop(a);
    server.stop();
    let b = daemon(&server.endpoint(), disk.path(), &[]);
    let c = b.admin();
    let r = s3(&c).s3.expect("s3");
    assert!(!r.scanned, "S3 is down: nothing was listed");
    assert_eq!((r.blocks, r.segments), (15, before.segments), "{r:?}");
}

/// Credentials from the standard AWS chain (here its environment variables) instead of the
/// configuration: the signature-checking server accepts them.
#[test]
fn credentials_from_the_aws_environment_variables() {
    let Some(server) = S3Server::start(Kind::S3sFs, None, BUCKET) else {
        return;
    };
    let disk = tempfile::tempdir().unwrap();
    let mut sets = kvd_tests::disk_sets(disk.path(), "64MiB", "1.0");
    sets.extend(
        s3_sets(&server.endpoint(), BUCKET)
            .into_iter()
            .filter(|s| !s.starts_with("s3.access_key_id") && !s.starts_with("s3.secret")),
    );
    sets.push("s3.write_mode=write-through".into());
    let refs: Vec<&str> = sets.iter().map(String::as_str).collect();
    let d = Daemon::start_with_env(
        &refs,
        &[
            ("AWS_ACCESS_KEY_ID", kvd_tests::s3::ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
            ("AWS_CONFIG_FILE", "/nonexistent"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
        ],
    );
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace(MODEL)).expect("open");
    put_all(&c, &ns, 12, 6);
    wait_for(
        "uploads with the environment's keys",
        Duration::from_secs(60),
        || (uploaded_blocks(&c) == 6).then_some(()),
    );
    a_fresh_node_reads_back(&server.endpoint(), 12, 6);
}

/// `--check-config` prints the effective configuration without the S3 secret.
#[test]
fn check_config_hides_the_s3_secret() {
    let out = std::process::Command::new(kvd_tests::bin("kvd"))
        .args(["--check-config", "--set", "s3.bucket=some-bucket"])
        .args(["--set", "s3.access_key_id=AKIDEXAMPLE"])
        .args(["--set", "s3.secret_access_key=very-secret-value"])
        .output()
        .expect("run kvd --check-config");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("bucket = \"some-bucket\""), "{text}");
    assert!(!text.contains("very-secret-value"), "{text}");
    assert!(text.contains("<redacted>"), "{text}");
}
