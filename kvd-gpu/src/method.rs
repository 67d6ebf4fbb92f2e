//! How a batch of copies reaches the device: one driver copy per run, the driver's batched
//! copy, or kvd's copy kernel — and the bookkeeping that decides which one may run.
//!
//! Why three: a paged KV block of many layers is many copies of a few KiB each. One
//! `cuMemcpyAsync` per run costs microseconds of driver time apiece, longer than a small run
//! takes over PCIe, so gathers of small pages are driver-bound. `cuMemcpyBatchAsync` (CUDA
//! 12.8) hands the driver the whole list in one call and keeps the copy engines; kvd's copy
//! kernel (`kernels/kvd.cu`) moves every run in one launch with the SMs' own loads and stores,
//! which needs host memory mapped for the device. Large runs gain nothing from either.
//! The pure parts live here, so they are tested without a GPU.

use std::collections::BTreeMap;
use std::str::FromStr;

/// kvd's kernels as PTX (`kernels/kvd.cu`, built by scripts/gpu-kernels.sh: the copy kernel
/// and the checksum kernel), NUL terminated for `cuModuleLoadData`; the driver compiles it for
/// the device at start.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) const KERNELS_PTX: &str = concat!(include_str!("../kernels/kvd.ptx"), "\0");

/// One copy between two addresses the device can reach (device memory, or pinned host memory
/// mapped for the device), in the layout the copy kernel reads: three native-endian `u64`s.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Source address.
    pub src: u64,
    /// Destination address.
    pub dst: u64,
    /// Bytes.
    pub len: u64,
}

/// How batches of copies are issued (`gpu.copy_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyMethod {
    /// The kernel for batches of small runs where it can run, else the driver's batched copy
    /// where the driver has it, else one copy per run; one copy per run for large runs.
    #[default]
    Auto,
    /// One `cuMemcpyAsync` per run.
    Memcpy,
    /// `cuMemcpyBatchAsync` (driver for CUDA 12.8 or newer).
    Batch,
    /// kvd's copy kernel (host memory must be pinned by this backend).
    Kernel,
}

impl CopyMethod {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CopyMethod::Auto => "auto",
            CopyMethod::Memcpy => "memcpy",
            CopyMethod::Batch => "batch",
            CopyMethod::Kernel => "kernel",
        }
    }
}

impl std::fmt::Display for CopyMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CopyMethod {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(CopyMethod::Auto),
            "memcpy" => Ok(CopyMethod::Memcpy),
            "batch" => Ok(CopyMethod::Batch),
            "kernel" => Ok(CopyMethod::Kernel),
            other => Err(format!(
                "{other:?} is not a copy method: auto, memcpy, batch or kernel"
            )),
        }
    }
}

/// Mean run length at or above which `Auto` issues one driver copy per run: such copies keep
/// the bus busy on their own, and the copy engines leave the SMs to the engine.
pub const LARGE_RUN: u64 = 1 << 20;

/// What a backend can do for one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Abilities {
    /// The driver has `cuMemcpyBatchAsync`.
    pub batch: bool,
    /// The copy kernel is loaded and every host range of this batch is mapped for the device.
    pub kernel: bool,
}

/// The method that runs a batch of `runs` copies of `bytes` in all. An explicit method that
/// cannot run this batch falls back to one copy per run (which always can).
pub fn choose(wanted: CopyMethod, runs: usize, bytes: u64, can: Abilities) -> CopyMethod {
    let method = match wanted {
        CopyMethod::Auto if runs <= 1 || bytes / runs.max(1) as u64 >= LARGE_RUN => {
            CopyMethod::Memcpy
        }
        CopyMethod::Auto if can.kernel => CopyMethod::Kernel,
        CopyMethod::Auto if can.batch => CopyMethod::Batch,
        CopyMethod::Auto => CopyMethod::Memcpy,
        other => other,
    };
    match method {
        CopyMethod::Kernel if !can.kernel => CopyMethod::Memcpy,
        CopyMethod::Batch if !can.batch => CopyMethod::Memcpy,
        m => m,
    }
}

/// `spans` with every span longer than `piece` cut into pieces of at most `piece` bytes, so
/// the kernel's thread blocks share a batch of a few large runs evenly. `piece` 0: unchanged.
pub fn split(spans: &[Span], piece: u64) -> Vec<Span> {
    if piece == 0 {
        return spans.to_vec();
    }
    let mut out = Vec::with_capacity(spans.len());
    for s in spans {
        let mut at = 0;
        while at < s.len {
            let len = piece.min(s.len - at);
            out.push(Span {
                src: s.src + at,
                dst: s.dst + at,
                len,
            });
            at += len;
        }
    }
    out
}

/// Host ranges pinned and mapped for the device, to tell whether the kernel may touch an
/// address: a kernel reading unmapped host memory faults and takes the whole CUDA context with
/// it, where a driver copy from unpinned memory is only slower.
#[derive(Debug, Default)]
pub struct Registry {
    ranges: BTreeMap<usize, usize>,
}

