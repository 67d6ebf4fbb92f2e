//! The GPU tier: opening the configured backend and pinning the DRAM arenas for DMA at start,
//! daemon-driven transfers between engines' KV buffers and the arenas ([`attach`]), and the
//! optional daemon-owned block pool in GPU memory, T0 ([`pool`]).
//!
//! Why at start, in the daemon: pinning tens of GiB takes seconds to tens of seconds, so it is
//! done once, in parallel chunks, and its time reported, instead of by every engine process
//! on its first copy. Pieces are cut on the allocator's chunk boundaries, which no block
//! crosses, so every block lies inside one registration.

pub mod attach;
pub mod pool;

use std::sync::Arc;
use std::time::Duration;

use kvd_gpu::method::CopyMethod;
use kvd_gpu::{Backend, GpuError};

use crate::config::{GpuBackendKind, GpuConfig};

/// The open GPU backend and what pinning the arenas took.
#[derive(Debug)]
pub struct Gpu {
    /// The backend.
    pub backend: Arc<dyn Backend>,
    /// Bytes of DRAM pinned for DMA.
    pub pinned_bytes: u64,
    /// Wall time of pinning every arena.
    pub pin_time: Duration,
    /// Counters of daemon-driven transfers.
    pub counters: Arc<attach::Counters>,
    /// The T0 block pool, when `gpu.pool_bytes` is set.
    pub pool: Option<Arc<pool::Pool>>,
}

impl Gpu {
    /// The GPU section of the daemon's statistics.
    pub fn report(&self) -> kvd_proto::gpu::GpuReport {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.counters;
        kvd_proto::gpu::GpuReport {
            backend: self.backend.name(),
            pinned_bytes: self.pinned_bytes,
            pin_ms: self.pin_time.as_millis() as u64,
            attachments: c.attachments.load(Relaxed),
            saved_blocks: c.saved_blocks.load(Relaxed),
            loaded_blocks: c.loaded_blocks.load(Relaxed),
            d2h_bytes: c.d2h_bytes.load(Relaxed),
            h2d_bytes: c.h2d_bytes.load(Relaxed),
            copy_errors: c.copy_errors.load(Relaxed),
            last_error: c.last_error.lock().clone(),
        }
    }
}

/// Opens the configured backend; `None` when the GPU tier is off.
pub fn open(cfg: &GpuConfig) -> Result<Option<Arc<dyn Backend>>, GpuError> {
    match cfg.backend {
        GpuBackendKind::Off => Ok(None),
        GpuBackendKind::Host => Ok(Some(Arc::new(kvd_gpu::host::HostBackend::new()))),
        GpuBackendKind::Cuda => open_cuda(cfg.device, cfg.copy_method),
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(device: u32, method: CopyMethod) -> Result<Option<Arc<dyn Backend>>, GpuError> {
    let ordinal = i32::try_from(device)
        .map_err(|_| GpuError::Invalid(format!("device {device} out of range")))?;
    Ok(Some(Arc::new(kvd_gpu::cuda::CudaBackend::open(
        ordinal, method,
    )?)))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_device: u32, _method: CopyMethod) -> Result<Option<Arc<dyn Backend>>, GpuError> {
    // Config validation refuses this first; kept as an error rather than a panic.
    Err(GpuError::Unavailable(
        "this kvd was built without the `cuda` feature".into(),
    ))
}

/// Bytes of one pinning call: `want` rounded to whole allocator chunks (at least one).
pub fn pin_chunk(want: u64, alloc_chunk: u64) -> u64 {
    let n = (want / alloc_chunk.max(1)).max(1);
    n * alloc_chunk.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_chunks_are_whole_allocator_chunks() {
        assert_eq!(pin_chunk(1 << 30, 8 << 20), 1 << 30);
        assert_eq!(pin_chunk((1 << 30) + 5, 8 << 20), 1 << 30);
        assert_eq!(pin_chunk(1 << 20, 8 << 20), 8 << 20);
        assert_eq!(pin_chunk(12 << 20, 10 << 20), 10 << 20);
    }

    #[test]
    fn off_opens_nothing_and_host_opens_the_stand_in() {
        let mut cfg = GpuConfig::default();
        assert!(open(&cfg).unwrap().is_none());
        cfg.backend = GpuBackendKind::Host;
        assert_eq!(open(&cfg).unwrap().unwrap().name(), "host");
    }
}
