//! kvd's own kernels on CUDA (`kernels/kvd.cu`): loading them, the buffers their argument
//! lists pass through, and their launches — the copy kernel for batches of small runs and the
//! checksum kernel for blocks saved from an engine's pages.
//!
//! Why here and not in the backend proper: each launch stages its lists in pinned host memory,
//! DMAs them to the device in stream order, launches and waits, with the buffers locked from
//! the first write to the end of the launch; keeping that in one place keeps the backend's
//! copy paths short.

use std::sync::Mutex;

use cudarc::driver::result;
use cudarc::driver::sys;

use super::{driver, lock, sync};
use crate::method::{split, Span, KERNELS_PTX};
use crate::plan::Layer;
use crate::{DevicePtr, GpuError};

/// The copy kernel's entry point in [`KERNELS_PTX`].
const COPY_KERNEL: &std::ffi::CStr = c"kvd_copy_runs";
/// The checksum kernel's entry point.
const HASH_KERNEL: &std::ffi::CStr = c"kvd_xxh3_blocks";
/// Threads per thread block of the copy kernel (8 warps: 8 runs at a time).
const COPY_THREADS: u32 = 256;
/// Warps per thread block of the copy kernel.
const WARPS: u32 = COPY_THREADS / 32;
/// Threads per thread block of the checksum kernel (4 blocks at a time): small thread blocks
/// (~7k registers) fit on SMs beside the copy kernel's.
const HASH_THREADS: u32 = 64;
/// Threads hashing one block (a half-warp, one stripe of a 1 KiB round each; kernels/kvd.cu).
const HASH_THREADS_PER_BLOCK: u32 = 16;
/// Thread blocks per multiprocessor the copy kernel is launched with (at most): far more loads
/// in flight than PCIe needs to stay busy, in at most half of each SM's thread slots.
const COPY_BLOCKS_PER_SM: u32 = 4;
/// Runs longer than this are cut for the copy kernel, so its warps share the bytes evenly.
const COPY_PIECE: u64 = 64 << 10;
/// Blocks shorter than this are hashed on the CPU (XXH3's long-input path starts above 240).
const HASH_MIN_BLOCK: u64 = 241;

/// A page of a block to hash, as the checksum kernel reads it.
#[repr(C)]
#[derive(Clone, Copy)]
struct HashPage {
    addr: u64,
    len: u64,
}

/// A block to hash: pages `[first, first + count)` of the page list, `len` bytes in all.
#[repr(C)]
#[derive(Clone, Copy)]
struct HashJob {
    first: u32,
    count: u32,
    len: u64,
}

/// The loaded kernels and the buffers their argument lists pass through.
pub(super) struct Kernels {
    module: sys::CUmodule,
    copy: sys::CUfunction,
    hash: sys::CUfunction,
    copy_args: Mutex<Staging>,
    hash_args: Mutex<Staging>,
}

/// Pinned host memory and device memory of the same size: written on the host, DMA'd in
/// stream order (without the driver's staging copy of pageable memory), read by a kernel.
#[derive(Default)]
struct Staging {
    /// Device buffer (0: none yet).
    dev: DevicePtr,
    /// Pinned host buffer (`cuMemAllocHost`; 0: none yet).
    host: usize,
    /// Bytes of each.
    cap: usize,
}

/// Whether the checksum kernel can hash blocks of these layers: pages whole 64-byte stripes,
/// 16-byte aligned (so no stripe crosses a page), blocks on XXH3's long-input path.
pub(super) fn hashable(layers: &[Layer]) -> bool {
    let bytes: u64 = layers.iter().map(|l| l.page).sum();
    bytes >= HASH_MIN_BLOCK
        && u32::try_from(layers.len()).is_ok()
        && layers
            .iter()
            .all(|l| l.page > 0 && l.page % 64 == 0 && l.base % 16 == 0 && l.stride % 16 == 0)
}

impl Kernels {
    /// Loads the module into the current context.
    pub(super) fn load() -> Result<Kernels, GpuError> {
        // SAFETY: the image is NUL-terminated PTX text.
        let module = unsafe { result::module::load_data(KERNELS_PTX.as_ptr().cast()) }
            .map_err(|e| driver("cuModuleLoadData (kvd's kernels)", e))?;
        // SAFETY: `module` was just loaded and stays loaded while its functions are used.
        let function = |name: &std::ffi::CStr| unsafe {
            result::module::get_function(module, name.to_owned())
                .map_err(|e| driver("cuModuleGetFunction (kvd's kernels)", e))
        };
        match (function(COPY_KERNEL), function(HASH_KERNEL)) {
            (Ok(copy), Ok(hash)) => Ok(Kernels {
                module,
                copy,
                hash,
                copy_args: Mutex::new(Staging::default()),
                hash_args: Mutex::new(Staging::default()),
            }),
            (Err(e), _) | (_, Err(e)) => {
                // SAFETY: nothing uses the module yet.
                let _ = unsafe { sys::cuModuleUnload(module) };
                Err(e)
            }
        }
    }

