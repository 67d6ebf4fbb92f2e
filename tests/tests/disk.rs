//! The disk tier end to end: demotion, promotion, restart, kill -9, corruption, disk full,
//! admission and the operator commands, against the real `kvd` binary.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kvd_client::{BlockKey, Client, PutOutcome, Tier};
use kvd_tests::{bin, pattern, start_with as start, test_namespace, wait_for, Daemon};

fn key(i: u64) -> BlockKey {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&i.to_le_bytes());
    k[31] = 0xD1;
    BlockKey(k)
}

/// Block length for index `i`: 4 KiB to ~200 KiB, mostly not page multiples.
fn len_of(i: u64) -> usize {
    4096 + ((i * 7919) % 200_000) as usize
}

const SEED: u64 = 42;

/// A 128 MiB disk tier every block is written to as soon as it is sealed.
fn disk_sets(path: &Path) -> Vec<String> {
    kvd_tests::disk_sets(path, "128MiB", "0")
}

fn disk_blocks(c: &Client) -> u64 {
    c.stats().expect("stats").disk.expect("disk tier").blocks
}

/// Stores blocks `0..n` in namespace `model` and drains them all to disk.
fn put_and_drain(d: &Daemon, model: &str, n: u64) {
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace(model)).expect("open");
    put_range(&c, &ns, 0..n);
    c.drain(None).expect("drain");
    wait_for("drain", Duration::from_secs(30), || {
        (c.stats().ok()?.disk?.drain_pending == 0).then_some(())
    });
}

fn put_range(c: &Client, ns: &kvd_client::Namespace, range: std::ops::Range<u64>) {
    for i in range {
        let data = pattern(SEED, i, len_of(i));
        let r = c.put(ns, &key(i), &data).expect("put");
        assert!(
            matches!(r, PutOutcome::Stored | PutOutcome::Exists),
            "{r:?}"
        );
    }
}

/// Returns whether block `i` was served; panics if it was served with wrong bytes.
fn check(c: &Client, ns: &kvd_client::Namespace, i: u64) -> bool {
    match c.get(ns, &key(i)).expect("get") {
        None => false,
        Some(lease) => {
            assert!(
                lease[..] == pattern(SEED, i, len_of(i))[..],
                "block {i} served with wrong bytes"
            );
            true
        }
    }
}

#[test]
fn blocks_survive_a_restart_and_are_promoted_on_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sets = disk_sets(dir.path());
    let mut d = start(&sets);
    {
        let c = d.admin();
        let ns = c.open_namespace(&test_namespace("disk")).expect("open");
        put_range(&c, &ns, 0..40);
        wait_for("40 blocks on disk", Duration::from_secs(30), || {
            (disk_blocks(&c) == 40).then_some(())
        });
    }
    assert!(d
        .terminate(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    let d = start(&sets);
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("disk")).expect("open");
    let keys: Vec<_> = (0..40).map(key).collect();
    let l = c.lookup(&ns.id, &keys).expect("lookup");
    assert_eq!((l.prefix_len, l.tiers.get(Tier::Disk)), (40, 40));
    for i in 0..40 {
        assert!(check(&c, &ns, i), "block {i} lost across a restart");
    }
    let s = c.stats().expect("stats");
    let disk = s.disk.expect("disk");
    assert_eq!(disk.hits, 40);
    assert_eq!(disk.checksum_failures, 0);
    // Promoted: now in DRAM as well, and both copies are listed by inspect.
    let l = c.lookup(&ns.id, &keys).expect("lookup");
    assert_eq!(l.tiers.get(Tier::Dram), 40);
    let copies = c.inspect(&key(3)).expect("inspect");
    let tiers: Vec<_> = copies.iter().map(|b| b.tier).collect();
    assert_eq!(tiers, vec![Tier::Dram, Tier::Disk]);
    // Delete removes every tier's copy.
    assert_eq!(c.delete(&ns.id, &[key(3)]).expect("delete"), 1);
    assert!(c.inspect(&key(3)).expect("inspect").is_empty());
}

