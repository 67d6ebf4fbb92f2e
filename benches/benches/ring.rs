//! Guards the data-plane round trip between two threads over a real shared-memory ring.
//!
//! This is the per-operation overhead a client pays on top of copying its bytes (kvd-bench
//! measures the same across processes). A regression here shows up directly in per-op latency
//! of small blocks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use kvd_proto::ring::{Completion, Op, Status, Submission};
use kvd_shm::{ClientRing, DaemonRing};

fn round_trip(c: &mut Criterion) {
    let (mut d, fd) = DaemonRing::create(256).expect("ring");
    let mut client = ClientRing::from_fd(&fd, d.bytes()).expect("map");
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let server = std::thread::spawn(move || {
        while !stop2.load(Ordering::Relaxed) {
            match d.pop() {
                Ok(Some(s)) => {
                    while !d.post(&Completion::reply(&s, Status::Ok)).unwrap_or(true) {}
                    d.notify();
                }
                Ok(None) => std::hint::spin_loop(),
                Err(_) => break,
            }
        }
    });
    let mut n = 0u64;
    c.bench_function("ring_round_trip_spinning", |b| {
        b.iter(|| {
            n += 1;
            let s = Submission::new(Op::Nop, 0, n);
            client.push(&s).expect("push");
            client.notify();
            client
                .wait(Duration::from_millis(1), Duration::from_secs(5))
                .expect("completion")
        })
    });
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
}

criterion_group!(benches, round_trip);
criterion_main!(benches);
