//! The GPU tier's start against the real daemon: arenas pinned for DMA through the host
//! stand-in backend (the same path as CUDA's, checked for overlapping or missing pins), the
//! time and bytes exported, and a clear refusal of `gpu.backend = "cuda"` in a build without
//! the `cuda` feature. On a machine with a GPU, `cargo test -p kvd-gpu --features cuda`
//! runs the driver itself.

use std::time::Duration;

use kvd_client::BlockKey;
use kvd_tests::redis::free_port;
use kvd_tests::{pattern, test_namespace, Daemon};

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
    d.expect_log("retired an empty, unused namespace for a new one");
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
