//! The GPU tier against the real daemon, through the host stand-in backend (the same code
//! paths as CUDA's, with the driver's rules enforced): arenas pinned for DMA at start, the
//! time and bytes exported; daemon-driven transfers between fake engines' KV caches (sealed
//! memfds standing in for CUDA IPC handles) and kvd, across processes, bit for bit, with an
//! engine killed mid-transfer; bad attachments refused; and a clear refusal of
//! `gpu.backend = "cuda"` in a build without the `cuda` feature. On a machine with a GPU,
//! `cargo test -p kvd-gpu --features cuda` runs the driver itself.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

use kvd_client::gpu::{BlockCode, GpuLayer, GpuShare};
use kvd_client::{BlockKey, ClientError};
use kvd_proto::ErrorCode;
use kvd_tests::engine::{expected_page, FakeEngine};
use kvd_tests::redis::free_port;
use kvd_tests::{bin, client_key as key, pattern, test_namespace, wait_for, Daemon};

fn test_client(d: &Daemon, args: &[&str]) -> Command {
    let mut c = Command::new(bin("kvd-test-client"));
    c.arg("--socket").arg(&d.socket).args(args);
    c
}

fn gpu_attachments(d: &Daemon) -> u64 {
    d.admin()
        .stats()
        .expect("stats")
        .gpu
        .expect("gpu section")
        .attachments
}

#[test]
fn arenas_are_pinned_at_start_and_the_time_is_exported() {
    let port = free_port();
    let listen = format!("metrics.listen=127.0.0.1:{port}");
    // 64 MiB arenas (kvd_tests' default), 2 of them, in 16 MiB pieces from 4 threads.
    let d = Daemon::start(&[
        &listen,
        "gpu.backend=host",
        "gpu.pin_chunk_bytes=16MiB",
        "gpu.pin_threads=4",
    ]);
    d.expect_log("DRAM arenas pinned for GPU DMA");
    d.expect_log("bytes=134217728");
    let (_, body) = kvd_tests::http_get(port, "/metrics");
    assert!(body.contains("kvd_gpu_pinned_bytes 134217728"), "{body}");
    assert!(body.contains("kvd_gpu_pin_seconds "), "{body}");
    // The data path is unchanged.
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("gpu")).expect("ns");
    let data = pattern(9, 1, 1 << 20);
    c.put(&ns, &BlockKey([9; 32]), &data).expect("put");
    let got = c.get(&ns, &BlockKey([9; 32])).expect("get").expect("hit");
    assert!(got[..] == data[..]);
}

#[test]
fn a_retired_namespace_arena_is_unpinned_and_its_fresh_one_pinned() {
    // Two arenas; a third namespace retires an empty, unused one. The host backend refuses
    // a pin overlapping a live one, so the old arena must have been unpinned on its way out
    // (its address range is usually reused) and the new one pinned.
    let d = Daemon::start(&["gpu.backend=host", "gpu.pin_chunk_bytes=16MiB"]);
    {
        let c = d.admin();
        c.open_namespace(&test_namespace("a")).expect("a");
        c.open_namespace(&test_namespace("b")).expect("b");
    }
    let c = d.admin();
    // The first client's namespaces become unused once the daemon has seen it leave.
    let ns = kvd_tests::wait_for("a fresh arena for c", Duration::from_secs(10), || {
        c.open_namespace(&test_namespace("c")).ok()
    });
    d.expect_log("retired an unused namespace for a new one");
    d.expect_log("new arena pinned for GPU DMA");
    let data = pattern(4, 2, 300_000);
    c.put(&ns, &BlockKey([4; 32]), &data).expect("put");
    let got = c.get(&ns, &BlockKey([4; 32])).expect("get").expect("hit");
    assert!(got[..] == data[..]);
}

#[test]
fn cuda_without_the_cuda_feature_is_a_clear_startup_error() {
    let out = std::process::Command::new(kvd_tests::bin("kvd"))
        .args(["--check-config", "--set", "gpu.backend=cuda"])
        .output()
        .expect("run kvd");
    if out.status.success() {
        eprintln!("SKIPPED: this kvd was built with the cuda feature");
        return;
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gpu.backend") && err.contains("`cuda` feature"),
        "{err}"
    );
}