#[test]
fn kill_9_at_random_moments_never_loses_durable_blocks_or_serves_wrong_bytes() {
    let iterations: u64 = std::env::var("KVD_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sets = disk_sets(dir.path());
    sets.push("disk.capacity_bytes=512MiB".into());
    let mut durable: Vec<u64> = Vec::new();
    let mut written: u64 = 0;
    let mut unsure = 0..0u64;
    let mut rng = 0x1234_5678_9abc_def0_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for it in 0..iterations {
        let mut d = start(&sets);
        let c = d.admin();
        let ns = c.open_namespace(&test_namespace("crash")).expect("open");
        // Everything drained before an earlier kill is still there, byte for byte.
        for &i in &durable {
            assert!(
                check(&c, &ns, i),
                "iteration {it}: durable block {i} lost\n{}",
                d.log_text()
            );
        }
        // What was being written when the daemon died may or may not be there; what is
        // served must be right (check() panics otherwise).
        let mut extra = 0;
        for i in unsure.clone() {
            if check(&c, &ns, i) {
                extra += 1;
            }
        }
        let s = c.stats().expect("stats").disk.expect("disk");
        assert_eq!(s.checksum_failures, 0, "iteration {it}: torn data was read");
        assert_eq!(
            s.reclaims, 0,
            "the test sized the disk so that nothing is reclaimed"
        );
        // Some blocks made durable by a completed drain...
        let base = written;
        put_range(&c, &ns, base..base + 6);
        c.drain(Some(ns.id)).expect("drain");
        wait_for("drain", Duration::from_secs(30), || {
            (c.stats().ok()?.disk?.drain_pending == 0).then_some(())
        });
        durable.extend(base..base + 6);
        // ...then more writes while demotion runs, killed at a random moment.
        let more = 10 + next() % 20;
        let kill_after = Duration::from_micros(next() % 60_000);
        written = base + 6 + more;
        unsure = base + 6..written;
        let t = std::time::Instant::now();
        let mut i = base + 6;
        while i < written && t.elapsed() < kill_after {
            put_range(&c, &ns, i..i + 1);
            i += 1;
        }
        drop(ns);
        drop(c);
        d.kill9();
        eprintln!("iteration {it}: killed after {i} puts ({extra} non-durable blocks had survived the last kill)");
    }
}

#[test]
fn kill_9_during_region_reclaims_never_serves_wrong_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sets = disk_sets(dir.path());
    // 4 regions of ~1 MiB: a few dozen blocks fill the tier, so reclaims run all the time.
    sets.extend([
        "dram.max_block_bytes=256KiB".to_string(),
        "disk.region_bytes=1MiB".into(),
        "disk.capacity_bytes=4MiB".into(),
    ]);
    let mut written = 0u64;
    let mut reclaims = 0;
    let mut rng = 0x0bad_cafe_f00d_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for it in 0..10 {
        let mut d = start(&sets);
        let c = d.admin();
        let ns = c.open_namespace(&test_namespace("reclaim")).expect("open");
        let mut served = 0;
        for i in 0..written {
            if check(&c, &ns, i) {
                served += 1;
            }
        }
        let s = c.stats().expect("stats").disk.expect("disk");
        assert_eq!(s.checksum_failures, 0, "iteration {it}: {s:?}");

        let base = written;
        written += 30;
        let kill_at = base + next() % 30;
        for i in base..written {
            put_range(&c, &ns, i..i + 1);
            if i == kill_at {
                c.drain(None).expect("drain");
                std::thread::sleep(Duration::from_micros(next() % 20_000));
                break;
            }
        }
        reclaims += c.stats().expect("stats").disk.expect("disk").reclaims;
        drop(ns);
        drop(c);
        d.kill9();
        eprintln!("iteration {it}: {served} of {base} earlier blocks served, all correct");
    }
    assert!(reclaims > 0, "the test must exercise reclaims");
}