    /// Unloads the module and frees the buffers.
    ///
    /// # Safety
    /// The context must be current and no launch in flight.
    pub(super) unsafe fn unload(self) {
        for m in [self.copy_args, self.hash_args] {
            let mut s = m.into_inner().unwrap_or_else(|p| p.into_inner());
            // SAFETY: no launch reads them (as the caller guarantees).
            unsafe { s.free() };
        }
        // SAFETY: loaded by `load`; nothing runs its functions any more.
        let _ = unsafe { sys::cuModuleUnload(self.module) };
    }

    /// Runs every span in one launch of the copy kernel on `stream` and waits for it.
    ///
    /// # Safety
    /// The context must be current; every span's ranges must be device memory or host memory
    /// pinned and mapped for the device, valid for the copy and untouched by others until this
    /// returns.
    pub(super) unsafe fn copy(
        &self,
        spans: &[Span],
        stream: sys::CUstream,
        sms: u32,
    ) -> Result<(), GpuError> {
        let pieces = split(spans, COPY_PIECE);
        let n = u32::try_from(pieces.len())
            .map_err(|_| GpuError::Invalid(format!("{} copies in one batch", pieces.len())))?;
        let mut args = lock(&self.copy_args)?;
        // SAFETY: the lock is held, so no launch reads the buffers; `pieces` fits.
        let list = unsafe { args.upload(&pieces, stream) }?;
        let grid = n
            .div_ceil(WARPS)
            .min(sms.saturating_mul(COPY_BLOCKS_PER_SM))
            .max(1);
        let (mut list, mut count) = (list, n);
        let mut params: [*mut std::ffi::c_void; 2] = [
            (&mut list as *mut DevicePtr).cast(),
            (&mut count as *mut u32).cast(),
        ];
        // SAFETY: the kernel takes (const Run*, unsigned int), given here; the list is on the
        // device before it in stream order; the spans' ranges are as the caller guarantees.
        unsafe { launch(self.copy, grid, COPY_THREADS, stream, &mut params) }?;
        sync(stream)
    }

    /// The XXH3-64 checksum of each block `ids[i]` of `layers` (one page of every layer),
    /// computed on `stream` from the pages themselves; the layers must be [`hashable`] and lie
    /// in device memory (an engine's imported KV buffers).
    pub(super) fn checksums(
        &self,
        layers: &[Layer],
        ids: &[u64],
        stream: sys::CUstream,
    ) -> Result<Vec<u64>, GpuError> {
        let (jobs, pages) = hash_lists(layers, ids)?;
        let n = u32::try_from(jobs.len())
            .map_err(|_| GpuError::Invalid(format!("{} blocks in one batch", jobs.len())))?;
        let mut args = lock(&self.hash_args)?;
        let out_at = std::mem::size_of_val(jobs.as_slice()) + std::mem::size_of_val(&*pages);
        // SAFETY: the lock is held; the buffers are sized for both lists and the checksums.
        unsafe { args.grow(out_at + 8 * jobs.len()) }?;
        // SAFETY: as above; the pages follow the jobs, 16-byte aligned.
        let (dev_jobs, dev_pages) = unsafe {
            let j = args.upload(&jobs, stream)?;
            (
                j,
                args.upload_at(std::mem::size_of_val(jobs.as_slice()), &pages, stream)?,
            )
        };
        let mut dev_out = args.dev + out_at as u64;
        let (mut dev_jobs, mut dev_pages, mut count) = (dev_jobs, dev_pages, n);
        let mut params: [*mut std::ffi::c_void; 4] = [
            (&mut dev_jobs as *mut DevicePtr).cast(),
            (&mut dev_pages as *mut DevicePtr).cast(),
            (&mut count as *mut u32).cast(),
            (&mut dev_out as *mut DevicePtr).cast(),
        ];
        let grid = n
            .saturating_mul(HASH_THREADS_PER_BLOCK)
            .div_ceil(HASH_THREADS)
            .max(1);
        // SAFETY: the kernel takes (const HashJob*, const Page*, unsigned int, u64*), given
        // here; every page lies in a layer of device memory (checked against its import by
        // the caller's plan), and `out` has room for `n` checksums.
        unsafe { launch(self.hash, grid, HASH_THREADS, stream, &mut params) }?;
        let mut sums = vec![0u64; jobs.len()];
        // SAFETY: the checksums land in the pinned buffer at `out_at`, read after the wait.
        unsafe {
            let host = args.host + out_at;
            sys::cuMemcpyDtoHAsync_v2(host as *mut _, dev_out, 8 * jobs.len(), stream)
                .result()
                .map_err(|e| driver("cuMemcpyDtoHAsync (checksums)", e))?;
            sync(stream)?;
            std::ptr::copy_nonoverlapping(host as *const u64, sums.as_mut_ptr(), sums.len());
        }
        Ok(sums)
    }
}

