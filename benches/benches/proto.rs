//! Guards the cost of the control-plane codec and key hashing.
//!
//! A 1024-key lookup frame is encoded by the scheduler and decoded by the daemon on every
//! request; both must stay a small fraction of the 100 µs lookup budget. Descriptor decode runs
//! once per ring operation and must stay in the nanoseconds. `chain_key` is what a connector
//! pays per block to name it.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kvd_proto::frame::Request;
use kvd_proto::key::chain_key;
use kvd_proto::ring::{Op, Submission};
use kvd_proto::{BlockKey, NamespaceId};

fn codec(c: &mut Criterion) {
    let keys: Vec<BlockKey> = (0..1024u32).map(|i| chain_key(None, &[i], &[])).collect();
    let req = Request::Lookup {
        ns: NamespaceId([1; 16]),
        keys,
    };
    let frame = req.encode(7);
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function("encode_lookup_1024", |b| b.iter(|| req.encode(7)));
    g.bench_function("decode_lookup_1024", |b| {
        b.iter(|| Request::decode(&frame[4..]).map(|r| r.0))
    });
    g.finish();

    let d = Submission::new(Op::Get, 3, 9).encode();
    c.bench_function("descriptor_decode", |b| {
        b.iter(|| Submission::decode(std::hint::black_box(&d)).map(|s| s.arg0))
    });
    let tokens: Vec<u32> = (0..32).collect();
    c.bench_function("chain_key_32_tokens", |b| {
        b.iter(|| chain_key(Some(&BlockKey::ROOT), &tokens, &[]))
    });
}

criterion_group!(benches, codec);
criterion_main!(benches);