#[test]
fn corrupted_region_bytes_are_detected_and_never_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sets = disk_sets(dir.path());
    let mut d = start(&sets);
    put_and_drain(&d, "corrupt", 10);
    assert!(d.terminate(Duration::from_secs(10)).is_some());
    // Flip a byte inside the first block of the first region (blocks start at offset 0).
    let region = dir.path().join("regions/region-00000.kvd");
    let mut bytes = std::fs::read(&region).expect("read region");
    bytes[100] ^= 0xFF;
    std::fs::write(&region, &bytes).expect("write region");
    let d = start(&sets);
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("corrupt")).expect("open");
    let served: Vec<bool> = (0..10).map(|i| check(&c, &ns, i)).collect();
    assert_eq!(served.iter().filter(|s| !**s).count(), 1, "{served:?}");
    let disk = c.stats().expect("stats").disk.expect("disk");
    assert_eq!(disk.checksum_failures, 1);
    d.expect_log("failed its checksum");
}

#[test]
fn one_off_blocks_stay_in_dram_with_frequency_admission() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sets = disk_sets(dir.path());
    sets.push("disk.admission=frequency".into());
    sets.push("disk.admission_min_frequency=2".into());
    let d = start(&sets);
    let c = d.admin();
    let ns = c
        .open_namespace(&test_namespace("admission"))
        .expect("open");
    put_range(&c, &ns, 0..12);
    for i in 0..4 {
        assert!(check(&c, &ns, i));
    }
    c.flush().expect("flush");
    wait_for(
        "the 4 re-read blocks on disk",
        Duration::from_secs(30),
        || (disk_blocks(&c) == 4).then_some(()),
    );
    std::thread::sleep(Duration::from_millis(200));
    let disk = c.stats().expect("stats").disk.expect("disk");
    assert_eq!(disk.blocks, 4, "only blocks seen twice were written");
    assert!(disk.admission_rejections >= 8, "{disk:?}");
    for i in 0..4 {
        let copies = c.inspect(&key(i)).expect("inspect");
        assert!(
            copies.iter().any(|b| b.tier == Tier::Disk),
            "block {i}: {copies:?}"
        );
    }
}

#[test]
fn blocks_are_sealed_and_drained_even_when_ring_threads_never_spin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sets = disk_sets(dir.path());
    sets.push("ring.spin_us=0".into());
    sets.push("disk.demote_watermark=1.0".into());
    let d = start(&sets);
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("nospin")).expect("open");
    put_range(&c, &ns, 0..20);
    c.drain(None).expect("drain");
    let t = std::time::Instant::now();
    wait_for("drain", Duration::from_secs(30), || {
        (c.stats().ok()?.disk?.drain_pending == 0).then_some(())
    });
    // Sealing 20 blocks takes milliseconds; seconds would mean the ring thread slept on them.
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "drain took {:?}",
        t.elapsed()
    );
    assert_eq!(disk_blocks(&c), 20);
}

#[test]
fn a_catalog_path_that_is_not_a_directory_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("catalog"), b"not a catalog").expect("write");
    let sock = dir.path().join("kvd.sock");
    let out = Command::new(bin("kvd"))
        .arg("--socket")
        .arg(&sock)
        .args([
            "--set",
            "dram.arena_bytes=16MiB",
            "--set",
            "dram.max_block_bytes=1MiB",
        ])
        .args(
            disk_sets(dir.path())
                .iter()
                .flat_map(|s| ["--set".to_string(), s.clone()]),
        )
        .output()
        .expect("run kvd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let cat = dir.path().join("catalog");
    assert!(err.contains(&cat.display().to_string()), "{err}");
    assert!(!sock.exists(), "no socket left behind");
}

#[test]
fn kvd_ctl_drains_with_progress_and_shows_the_disk_tier() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sets = disk_sets(dir.path());
    sets.push("disk.demote_watermark=0.99".into());
    let d = start(&sets);
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("ctl")).expect("open");
    put_range(&c, &ns, 0..16);
    c.flush().expect("flush");
    let ctl = |args: &[&str]| d.ctl(args);
    let v: serde_json::Value = serde_json::from_str(&ctl(&["drain", "--json"])).expect("json");
    assert_eq!(v["drained"], 16, "{v}");
    let s: serde_json::Value = serde_json::from_str(&ctl(&["status", "--json"])).expect("json");
    assert_eq!(s["disk"]["blocks"], 16, "{s}");
    assert_eq!(s["disk"]["drain_pending"], 0);
    assert!(s["tiers"]
        .as_array()
        .expect("tiers")
        .iter()
        .any(|t| t["tier"] == "disk"));
    let text = ctl(&["status"]);
    assert!(text.contains("disk ") && text.contains("regions"), "{text}");
    let inspect = ctl(&["inspect", &key(5).to_hex()]);
    assert!(
        inspect.contains("disk") && inspect.contains("dram"),
        "{inspect}"
    );
}