#[test]
fn daemon_driven_transfers_move_pages_between_two_processes_bit_for_bit() {
    let d = Daemon::start(&["gpu.backend=host", "gpu.pin_chunk_bytes=16MiB"]);
    // Process 1: its engine's pages 0, 2, .., 62 saved by kvd as keys 0..31 (2 layers of
    // 32 KiB pages, padded strides); it exits, dropping its mapping.
    let out = test_client(
        &d,
        &[
            "--mode",
            "gpu-save",
            "--seed",
            "5",
            "--blocks",
            "32",
            "--block-bytes",
            "65536",
        ],
    )
    .output()
    .expect("run gpu-save");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"saved":32}"#
    );
    wait_for(
        "process 1's mapping dropped",
        Duration::from_secs(10),
        || (gpu_attachments(&d) == 0).then_some(()),
    );

    // Process 2 (this one): another engine, other pages, another stride.
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("test-model")).expect("ns");
    let e = FakeEngine::new(2, 40, 32768, 32768 + 4096);
    let att = e.attach(&c, &ns.id);
    assert_eq!(att.block_bytes, 65536);
    assert_eq!(gpu_attachments(&d), 1);
    let keys: Vec<_> = (0..32).map(|i| key(5, i)).collect();
    let pages: Vec<u32> = (0..32).map(|i| 39 - i).collect();
    let codes = c.gpu_load(&att, &keys, &pages, None, true).expect("load");
    assert!(codes.iter().all(|c| *c == BlockCode::Done), "{codes:?}");
    for i in 0..32u64 {
        let src_page = 2 * i;
        for l in 0..2 {
            assert!(
                e.read(l, 39 - i) == expected_page(5 ^ src_page, l, 32768),
                "block {i} layer {l}"
            );
        }
    }
    // The same bytes through the ring: a block is the layers' pages back to back.
    let lease = c.get(&ns, &key(5, 3)).expect("get").expect("hit");
    assert!(lease[..] == e.block(39 - 3)[..]);
    drop(lease);

    // A missing key writes nothing; a layer-wise load writes only its layers.
    e.clear(0);
    let codes = c
        .gpu_load(&att, &[key(5, 999), key(5, 7)], &[1, 0], Some(1..2), true)
        .expect("partial load");
    assert_eq!(codes, [BlockCode::Missing, BlockCode::Done]);
    assert!(e.read(0, 0).iter().all(|b| *b == 0), "layer 0 untouched");
    assert!(
        e.read(1, 0) == expected_page(5 ^ 14, 1, 32768),
        "layer 1 loaded"
    );

    // Saving what kvd holds copies nothing; new pages are saved.
    e.fill(5, 77);
    let codes = c
        .gpu_save(&att, &[key(5, 0), key(6, 0)], &[5, 5])
        .expect("save");
    assert_eq!(codes, [BlockCode::Exists, BlockCode::Done]);
    let lease = c.get(&ns, &key(6, 0)).expect("get").expect("hit");
    assert!(lease[..] == e.block(5)[..]);
    drop(lease);

    // A damaged block is refused by a verifying load (once its checksum is sealed).
    wait_for("block sealed", Duration::from_secs(10), || {
        let l = c.get(&ns, &key(5, 9)).expect("get").expect("hit");
        l.checksum()
            .is_some()
            .then(|| assert!(l.testing_flip_byte(100)))
    });
    c.flush().expect("flush");
    let codes = c
        .gpu_load(&att, &[key(5, 9)], &[3], None, true)
        .expect("verified load");
    assert_eq!(codes, [BlockCode::Corrupt]);

    let s = c.stats().expect("stats").gpu.expect("gpu");
    assert!(s.saved_blocks >= 33 && s.loaded_blocks >= 33, "{s:?}");
    assert!(
        s.d2h_bytes >= 33 * 65536 && s.h2d_bytes >= 32 * 65536,
        "{s:?}"
    );
    assert_eq!(s.copy_errors, 0);
    assert!(c.gpu_detach(&att).expect("detach"));
    assert!(!c.gpu_detach(&att).expect("detach twice"));
    assert_eq!(gpu_attachments(&d), 0);
}

