//! Shared pieces of kvd's benchmarks: latency statistics and the result record.
//!
//! Every figure `kvd-bench` prints is paired with a reference measured in the same run on the
//! same machine (single-thread memcpy of the same blocks), because absolute numbers on shared
//! machines mean little and a ratio does not drift with the neighbours.

use serde::Serialize;

pub mod tcp;
pub mod uring;

/// One result line of `kvd-bench --json`.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// Tier exercised (`dram`).
    pub tier: &'static str,
    /// Operation (`put`, `get`, `lookup`).
    pub op: &'static str,
    /// Block size in bytes (for lookup: bytes of keys per batch).
    pub size_bytes: u64,
    /// Throughput in GB/s (10^9 bytes), or null where it has no meaning.
    pub gbps: Option<f64>,
    /// Median latency per operation in µs.
    pub p50_us: f64,
    /// 99th percentile latency in µs.
    pub p99_us: f64,
    /// Single-thread memcpy of the same blocks, same run, GB/s (DRAM tier).
    pub memcpy_gbps: Option<f64>,
    /// fio (io_uring, O_DIRECT, same block size, queue depth and filesystem), same run, GB/s
    /// (disk tier).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fio_gbps: Option<f64>,
    /// The AWS SDK's own client doing the same transfers against the same server, same run,
    /// GB/s (S3 tier).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sdk_gbps: Option<f64>,
    /// Queue depth (disk tier).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<u32>,
    /// `gbps` over the reference (`memcpy_gbps`, `fio_gbps` or `sdk_gbps`).
    pub ratio: Option<f64>,
    /// Operations measured.
    pub ops: u64,
}

/// Percentile (0..=100) of samples in nanoseconds, returned in µs.
pub fn percentile_us(sorted_ns: &[u64], p: f64) -> f64 {
    if sorted_ns.is_empty() {
        return 0.0;
    }
    let idx = ((p / 100.0) * (sorted_ns.len() - 1) as f64).round() as usize;
    sorted_ns[idx.min(sorted_ns.len() - 1)] as f64 / 1000.0
}

/// Fills `buf` with a xorshift stream seeded by `seed` (distinct content per block).
pub fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(percentile_us(&v, 50.0), 51.0);
        assert_eq!(percentile_us(&v, 99.0), 99.0);
        assert_eq!(percentile_us(&[], 50.0), 0.0);
    }

    #[test]
    fn fill_is_deterministic_and_seed_dependent() {
        let mut a = vec![0u8; 100];
        let mut b = vec![0u8; 100];
        fill(&mut a, 1);
        fill(&mut b, 1);
        assert_eq!(a, b);
        fill(&mut b, 2);
        assert_ne!(a, b);
    }
}