/// A tenant whose blocks outgrow `disk.max_bytes_per_tenant` loses its own least recently
/// used blocks, across all its salted namespaces; another tenant's stay on disk, and every
/// block is still served right (from DRAM) or not at all. `kvd-ctl status` shows who holds
/// what.
#[test]
fn a_tenant_beyond_its_disk_quota_evicts_only_its_own_blocks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sets = disk_sets(dir.path());
    sets.push("disk.max_bytes_per_tenant=8MiB".into());
    sets.push("dram.max_namespaces=3".into());
    let port = kvd_tests::redis::free_port();
    sets.push(format!("metrics.listen=127.0.0.1:{port}"));
    let d = start(&sets);
    let c = d.admin();
    let open = |model: &str, tenant: &str| {
        let mut desc = test_namespace(model);
        desc.tenant = tenant.into();
        c.open_namespace(&desc).expect("open")
    };
    let drain = || {
        c.drain(None).expect("drain");
        wait_for("drain", Duration::from_secs(30), || {
            (c.stats().ok()?.disk?.drain_pending == 0).then_some(())
        });
    };
    let beta = open("quota-b", "beta");
    put_range(&c, &beta, 0..20);
    drain();
    // About 12 MiB of acme's blocks, in two salted namespaces.
    let acme = [
        open("quota-a", "acme|salt=1"),
        open("quota-a", "acme|salt=2"),
    ];
    put_range(&c, &acme[0], 100..160);
    put_range(&c, &acme[1], 200..260);
    drain();
    let s = c.stats().expect("stats");
    let of = |id| s.namespaces.iter().find(|n| n.ns == id).expect("namespace");
    assert_eq!(
        of(beta.id).disk_blocks,
        20,
        "another tenant keeps its blocks"
    );
    let acme_disk: u64 = acme.iter().map(|n| of(n.id).disk_bytes).sum();
    assert!(
        (4 << 20..=8 << 20).contains(&acme_disk),
        "acme holds {acme_disk} bytes on disk"
    );
    let disk = s.disk.expect("disk");
    assert!(disk.quota_evictions > 0, "{disk:?}");
    assert_eq!(disk.drain_pending, 0);
    for (ns, range) in [(&acme[0], 100..160), (&acme[1], 200..260)] {
        for i in range {
            check(&c, ns, i);
        }
    }
    let text = d.ctl(&["status"]);
    assert!(text.contains("tenant quota evictions"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("beta") && l.contains("MiB")),
        "{text}"
    );
    let (_, metrics) = kvd_tests::http_get(port, "/metrics");
    assert!(
        metrics.contains("kvd_disk_quota_evictions_total"),
        "{metrics}"
    );
}

/// A tmpfs of `size` (or another in-memory filesystem) mounted on a fresh directory,
/// unmounted on drop; `None` (with a note) where this machine does not let the test mount (no
/// privileges).
struct SmallFs(tempfile::TempDir);

impl SmallFs {
    fn mount(size: &str) -> Option<SmallFs> {
        Self::mount_fs("tmpfs", &format!("size={size}"), "disk-full")
    }