#[test]
fn a_thousand_random_round_trips_are_bit_exact() {
    let d = Daemon::start(&["gpu.backend=host", "gpu.pin_arenas=false"]);
    let out = test_client(
        &d,
        &[
            "--mode",
            "gpu-churn",
            "--seed",
            "11",
            "--iterations",
            "1000",
            "--blocks",
            "6",
            "--pages",
            "24",
            "--layers",
            "3",
            "--block-bytes",
            "12288",
        ],
    )
    .output()
    .expect("run gpu-churn");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(r#"{"rounds":1000,"blocks":6000}"#),
        "{stdout}"
    );
}

#[test]
fn killing_an_engine_mid_transfer_leaves_kvd_healthy() {
    let d = Daemon::start(&["gpu.backend=host", "gpu.pin_arenas=false"]);
    for round in 0..3 {
        let mut child = test_client(
            &d,
            &[
                "--mode",
                "gpu-churn",
                "--seed",
                &format!("{}", 20 + round),
                "--iterations",
                "100000",
                "--blocks",
                "16",
                "--pages",
                "64",
                "--block-bytes",
                "262144",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn gpu-churn");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read ready");
        assert_eq!(line.trim(), "ready");
        std::thread::sleep(Duration::from_millis(50 + 70 * round));
        child.kill().expect("kill -9 the engine");
        let _ = child.wait();
        wait_for(
            "the engine's mappings dropped",
            Duration::from_secs(10),
            || (gpu_attachments(&d) == 0).then_some(()),
        );
    }
    // Still serving: the ring, and a new attachment.
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("after")).expect("ns");
    let data = pattern(3, 3, 100_000);
    c.put(&ns, &BlockKey([3; 32]), &data).expect("put");
    assert!(c.get(&ns, &BlockKey([3; 32])).expect("get").expect("hit")[..] == data[..]);
    let e = FakeEngine::new(1, 4, 4096, 4096);
    let att = e.attach(&c, &ns.id);
    e.fill(1, 9);
    assert_eq!(
        c.gpu_save(&att, &[BlockKey([4; 32])], &[1]).expect("save"),
        [BlockCode::Done]
    );
    assert!(!d.log_contains("panicked"), "{}", d.log_text());
}

fn server_error(e: ClientError) -> (ErrorCode, String) {
    match e {
        ClientError::Server { code, message } => (code, message),
        other => panic!("expected a server error, got {other}"),
    }
}

