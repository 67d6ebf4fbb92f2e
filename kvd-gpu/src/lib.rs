//! GPU data movement for kvd, behind one trait so the daemon and its tests do not care which
//! accelerator (if any) is present.
//!
//! Why a crate of its own: everything here talks to a driver through raw pointers, and the
//! rest of kvd should see only safe, checked operations — pin a DRAM arena for DMA
//! ([`register::pin_parallel`]), map an engine's KV tensors shared by another process
//! ([`Backend::import`]), plan the copies of a batch of KV pages ([`plan::block_runs`]),
//! and run them ([`Backend::copy_d2h`] / [`Backend::copy_h2d`]). Backends:
//! - [`host::HostBackend`]: "device" memory that is ordinary host memory, with the driver's
//!   rules enforced (no overlapping registrations, copies only inside allocations). Unit tests
//!   and CI, which have no GPU, run every plan through it.
//! - `cuda::CudaBackend` (feature `cuda`): the CUDA driver API through cudarc, loaded at run
//!   time, so building needs no CUDA toolkit; opening it on a machine without libcuda is a
//!   clear [`GpuError::Unavailable`], never a panic. Batches of small copies go through one
//!   driver call or one launch of kvd's copy kernel ([`method`]).

pub mod host;
pub mod method;
pub mod plan;
pub mod register;

#[cfg(feature = "cuda")]
pub mod cuda;

/// An address in device memory (a `CUdeviceptr` on CUDA).
pub type DevicePtr = u64;

/// One contiguous copy of `len` bytes between device address `dev` and host address `host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Device address.
    pub dev: DevicePtr,
    /// Host address.
    pub host: usize,
    /// Bytes.
    pub len: usize,
}

/// One contiguous copy of `len` bytes from device address `src` to device address `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRun {
    /// Source.
    pub src: DevicePtr,
    /// Destination.
    pub dst: DevicePtr,
    /// Bytes.
    pub len: usize,
}

/// Memory another process shares with kvd so that kvd can copy KV pages to and from it
/// itself (the engine's KV tensors).
#[derive(Debug, Clone, Copy)]
pub enum Shared<'a> {
    /// A file descriptor of shareable memory and its length. The host backend maps a memfd
    /// sealed against shrinking (`F_SEAL_SHRINK`), so the owner cannot pull pages from under
    /// a copy.
    Fd {
        /// The descriptor (kvd keeps its own mapping; the caller may close it afterwards).
        fd: std::os::fd::BorrowedFd<'a>,
        /// Bytes to map from offset 0.
        len: u64,
    },
    /// A CUDA IPC memory handle (`cuIpcGetMemHandle`, or torch's `_share_cuda_`) of a
    /// device allocation in another process.
    CudaIpc([u8; CUDA_IPC_HANDLE_BYTES]),
}

/// Size of a CUDA IPC memory handle.
pub const CUDA_IPC_HANDLE_BYTES: usize = 64;

/// A shared allocation mapped into this process: device addresses `[base, base + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapped {
    /// First device address of the mapping.
    pub base: DevicePtr,
    /// Bytes mapped.
    pub len: u64,
}

/// What can go wrong moving bytes to or from a device.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// No usable device or driver here (the message says which and why).
    #[error("no GPU backend: {0}")]
    Unavailable(String),
    /// A driver call failed.
    #[error("{call} failed: {message}")]
    Driver {
        /// The driver function.
        call: &'static str,
        /// The driver's error name and text.
        message: String,
    },
    /// A request that cannot be right (out-of-range page, overlapping registration, ...).
    #[error("invalid GPU request: {0}")]
    Invalid(String),
}

impl std::fmt::Debug for dyn Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// A device and the driver calls kvd needs from it. Copies are synchronous from the caller's
/// point of view: they are queued on the backend's own stream and waited for.
pub trait Backend: Send + Sync {
    /// A short description ("cuda:0 NVIDIA H100 80GB HBM3", "host").
    fn name(&self) -> String;

    /// Pins `[ptr, ptr + len)` for DMA (page-locked and mapped for the device).
    ///
    /// # Safety
    /// The range must be mapped host memory that stays mapped until
    /// [`unregister_host`](Self::unregister_host) is called with the same `ptr`.
    unsafe fn register_host(&self, ptr: *mut u8, len: usize) -> Result<(), GpuError>;

    /// Unpins a range pinned by [`register_host`](Self::register_host) starting at `ptr`.
    ///
    /// # Safety
    /// `ptr` must start a range this backend registered, and no copy may be using it.
    unsafe fn unregister_host(&self, ptr: *mut u8) -> Result<(), GpuError>;

    /// Allocates `len` bytes of device memory.
    fn alloc(&self, len: usize) -> Result<DevicePtr, GpuError>;

    /// Frees an allocation made by [`alloc`](Self::alloc).
    ///
    /// # Safety
    /// `ptr` must come from `alloc` on this backend and not be in use by a copy.
    unsafe fn free(&self, ptr: DevicePtr) -> Result<(), GpuError>;

    /// Maps memory another process shared. Copies may then name device addresses inside the
    /// returned range, until [`close_import`](Self::close_import).
    fn import(&self, shared: Shared<'_>) -> Result<Mapped, GpuError>;

    /// Unmaps a mapping made by [`import`](Self::import).
    ///
    /// # Safety
    /// `base` must be the base of a live import of this backend, and no copy may be using it.
    unsafe fn close_import(&self, base: DevicePtr) -> Result<(), GpuError>;

    /// Copies every run from the device to the host and waits until all have landed.
    ///
    /// # Safety
    /// Every run's device range must lie in device memory this backend can address, and its
    /// host range must be valid for writes and not accessed by anyone else until this returns.
    unsafe fn copy_d2h(&self, runs: &[Run]) -> Result<(), GpuError>;

    /// Copies every run between two device ranges (e.g. kvd's block pool and an engine's
    /// imported KV buffer) and waits until all have landed.
    ///
    /// # Safety
    /// Both ranges of every run must lie in device memory this backend can address; the
    /// destination must not be in use by anyone else meanwhile.
    unsafe fn copy_d2d(&self, runs: &[DeviceRun]) -> Result<(), GpuError>;

    /// Whether copying `runs` device to host would keep the device's SMs busy (kvd's copy
    /// kernel) rather than its copy engines alone. Checksums computed on the device would then
    /// compete with the copy for the SMs (on an H200, 32-layer saves of 4 MiB blocks ran at
    /// 0.77x the bus with them, 0.95x with CPU threads hashing the copy), so callers hash on the
    /// CPU instead.
    fn d2h_uses_sms(&self, runs: &[Run]) -> bool {
        let _ = runs;
        false
    }

    /// The XXH3-64 checksum (kvd's block checksum) of each block `ids[i]` of `layers`, a
    /// block being one page of every layer in order (as [`plan::block_runs`] copies it),
    /// computed where the pages lie; `Ok(None)` when this backend cannot for these layers
    /// (the caller then hashes its copy). Runs beside copies on other threads.
    fn checksums(&self, layers: &[plan::Layer], ids: &[u64]) -> Result<Option<Vec<u64>>, GpuError> {
        let _ = (layers, ids);
        Ok(None)
    }

    /// Copies every run from the host to the device and waits until all have landed.
    ///
    /// # Safety
    /// Every run's host range must be valid for reads and not written meanwhile; its device
    /// range must lie in device memory this backend can address and not be in use.
    unsafe fn copy_h2d(&self, runs: &[Run]) -> Result<(), GpuError>;
}