/// The checksum kernel's job and page lists for blocks `ids` of `layers`, every page checked
/// to be in range.
fn hash_lists(layers: &[Layer], ids: &[u64]) -> Result<(Vec<HashJob>, Vec<HashPage>), GpuError> {
    let count =
        u32::try_from(layers.len()).map_err(|_| GpuError::Invalid("too many layers".into()))?;
    let len: u64 = layers.iter().map(|l| l.page).sum();
    let mut jobs = Vec::with_capacity(ids.len());
    let mut pages = Vec::with_capacity(ids.len() * layers.len());
    for &id in ids {
        let first = u32::try_from(pages.len())
            .map_err(|_| GpuError::Invalid("too many pages in one batch".into()))?;
        for (i, l) in layers.iter().enumerate() {
            if id >= l.pages {
                return Err(GpuError::Invalid(format!(
                    "page {id} is out of range for layer {i} ({} pages)",
                    l.pages
                )));
            }
            pages.push(HashPage {
                addr: l.base + id * l.stride,
                len: l.page,
            });
        }
        jobs.push(HashJob { first, count, len });
    }
    Ok((jobs, pages))
}

/// Launches `f` with `grid` blocks of `threads` threads (a multiple of 32) on `stream`.
///
/// # Safety
/// `params` must match the kernel's parameters, and everything they point to must stay valid
/// until the launch has finished.
unsafe fn launch(
    f: sys::CUfunction,
    grid: u32,
    threads: u32,
    stream: sys::CUstream,
    params: &mut [*mut std::ffi::c_void],
) -> Result<(), GpuError> {
    // SAFETY: as the caller guarantees.
    unsafe { result::launch_kernel(f, (grid, 1, 1), (threads, 1, 1), 0, stream, params) }
        .map_err(|e| driver("cuLaunchKernel (kvd's kernels)", e))
}

impl Staging {
    /// Makes room for `bytes` (doubling), replacing both buffers when they are too small.
    ///
    /// # Safety
    /// No launch may be reading the buffers (the caller holds their lock between launches).
    unsafe fn grow(&mut self, bytes: usize) -> Result<(), GpuError> {
        if self.cap >= bytes {
            return Ok(());
        }
        // SAFETY: as the caller guarantees.
        unsafe { self.free() };
        let cap = bytes.next_power_of_two();
        // SAFETY: plain allocations; freed by `free`.
        unsafe {
            self.host =
                result::malloc_host(cap, 0).map_err(|e| driver("cuMemAllocHost", e))? as usize;
            self.dev = result::malloc_sync(cap).map_err(|e| driver("cuMemAlloc", e))?;
        }
        self.cap = cap;
        Ok(())
    }

    /// Writes `items` at the start of the buffers (growing them) and queues their DMA to the
    /// device on `stream`; returns their device address.
    ///
    /// # Safety
    /// As [`Self::grow`]; the stream must be waited for before the buffers are written again.
    unsafe fn upload<T: Copy>(
        &mut self,
        items: &[T],
        stream: sys::CUstream,
    ) -> Result<DevicePtr, GpuError> {
        // SAFETY: as the caller guarantees.
        unsafe {
            self.grow(std::mem::size_of_val(items))?;
            self.upload_at(0, items, stream)
        }
    }

    /// Writes `items` at byte `at` of the buffers (which must hold them) and queues their DMA
    /// to the device on `stream`; returns their device address.
    ///
    /// # Safety
    /// As [`Self::upload`].
    unsafe fn upload_at<T: Copy>(
        &mut self,
        at: usize,
        items: &[T],
        stream: sys::CUstream,
    ) -> Result<DevicePtr, GpuError> {
        let bytes = std::mem::size_of_val(items);
        if at.checked_add(bytes).is_none_or(|end| end > self.cap) {
            return Err(GpuError::Invalid(format!(
                "{bytes} bytes at {at} do not fit a {}-byte argument buffer",
                self.cap
            )));
        }
        // SAFETY: both buffers hold `at + bytes` (checked above); the host one is pinned and
        // not written again until the stream is waited for (as the caller guarantees).
        unsafe {
            std::ptr::copy_nonoverlapping(
                items.as_ptr().cast::<u8>(),
                (self.host + at) as *mut u8,
                bytes,
            );
            let dev = self.dev + at as u64;
            sys::cuMemcpyHtoDAsync_v2(dev, (self.host + at) as *const _, bytes, stream)
                .result()
                .map_err(|e| driver("cuMemcpyHtoDAsync (kernel arguments)", e))?;
            Ok(dev)
        }
    }

    /// Frees both buffers.
    ///
    /// # Safety
    /// No launch may be reading them.
    unsafe fn free(&mut self) {
        // SAFETY: each buffer came from `grow` and nothing reads it (as the caller
        // guarantees); failures leave nothing to do but forget the buffer.
        unsafe {
            if self.host != 0 {
                let _ = result::free_host(self.host as *mut std::ffi::c_void);
            }
            if self.dev != 0 {
                let _ = result::free_sync(self.dev);
            }
        }
        *self = Staging::default();
    }
}