#[test]
fn bad_attachments_and_requests_are_refused_and_the_connection_goes_on() {
    let d = Daemon::start(&["gpu.backend=host", "gpu.pin_arenas=false"]);
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("bad")).expect("ns");
    let e = FakeEngine::new(2, 8, 4096, 4096);

    // A layer running past its allocation.
    let mut layers = e.layout();
    layers[1].pages = 9;
    let (code, msg) = server_error(
        c.gpu_attach(&ns.id, &e.shares(), &[e.fd()], &layers)
            .unwrap_err(),
    );
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(
        msg.contains("layer 1") && msg.contains("do not fit"),
        "{msg}"
    );
    // A share index that does not exist; a page larger than its stride.
    let mut layers = e.layout();
    layers[0].share = 3;
    let (_, msg) = server_error(
        c.gpu_attach(&ns.id, &e.shares(), &[e.fd()], &layers)
            .unwrap_err(),
    );
    assert!(msg.contains("names share 3"), "{msg}");
    // The announced length must be the memfd's.
    let (_, msg) = server_error(
        c.gpu_attach(
            &ns.id,
            &[GpuShare::Fd { len: 1 << 20 }],
            &[e.fd()],
            &e.layout(),
        )
        .unwrap_err(),
    );
    assert!(msg.contains("cannot map shared allocation 0"), "{msg}");
    // A memfd its owner could shrink.
    let unsealed = unsealed_memfd(65536);
    let (_, msg) = server_error(
        c.gpu_attach(
            &ns.id,
            &[GpuShare::Fd { len: 65536 }],
            &[std::os::fd::AsFd::as_fd(&unsealed)],
            &[GpuLayer {
                share: 0,
                offset: 0,
                stride: 4096,
                page: 4096,
                pages: 16,
            }],
        )
        .unwrap_err(),
    );
    assert!(msg.contains("not sealed against shrinking"), "{msg}");
    // A CUDA IPC handle is not something the host backend can map.
    let (_, msg) = server_error(
        c.gpu_attach(&ns.id, &[GpuShare::CudaIpc([7; 64])], &[], &e.layout())
            .unwrap_err(),
    );
    assert!(msg.contains("not CUDA IPC"), "{msg}");
    // Blocks larger than the daemon takes.
    let big = FakeEngine::new(2, 2, 8 << 20, 8 << 20);
    let (code, msg) = server_error(
        c.gpu_attach(&ns.id, &big.shares(), &[big.fd()], &big.layout())
            .unwrap_err(),
    );
    assert_eq!(code, ErrorCode::TooLarge, "{msg}");
    // A namespace this connection has not opened.
    let other = test_namespace("never-opened").id();
    let (code, _) = server_error(
        c.gpu_attach(&other, &e.shares(), &[e.fd()], &e.layout())
            .unwrap_err(),
    );
    assert_eq!(code, ErrorCode::UnknownNamespace);
    assert_eq!(
        gpu_attachments(&d),
        0,
        "failed attaches leave nothing mapped"
    );

    let att = e.attach(&c, &ns.id);
    // Pages out of range, an unknown attachment, a bad layer range.
    let (_, msg) = server_error(c.gpu_save(&att, &[BlockKey([1; 32])], &[8]).unwrap_err());
    assert!(msg.contains("out of range"), "{msg}");
    let ghost = kvd_client::GpuAttachment {
        id: att.id + 100,
        block_bytes: att.block_bytes,
    };
    let (_, msg) = server_error(c.gpu_save(&ghost, &[BlockKey([1; 32])], &[0]).unwrap_err());
    assert!(msg.contains("not held by this connection"), "{msg}");
    let (_, msg) = server_error(
        c.gpu_load(&att, &[BlockKey([1; 32])], &[0], Some(1..3), true)
            .unwrap_err(),
    );
    assert!(msg.contains("layers 1..3 of 2"), "{msg}");
    // Nothing was stored or left reserved by the refused save.
    let s = c.stats().expect("stats");
    let n = s
        .namespaces
        .iter()
        .find(|n| n.ns == ns.id)
        .expect("ns stats");
    assert_eq!((n.blocks, n.reserved), (0, 0));
    // And the connection still works.
    e.fill(0, 1);
    assert_eq!(
        c.gpu_save(&att, &[BlockKey([1; 32])], &[0]).expect("save"),
        [BlockCode::Done]
    );
    // A block of another size is not loaded into these pages.
    c.put(&ns, &BlockKey([2; 32]), &[1u8; 100]).expect("put");
    assert_eq!(
        c.gpu_load(&att, &[BlockKey([2; 32])], &[1], None, false)
            .expect("load"),
        [BlockCode::BadSize]
    );
}

#[test]
fn without_a_gpu_backend_transfers_are_refused_clearly() {
    let d = Daemon::start(&[]);
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("nogpu")).expect("ns");
    let e = FakeEngine::new(1, 4, 4096, 4096);
    let (code, msg) = server_error(
        c.gpu_attach(&ns.id, &e.shares(), &[e.fd()], &e.layout())
            .unwrap_err(),
    );
    assert_eq!(code, ErrorCode::Unsupported);
    assert!(msg.contains("gpu.backend"), "{msg}");
    assert!(c.stats().expect("stats").gpu.is_none());
}

fn unsealed_memfd(len: i64) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscalls; the results are checked.
    unsafe {
        let raw = libc::memfd_create(c"kvd-unsealed".as_ptr(), libc::MFD_ALLOW_SEALING);
        assert!(raw >= 0);
        assert_eq!(libc::ftruncate(raw, len), 0);
        std::os::fd::OwnedFd::from_raw_fd(raw)
    }
}

fn tier(d: &Daemon, t: kvd_client::Tier) -> kvd_client::TierStats {
    d.admin()
        .stats()
        .expect("stats")
        .tiers
        .into_iter()
        .find(|s| s.tier == t)
        .expect("tier in stats")
}

