//! Admission to the disk tier: write a block only when it is likely to be read again.
//!
//! A one-off prompt's blocks would otherwise burn write bandwidth and push useful blocks out of
//! the log. The filter counts how often each key is seen (committed, read, or offered again
//! after an eviction) in a count-min sketch — the frequency half of TinyLFU — and admits a
//! block once its estimate reaches `min_frequency`. Counters halve every `10 × width`
//! increments so old popularity fades (TinyLFU's reset). Memory is fixed at start: 4 rows of
//! one byte per counter.

use kvd_proto::{BlockKey, NamespaceId};
use serde::{Deserialize, Serialize};
use twox_hash::XxHash3_64;

/// How blocks are admitted to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdmissionPolicy {
    /// Every demoted block is written.
    Always,
    /// Blocks seen at least `disk.admission_min_frequency` times (count-min sketch with aging).
    Frequency,
}

const ROWS: usize = 4;

/// The frequency sketch and the admission decision.
#[derive(Debug)]
pub struct Admission {
    policy: AdmissionPolicy,
    min: u8,
    mask: u64,
    rows: Vec<u8>,
    increments: u64,
    reset_at: u64,
}

impl Admission {
    /// A filter sized for about `expected_keys` distinct hot keys (rounded up to a power of
    /// two, at least 1024 counters per row).
    pub fn new(policy: AdmissionPolicy, min_frequency: u8, expected_keys: usize) -> Self {
        let width = expected_keys.max(1024).next_power_of_two();
        Self {
            policy,
            min: min_frequency.max(1),
            mask: width as u64 - 1,
            rows: if policy == AdmissionPolicy::Always {
                Vec::new()
            } else {
                vec![0; width * ROWS]
            },
            increments: 0,
            reset_at: width as u64 * 10,
        }
    }

    fn slots(&self, ns: &NamespaceId, key: &BlockKey) -> [usize; ROWS] {
        let h = XxHash3_64::oneshot_with_seed(
            u64::from_le_bytes(ns.0[..8].try_into().unwrap_or([0; 8])),
            &key.0,
        );
        let width = self.mask as usize + 1;
        let mut out = [0usize; ROWS];
        for (r, o) in out.iter_mut().enumerate() {
            // Double hashing: row r uses h1 + r·h2.
            let x = (h as u32 as u64).wrapping_add((r as u64).wrapping_mul(h >> 32 | 1));
            *o = r * width + (x & self.mask) as usize;
        }
        out
    }

    /// Records one sighting of a block.
    pub fn record(&mut self, ns: &NamespaceId, key: &BlockKey) {
        if self.rows.is_empty() {
            return;
        }
        for i in self.slots(ns, key) {
            self.rows[i] = self.rows[i].saturating_add(1);
        }
        self.increments += 1;
        if self.increments >= self.reset_at {
            self.increments = 0;
            for c in &mut self.rows {
                *c /= 2;
            }
        }
    }

    /// Estimated sightings of a block (never under the truth since the last reset).
    pub fn estimate(&self, ns: &NamespaceId, key: &BlockKey) -> u8 {
        if self.rows.is_empty() {
            return u8::MAX;
        }
        self.slots(ns, key)
            .iter()
            .map(|&i| self.rows[i])
            .min()
            .unwrap_or(0)
    }

    /// Whether a block should be written to disk.
    pub fn admit(&self, ns: &NamespaceId, key: &BlockKey) -> bool {
        match self.policy {
            AdmissionPolicy::Always => true,
            AdmissionPolicy::Frequency => self.estimate(ns, key) >= self.min,
        }
    }

    /// The configured policy.
    pub fn policy(&self) -> AdmissionPolicy {
        self.policy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u32) -> BlockKey {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&i.to_le_bytes());
        BlockKey(b)
    }

    #[test]
    fn always_admits_everything() {
        let a = Admission::new(AdmissionPolicy::Always, 2, 10);
        assert!(a.admit(&NamespaceId([0; 16]), &k(1)));
    }

    #[test]
    fn frequency_admits_after_enough_sightings_per_namespace() {
        let ns = NamespaceId([1; 16]);
        let other = NamespaceId([2; 16]);
        let mut a = Admission::new(AdmissionPolicy::Frequency, 2, 4096);
        a.record(&ns, &k(1));
        assert!(!a.admit(&ns, &k(1)), "seen once");
        a.record(&ns, &k(1));
        assert!(a.admit(&ns, &k(1)), "seen twice");
        assert!(
            !a.admit(&other, &k(1)),
            "another namespace's sightings do not count"
        );
        // One-off keys stay out even after many other sightings.
        for i in 100..2000 {
            a.record(&ns, &k(i));
        }
        let admitted = (100..2000).filter(|&i| a.admit(&ns, &k(i))).count();
        assert!(admitted < 100, "{admitted} one-off keys admitted");
    }

    #[test]
    fn counts_fade_with_age() {
        let ns = NamespaceId([1; 16]);
        let mut a = Admission::new(AdmissionPolicy::Frequency, 2, 1024);
        a.record(&ns, &k(1));
        a.record(&ns, &k(1));
        assert!(a.admit(&ns, &k(1)));
        // 10 × width increments trigger one halving; two halvings clear a count of 2.
        for _ in 0..(1024 * 20) {
            a.record(&ns, &k(2));
        }
        assert!(a.estimate(&ns, &k(1)) < 2);
    }
}