    fn mount_fs(fstype: &str, options: &str, what: &str) -> Option<SmallFs> {
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = Command::new("mount")
            .args(["-t", fstype, "-o", options, fstype])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIPPED: cannot mount a {fstype} here (needs root); {what} not tested");
            return None;
        }
        Some(SmallFs(dir))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

fn full_disk_sets(path: &Path, preallocate: bool) -> Vec<String> {
    vec![
        format!("disk.path={}", path.display()),
        "dram.max_block_bytes=256KiB".into(),
        "disk.region_bytes=1MiB".into(),
        "disk.capacity_bytes=16MiB".into(),
        "disk.engine=psync".into(),
        format!("disk.preallocate={preallocate}"),
        "disk.admission=always".into(),
        "disk.demote_watermark=0".into(),
    ]
}

#[test]
fn a_full_disk_degrades_the_tier_while_dram_keeps_serving() {
    let Some(fs) = SmallFs::mount("3m") else {
        return;
    };
    let d = start(&full_disk_sets(fs.0.path(), false));
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("full")).expect("open");
    // ~6 MB of blocks: twice what the filesystem holds.
    put_range(&c, &ns, 0..60);
    let disk = wait_for(
        "the disk tier to report degraded",
        Duration::from_secs(30),
        || {
            let disk = c.stats().ok()?.disk?;
            (!disk.degraded.is_empty()).then_some(disk)
        },
    );
    eprintln!("degraded: {}", disk.degraded);
    assert!(
        disk.io_errors > 0 || disk.degraded.contains("record"),
        "{disk:?}"
    );
    // DRAM serves every block, byte for byte.
    for i in 0..60 {
        assert!(check(&c, &ns, i), "block {i} lost from DRAM");
    }
    // What made it to disk before the filesystem filled is served correctly from disk.
    c.flush().expect("flush");
    c.evict(None, &[]).expect("evict");
    let from_disk = (0..60).filter(|&i| check(&c, &ns, i)).count();
    assert!(from_disk > 0, "some blocks fit before the disk filled");
    let s = c.stats().expect("stats").disk.expect("disk");
    assert_eq!(s.checksum_failures, 0, "{s:?}");
    d.expect_log("disk tier degraded");
    drop(ns);
    drop(c);
    drop(d);
}

#[test]
fn a_disk_too_small_for_its_regions_starts_degraded_and_serves() {
    let Some(fs) = SmallFs::mount("3m") else {
        return;
    };
    let d = start(&full_disk_sets(fs.0.path(), true));
    let c = d.admin();
    let disk = c.stats().expect("stats").disk.expect("disk");
    assert!(
        disk.degraded.contains("region files could be allocated"),
        "{disk:?}"
    );
    assert!(disk.regions >= 1 && disk.regions < 16, "{disk:?}");
    let ns = c.open_namespace(&test_namespace("small")).expect("open");
    put_range(&c, &ns, 0..10);
    for i in 0..10 {
        assert!(check(&c, &ns, i));
    }
    drop(ns);
    drop(c);
    drop(d);
}

#[test]
fn sigterm_during_a_drain_shuts_down_cleanly_and_keeps_what_was_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sets = disk_sets(dir.path());
    sets.push("disk.demote_watermark=1.0".into());
    let mut d = start(&sets);
    {
        let c = d.admin();
        let ns = c.open_namespace(&test_namespace("term")).expect("open");
        put_range(&c, &ns, 0..150);
        c.drain(None).expect("drain");
        wait_for(
            "the drain to start writing",
            Duration::from_secs(30),
            || (disk_blocks(&c) > 0).then_some(()),
        );
    }
    let status = d.terminate(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        d.log_text()
    );
    let d = start(&sets);
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("term")).expect("open");
    let served = (0..150).filter(|&i| check(&c, &ns, i)).count();
    eprintln!("{served} of 150 blocks were on disk when the daemon stopped");
    let disk = c.stats().expect("stats").disk.expect("disk");
    assert_eq!(disk.checksum_failures, 0);
    assert_eq!(served as u64, disk.hits);
    assert!(served > 0, "blocks written before SIGTERM survive it");
}