#[test]
fn the_gpu_block_pool_serves_recent_saves_device_to_device() {
    use kvd_client::Tier;
    // A 16 MiB pool, 1 MiB blocks (two 512 KiB layer pages), 40 of them saved: the pool
    // keeps the most recent saves, DRAM (64 MiB) all of them.
    let d = Daemon::start(&[
        "gpu.backend=host",
        "gpu.pin_arenas=false",
        "gpu.pool_bytes=16MiB",
        "dram.max_block_bytes=1MiB",
    ]);
    d.expect_log("GPU block pool (T0) allocated");
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("t0")).expect("ns");
    let src = FakeEngine::new(2, 64, 1 << 19, 1 << 19);
    let dst = FakeEngine::new(2, 64, 1 << 19, 1 << 19);
    let (a, b) = (src.attach(&c, &ns.id), dst.attach(&c, &ns.id));
    let n = 40u64;
    for p in 0..n {
        src.fill(p, 1000 + p);
    }
    let keys: Vec<_> = (0..n).map(|i| key(9, i)).collect();
    let pages: Vec<u32> = (0..n as u32).collect();
    // Four steps of ten blocks each.
    for (k, p) in keys.chunks(10).zip(pages.chunks(10)) {
        let codes = c.gpu_save(&a, k, p).expect("save");
        assert!(codes.iter().all(|c| *c == BlockCode::Done), "{codes:?}");
    }
    let pool = tier(&d, Tier::Gpu);
    assert_eq!(pool.capacity_bytes, 16 << 20);
    assert!(
        pool.blocks > 0 && pool.blocks < n && pool.evictions > 0,
        "{pool:?}"
    );
    assert!(pool.used_bytes <= 16 << 20);
    // Every block loads bit for bit, the recent ones from the pool, the rest from DRAM.
    let dram_hits = tier(&d, Tier::Dram).hits;
    let codes = c.gpu_load(&b, &keys, &pages, None, true).expect("load");
    assert!(codes.iter().all(|c| *c == BlockCode::Done), "{codes:?}");
    for p in 0..n {
        for l in 0..2 {
            assert!(dst.read(l, p) == src.read(l, p), "page {p} layer {l}");
        }
    }
    let after = tier(&d, Tier::Gpu);
    assert_eq!(after.hits, pool.blocks, "{after:?}");
    assert_eq!(tier(&d, Tier::Dram).hits - dram_hits, n - pool.blocks);
    // A layer range from the pool: only that layer is written.
    let newest = n - 1;
    dst.clear(newest);
    let codes = c
        .gpu_load(&b, &[key(9, newest)], &[newest as u32], Some(1..2), false)
        .expect("layer load");
    assert_eq!(codes, [BlockCode::Done]);
    assert!(dst.read(0, newest).iter().all(|x| *x == 0));
    assert!(dst.read(1, newest) == src.read(1, newest));
    // Deleted keys are never served from the pool.
    assert_eq!(c.delete(&ns.id, &[key(9, newest)]).expect("delete"), 1);
    let codes = c
        .gpu_load(&b, &[key(9, newest)], &[0], None, true)
        .expect("load deleted");
    assert_eq!(codes, [BlockCode::Missing]);
    let s = c.stats().expect("stats");
    assert_eq!(
        s.tiers[0].tier,
        Tier::Gpu,
        "the pool is listed first, as the fastest tier"
    );
}

#[test]
fn a_block_pool_without_a_gpu_backend_is_a_config_error() {
    let out = Command::new(bin("kvd"))
        .args(["--check-config", "--set", "gpu.pool_bytes=64MiB"])
        .output()
        .expect("run kvd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gpu.pool_bytes") && err.contains("GPU backend"),
        "{err}"
    );
}

#[test]
fn a_block_pool_too_small_for_one_block_stops_the_start_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(bin("kvd"))
        .arg("--socket")
        .arg(dir.path().join("kvd.sock"))
        .args(["--set", "gpu.backend=host", "--set", "gpu.pool_bytes=1MiB"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run kvd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot allocate the GPU block pool (gpu.pool_bytes)")
            && err.contains("holds no allocator chunk"),
        "{err}"
    );
    assert_eq!(err.matches("holds no allocator chunk").count(), 1, "{err}");
    assert!(
        !dir.path().join("kvd.sock").exists(),
        "no socket left behind"
    );
}
