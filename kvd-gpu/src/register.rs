//! Pinning a DRAM arena for DMA, once at start, in parallel chunks, with its time reported.
//!
//! Why chunks: the driver pins page by page, so one call over tens of GiB takes tens of
//! seconds on one core (LMCache users report ~45 s for 80 GB). Registering aligned chunks
//! from several threads spreads that work. Chunks must not split a block — a copy that
//! crosses two registrations may not be DMA'd in one piece — so the chunk size is a multiple
//! of kvd's allocator chunk, which no slot ever crosses. A failure unpins what was pinned and
//! names the chunk.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{Backend, GpuError};

/// The ranges `(offset, len)` covering `len` bytes, cut at `origin + k * chunk` (so a unit
/// of `chunk` bytes starting at `origin` is never split; the first and last pieces may be
/// shorter). `chunk` 0: one piece.
pub fn chunks(len: usize, origin: usize, chunk: usize) -> Vec<(usize, usize)> {
    if len == 0 {
        return Vec::new();
    }
    if chunk == 0 {
        return vec![(0, len)];
    }
    let mut out = Vec::new();
    let mut at = 0;
    let mut cut = origin % chunk;
    while at < len {
        if cut <= at {
            cut += chunk;
            continue;
        }
        let end = cut.min(len);
        out.push((at, end - at));
        at = end;
    }
    out
}

/// What pinning took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinReport {
    /// Bytes pinned.
    pub bytes: usize,
    /// Registrations made.
    pub chunks: usize,
    /// Threads used.
    pub threads: usize,
    /// Wall time.
    pub elapsed: Duration,
}

/// A pinned host range; unpinned when dropped.
pub struct Pinned {
    backend: Arc<dyn Backend>,
    starts: Vec<usize>,
    report: PinReport,
}

impl std::fmt::Debug for Pinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pinned")
            .field("backend", &self.backend.name())
            .field("report", &self.report)
            .finish()
    }
}

impl Pinned {
    /// What pinning took.
    pub fn report(&self) -> PinReport {
        self.report
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        for &s in &self.starts {
            // SAFETY: each start begins a range this backend registered in `pin_parallel`,
            // and the owner drops the guard only when no copy uses the range any more.
            if let Err(e) = unsafe { self.backend.unregister_host(s as *mut u8) } {
                tracing::warn!(start = s, error = %e, "unpinning host memory failed");
            }
        }
    }
}

/// Pins `[base, base + len)` in pieces cut at `origin + k * chunk` (see [`chunks`]; chunk 0:
/// one call) from up to `threads` threads. On any failure every piece pinned so far is
/// unpinned and the error names the failing piece's offset.
///
/// # Safety
/// The range must be mapped host memory that outlives the returned guard, and `chunk` must be
/// a multiple of the unit copies never cross (kvd's allocator chunk, whose first one starts
/// at `origin`).
pub unsafe fn pin_parallel(
    backend: Arc<dyn Backend>,
    base: *mut u8,
    len: usize,
    origin: usize,
    chunk: usize,
    threads: usize,
) -> Result<Pinned, GpuError> {
    let t = Instant::now();
    let parts = chunks(len, origin, chunk);
    let threads = threads.clamp(1, parts.len().max(1));
    let next = AtomicUsize::new(0);
    let done: Mutex<Vec<usize>> = Mutex::new(Vec::with_capacity(parts.len()));
    let failed: Mutex<Option<GpuError>> = Mutex::new(None);
    let base = base as usize;
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(off, n)) = parts.get(i) else { break };
                if failed.lock().map(|f| f.is_some()).unwrap_or(true) {
                    break;
                }
                // SAFETY: the chunk lies inside the caller's mapped range (see this
                // function's contract), and chunks never overlap.
                match unsafe { backend.register_host((base + off) as *mut u8, n) } {
                    Ok(()) => {
                        if let Ok(mut d) = done.lock() {
                            d.push(base + off);
                        }
                    }
                    Err(e) => {
                        if let Ok(mut f) = failed.lock() {
                            f.get_or_insert(GpuError::Invalid(format!(
                                "pinning {n} bytes at offset {off} of {len}: {e}"
                            )));
                        }
                        break;
                    }
                }
            });
        }
    });
    let starts = done.into_inner().unwrap_or_default();
    let pinned = Pinned {
        backend,
        report: PinReport {
            bytes: len,
            chunks: starts.len(),
            threads,
            elapsed: t.elapsed(),
        },
        starts,
    };
    match failed
        .into_inner()
        .unwrap_or_else(|_| Some(GpuError::Invalid("a pinning thread panicked".into())))
    {
        // Dropping the guard unpins what was pinned.
        Some(e) => Err(e),
        None => Ok(pinned),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostBackend;

    #[test]
    fn chunks_cover_the_range_exactly() {
        assert_eq!(chunks(10, 0, 4), vec![(0, 4), (4, 4), (8, 2)]);
        assert_eq!(chunks(8, 0, 4), vec![(0, 4), (4, 4)]);
        assert_eq!(chunks(8, 0, 0), vec![(0, 8)]);
        assert!(chunks(0, 0, 4).is_empty());
        // An arena header of 3 bytes before 4-byte allocator chunks: cuts at 3, 7, 11.
        assert_eq!(chunks(13, 3, 4), vec![(0, 3), (3, 4), (7, 4), (11, 2)]);
        assert_eq!(chunks(13, 7, 4), vec![(0, 3), (3, 4), (7, 4), (11, 2)]);
        for (len, origin, chunk) in [(100, 17, 9), (64, 0, 64), (65, 1, 64), (5, 9, 3)] {
            let c = chunks(len, origin, chunk);
            assert_eq!(c.iter().map(|p| p.1).sum::<usize>(), len);
            assert!(c.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
            assert!(c
                .iter()
                .skip(1)
                .all(|p| (p.0 + chunk - origin % chunk) % chunk == 0));
        }
    }

    #[test]
    fn an_arena_is_pinned_in_parallel_chunks_and_unpinned_on_drop() {
        let host = Arc::new(HostBackend::new());
        let mut arena = vec![0u8; 64 << 10];
        // SAFETY: `arena` outlives the guard (dropped below).
        let pinned =
            unsafe { pin_parallel(host.clone(), arena.as_mut_ptr(), arena.len(), 0, 8 << 10, 4) }
                .unwrap();
        let r = pinned.report();
        assert_eq!((r.bytes, r.chunks, r.threads), (64 << 10, 8, 4));
        let mut regs = host.registrations();
        regs.sort();
        let base = arena.as_ptr() as usize;
        let want: Vec<(usize, usize)> = (0..8).map(|i| (base + i * (8 << 10), 8 << 10)).collect();
        assert_eq!(regs, want);
        drop(pinned);
        assert!(host.registrations().is_empty());
    }

    #[test]
    fn a_failed_chunk_unpins_the_others_and_names_itself() {
        let host = Arc::new(HostBackend::new());
        let mut arena = vec![0u8; 64 << 10];
        // Someone pinned a piece in the middle already: registering over it must fail.
        // SAFETY: `arena` outlives every registration made here.
        unsafe { host.register_host(arena.as_mut_ptr().add(40 << 10), 4096) }.unwrap();
        // SAFETY: `arena` outlives the call (nothing stays pinned by it on failure).
        let e =
            unsafe { pin_parallel(host.clone(), arena.as_mut_ptr(), arena.len(), 0, 8 << 10, 3) }
                .unwrap_err();
        assert!(e.to_string().contains("at offset 40960"), "{e}");
        assert_eq!(
            host.registrations().len(),
            1,
            "only the foreign registration is left"
        );
    }
}