#[test]
fn a_dram_larger_than_the_disk_is_not_rewritten_in_a_circle() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 4 regions of 1 MiB; the 60 blocks below hold about 6 MB.
    let sets = vec![
        format!("disk.path={}", dir.path().display()),
        "dram.max_block_bytes=256KiB".into(),
        "disk.region_bytes=1MiB".into(),
        "disk.capacity_bytes=4MiB".into(),
        "disk.admission=always".into(),
        "disk.demote_watermark=0".into(),
    ];
    let d = start(&sets);
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("circle")).expect("open");
    put_range(&c, &ns, 0..60);
    c.flush().expect("flush");
    let writes = || c.stats().expect("stats").disk.expect("disk").writes;
    // Background demotion settles: once every block was written (and some reclaimed for
    // later ones), nothing is written again.
    let mut last = (writes(), Instant::now());
    let settled = wait_for("demotion to settle", Duration::from_secs(30), || {
        let w = writes();
        if w != last.0 {
            last = (w, Instant::now());
        }
        (w >= 60 && last.1.elapsed() > Duration::from_secs(1)).then_some(w)
    });
    assert!(settled < 80, "{settled} writes for 60 blocks");
    // A drain ends too, saying the disk is too small, instead of rewriting forever.
    c.drain(Some(ns.id)).expect("drain");
    wait_for("the drain to finish", Duration::from_secs(30), || {
        d.log_contains("drain finished").then_some(())
    });
    assert!(
        d.log_contains("the disk tier holds less than DRAM"),
        "{}",
        d.log_text()
    );
    assert!(writes() < 80);
    assert_eq!(
        c.stats().expect("stats").disk.expect("disk").drain_pending,
        0
    );
    for i in 0..60 {
        assert!(check(&c, &ns, i), "block {i} lost");
    }
}

#[test]
fn blocks_round_trip_through_huge_page_arenas_registered_with_io_uring() {
    // Two 64 MiB arenas (dram.max_namespaces=2) in explicit huge pages.
    if kvd_shm::map::free_huge_pages().0 < 160 << 20 {
        eprintln!(
            "SKIPPED: fewer than 160 MiB of free huge pages (echo 128 > /proc/sys/vm/nr_hugepages)"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sets = disk_sets(dir.path());
    sets.push("dram.huge_pages=explicit".into());
    blocks_survive_a_restart(&sets, "huge", 40, |d, _| {
        assert!(
            d.log_contains("arenas registered with the disk IO engine")
                || d.log_contains("disk IOs pin arena pages"),
            "{}",
            d.log_text()
        );
    });
}

/// Puts blocks `0..n` into namespace `name`, waits until all are on disk, runs `first` on the
/// running daemon, restarts it and checks that every block comes back from disk, byte for
/// byte.
fn blocks_survive_a_restart(
    sets: &[String],
    name: &str,
    n: u64,
    first: impl FnOnce(&Daemon, &Client),
) {
    let mut d = start(sets);
    {
        let c = d.admin();
        let ns = c.open_namespace(&test_namespace(name)).expect("open");
        put_range(&c, &ns, 0..n);
        wait_for("the blocks on disk", Duration::from_secs(30), || {
            (disk_blocks(&c) == n).then_some(())
        });
        first(&d, &c);
    }
    assert!(d
        .terminate(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    let d = start(sets);
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace(name)).expect("open");
    for i in 0..n {
        assert!(check(&c, &ns, i), "block {i} lost across a restart");
    }
    assert_eq!(c.stats().expect("stats").disk.expect("disk").hits, n);
}

#[test]
fn a_filesystem_without_o_direct_falls_back_to_psync_with_a_warning() {
    // ramfs refuses O_DIRECT (tmpfs accepts it on recent kernels).
    let Some(fs) = SmallFs::mount_fs("ramfs", "mode=0700", "the O_DIRECT fallback") else {
        return;
    };
    let sets = vec![
        format!("disk.path={}", fs.0.path().display()),
        "disk.capacity_bytes=64MiB".into(),
        "disk.region_bytes=16MiB".into(),
        "disk.engine=io_uring".into(),
        "disk.direct_io=true".into(),
        "disk.admission=always".into(),
        "disk.demote_watermark=0".into(),
    ];
    blocks_survive_a_restart(&sets, "ramfs", 20, |d, c| {
        assert!(
            d.log_contains("refuses O_DIRECT"),
            "no fallback warning: {}",
            d.log_text()
        );
        let disk = c.stats().expect("stats").disk.expect("disk");
        assert_eq!((disk.engine.as_str(), disk.direct_io), ("psync", false));
    });
}

/// SIGTERM writes what only DRAM holds to disk before exiting, so a restart finds every
/// block; with `server.shutdown_drain_ms = 0` it does not.
#[test]
fn sigterm_drains_dram_to_disk_before_exiting() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Demotion only on drain: before SIGTERM, nothing is on disk.
    let sets = kvd_tests::disk_sets(dir.path(), "128MiB", "1.0");
    let mut d = start(&sets);
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("sigterm")).expect("open");
    put_range(&c, &ns, 0..24);
    assert_eq!(disk_blocks(&c), 0);
    drop(ns);
    drop(c);
    let status = d.terminate(Duration::from_secs(30)).expect("exits");
    assert!(status.success(), "{status:?}");
    assert!(
        d.log_text()
            .contains("shutdown drain: DRAM blocks written to disk"),
        "{}",
        d.log_text()
    );
    let d = start(&sets);
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("sigterm")).expect("open");
    assert_eq!(disk_blocks(&c), 24);
    for i in 0..24 {
        assert!(check(&c, &ns, i), "block {i} lost across SIGTERM");
    }

    // Without the drain, DRAM-only blocks are gone after a restart (as configured).
    let mut no_drain = sets.clone();
    no_drain.push("server.shutdown_drain_ms=0".into());
    drop((ns, c, d));
    let mut d = start(&no_drain);
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("sigterm")).expect("open");
    put_range(&c, &ns, 100..104);
    drop((ns, c));
    d.terminate(Duration::from_secs(30)).expect("exits");
    let d = start(&no_drain);
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("sigterm")).expect("open");
    assert!(!check(&c, &ns, 100));
    assert!(check(&c, &ns, 0), "drained blocks stay");
}