impl Registry {
    /// Records `[start, start + len)` as mapped.
    pub fn insert(&mut self, start: usize, len: usize) {
        self.ranges.insert(start, len);
    }

    /// Forgets the range starting at `start`.
    pub fn remove(&mut self, start: usize) {
        self.ranges.remove(&start);
    }

    /// Whether every byte of `[start, start + len)` lies in recorded ranges (adjacent ranges
    /// together count as one: a merged run may cross from one pinning chunk into the next).
    pub fn covers(&self, start: usize, len: usize) -> bool {
        let Some(end) = start.checked_add(len) else {
            return false;
        };
        let mut at = start;
        let Some((&first, &first_len)) = self.ranges.range(..=at).next_back() else {
            return false;
        };
        let mut reach = first.saturating_add(first_len);
        while reach < end {
            if reach <= at {
                return false;
            }
            at = reach;
            match self.ranges.get(&at) {
                Some(&l) => reach = at.saturating_add(l),
                None => return false,
            }
        }
        reach > start || len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: Abilities = Abilities {
        batch: true,
        kernel: true,
    };
    const NONE: Abilities = Abilities {
        batch: false,
        kernel: false,
    };

    #[test]
    fn auto_sends_small_runs_to_the_kernel_and_large_ones_to_the_copy_engines() {
        assert_eq!(
            choose(CopyMethod::Auto, 8192, 8192 * 2048, BOTH),
            CopyMethod::Kernel
        );
        assert_eq!(
            choose(CopyMethod::Auto, 256, 256 << 20, BOTH),
            CopyMethod::Memcpy
        );
        assert_eq!(choose(CopyMethod::Auto, 1, 4096, BOTH), CopyMethod::Memcpy);
        let batch_only = Abilities {
            batch: true,
            kernel: false,
        };
        assert_eq!(
            choose(CopyMethod::Auto, 64, 64 * 4096, batch_only),
            CopyMethod::Batch
        );
        assert_eq!(
            choose(CopyMethod::Auto, 64, 64 * 4096, NONE),
            CopyMethod::Memcpy
        );
    }

    #[test]
    fn an_explicit_method_runs_where_it_can_else_one_copy_per_run() {
        for m in [CopyMethod::Memcpy, CopyMethod::Batch, CopyMethod::Kernel] {
            assert_eq!(choose(m, 256, 256 << 20, BOTH), m);
            assert_eq!(choose(m, 256, 256 << 20, NONE), CopyMethod::Memcpy);
        }
    }

    #[test]
    fn methods_parse_from_their_names_and_refuse_others() {
        for m in [
            CopyMethod::Auto,
            CopyMethod::Memcpy,
            CopyMethod::Batch,
            CopyMethod::Kernel,
        ] {
            assert_eq!(m.as_str().parse::<CopyMethod>(), Ok(m));
        }
        let e = "dma".parse::<CopyMethod>().unwrap_err();
        assert!(e.contains("auto, memcpy, batch or kernel"), "{e}");
    }

    #[test]
    fn split_cuts_long_spans_and_keeps_every_byte_once() {
        let spans = [
            Span {
                src: 0x1000,
                dst: 0x9000,
                len: 10,
            },
            Span {
                src: 0x2000,
                dst: 0xa000,
                len: 3,
            },
        ];
        let out = split(&spans, 4);
        assert_eq!(out.iter().map(|s| s.len).collect::<Vec<_>>(), [4, 4, 2, 3]);
        assert_eq!(out[2].src, 0x1008);
        assert_eq!(out[2].dst, 0x9008);
        assert_eq!(split(&spans, 0), spans.to_vec());
    }

    #[test]
    fn registry_covers_ranges_inside_or_across_adjacent_registrations_only() {
        let mut r = Registry::default();
        r.insert(1000, 100);
        r.insert(1100, 100);
        r.insert(1300, 50);
        assert!(r.covers(1000, 100));
        assert!(r.covers(1050, 100), "across two adjacent registrations");
        assert!(r.covers(1000, 200));
        assert!(!r.covers(1150, 100), "the gap at 1200..1300");
        assert!(!r.covers(999, 2));
        assert!(!r.covers(1340, 20));
        assert!(!r.covers(usize::MAX - 1, 4));
        r.remove(1100);
        assert!(!r.covers(1050, 100));
        assert!(r.covers(1310, 40));
    }

    #[test]
    fn the_embedded_kernels_are_built_from_the_committed_source() {
        use sha2::Digest;
        let source = include_bytes!("../kernels/kvd.cu");
        let sum: String = sha2::Sha256::digest(source)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let first = KERNELS_PTX.lines().next().unwrap_or_default();
        assert!(
            first.contains(&sum),
            "kernels/kvd.ptx was not built from kvd.cu as committed: run \
             scripts/gpu-kernels.sh (first line: {first})"
        );
        assert!(KERNELS_PTX.contains(".entry kvd_copy_runs("));
        assert!(KERNELS_PTX.contains(".entry kvd_xxh3_blocks("));
        assert!(KERNELS_PTX.ends_with('\0'));
    }
}