/// Length of every block of the warm test.
const WARM_LEN: usize = 100 << 10;

#[test]
fn kvd_ctl_warm_reads_disk_blocks_into_dram_most_recent_first_without_evicting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sets = disk_sets(dir.path());
    let n = 300u64;
    let mut d = start(&sets);
    {
        let c = d.admin();
        let ns = c.open_namespace(&test_namespace("warm")).expect("open");
        // One size (one slab class), so all 300 fit in the first run's DRAM at once.
        for i in 0..n {
            c.put(&ns, &key(i), &pattern(SEED, i, WARM_LEN))
                .expect("put");
        }
        wait_for("every block on disk", Duration::from_secs(30), || {
            (disk_blocks(&c) == n).then_some(())
        });
    }
    assert!(d
        .terminate(Duration::from_secs(10))
        .is_some_and(|s| s.success()));

    // Restarted with a smaller arena: DRAM is empty and cannot hold all 30 MiB.
    let mut small = sets.clone();
    small.push("dram.arena_bytes=16MiB".into());
    let d = start(&small);
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("warm")).expect("open");
    let ns_hex = ns.id.to_hex();
    let v: serde_json::Value =
        serde_json::from_str(&d.ctl(&["warm", "--ns", &ns_hex, "--json"])).expect("json");
    let warmed = v["warmed"].as_u64().expect("warmed count");
    assert!(warmed > 20 && warmed < n, "{v}");

    let s = c.stats().expect("stats");
    let nss = s.namespaces.iter().find(|x| x.ns == ns.id).expect("ns");
    assert_eq!(nss.blocks, warmed, "every queued block is in DRAM");
    assert_eq!(nss.evictions, 0, "a warm never evicts");
    assert!(
        nss.used_bytes as f64 <= nss.arena_bytes as f64 * 0.9,
        "warmed past the low watermark: {} of {}",
        nss.used_bytes,
        nss.arena_bytes
    );
    let disk = s.disk.expect("disk");
    assert_eq!((disk.warmed, disk.warm_pending), (warmed, 0));
    assert_eq!(disk.checksum_failures, 0);
    // Most recently written first: the last block is warm, the first is not.
    let in_dram = |i: u64| {
        c.inspect(&key(i))
            .expect("inspect")
            .iter()
            .any(|b| b.tier == Tier::Dram)
    };
    assert!(in_dram(n - 1) && !in_dram(0));
    // The warm blocks are served from DRAM, byte for byte: no disk reads.
    let hits_before = disk.hits;
    let warm_ones: Vec<u64> = (0..n).filter(|&i| in_dram(i)).collect();
    assert_eq!(warm_ones.len() as u64, warmed);
    for &i in &warm_ones {
        let lease = c
            .get(&ns, &key(i))
            .expect("get")
            .expect("warmed block served");
        assert!(
            lease[..] == pattern(SEED, i, WARM_LEN)[..],
            "block {i}: wrong bytes"
        );
    }
    assert_eq!(
        c.stats().expect("stats").disk.expect("disk").hits,
        hits_before
    );

    // Nothing more fits: a second warm queues nothing; status and metrics-facing JSON agree.
    let v: serde_json::Value = serde_json::from_str(&d.ctl(&["warm", "--json"])).expect("json");
    assert_eq!(v["warmed"], 0, "{v}");
    let s: serde_json::Value = serde_json::from_str(&d.ctl(&["status", "--json"])).expect("json");
    assert_eq!(s["disk"]["warmed"], warmed, "{s}");
    assert!(d
        .ctl(&["status"])
        .contains(&format!("warm: {warmed} blocks")));

    // A namespace that is not open: a clear error, non-zero exit.
    let other = test_namespace("never-opened").id().to_hex();
    let out = Command::new(bin("kvd-ctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["warm", "--ns", &other])
        .output()
        .expect("run kvd-ctl");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not open in DRAM"), "{err}");
}

#[test]
fn warm_without_a_disk_tier_is_a_clear_error() {
    let d = start(&[]);
    let err = d.admin().warm(None).expect_err("no disk tier");
    assert!(err.to_string().contains("no disk or S3 tier"), "{err}");
    let err = d.admin().drain(None).expect_err("no disk tier");
    assert!(err.to_string().contains("no disk or S3 tier"), "{err}");
}

/// A catalog whose write-ahead log lost its tail after a `kill -9` (a damaged disk, a bad
/// copy) comes back with fewer blocks: kvd says so once, with a count, instead of silently
/// starting with less; what is still cataloged is served byte for byte.
#[test]
fn a_truncated_catalog_log_is_reported_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sets = disk_sets(dir.path());
    let mut d = start(&sets);
    put_and_drain(&d, "wal", 40);
    d.kill9();
    let logs: Vec<_> = std::fs::read_dir(dir.path().join("catalog"))
        .expect("catalog dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    let wal = logs
        .iter()
        .max_by_key(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .expect("a write-ahead log");
    let len = std::fs::metadata(wal).expect("meta").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(wal)
        .expect("open log");
    f.set_len(len / 3).expect("truncate");
    drop(f);
    let d = start(&sets);
    d.expect_log("came back without its last synced writes");
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("wal")).expect("open");
    let kept = (0..40).filter(|&i| check(&c, &ns, i)).count();
    assert!(kept < 40, "the truncation lost blocks ({kept} kept)");
}

/// `kill -9` right after a drain completes, with the disk tier on psync (O_DSYNC region
/// writes, the catalog synced with each batch): the drain reported every block durable, so
/// after the restart every one is served, byte for byte, and no loss is reported.
#[test]
fn kill_9_right_after_a_drain_on_psync_keeps_every_drained_block() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sets = disk_sets(dir.path());
    sets.push("disk.engine=psync".into());
    let mut d = start(&sets);
    put_and_drain(&d, "psync-kill", 60);
    assert_eq!(disk_blocks(&d.admin()), 60);
    d.kill9();
    let d = start(&sets);
    let c = d.admin();
    let disk = c.stats().expect("stats").disk.expect("disk tier");
    assert_eq!(disk.engine, "psync");
    let ns = c
        .open_namespace(&test_namespace("psync-kill"))
        .expect("open");
    let served = (0..60).filter(|&i| check(&c, &ns, i)).count();
    assert_eq!(served, 60, "drained blocks lost: {}", d.log_text());
    assert!(!d.log_contains("came back without"), "{}", d.log_text());
}
