//! The CUDA backend: the driver API through cudarc, loaded at run time.
//!
//! Why the driver API and dynamic loading: kvd must build and run on machines without CUDA
//! (CI, CPU-only nodes), and the daemon needs no more than pinning, copies and IPC handles.
//! `libcuda.so` is looked for before anything else is called (cudarc panics otherwise), so a
//! node without the driver gets [`GpuError::Unavailable`] with the reason.

use cudarc::driver::result;
use cudarc::driver::sys;

use crate::{Backend, DevicePtr, DeviceRun, GpuError, Mapped, Run, Shared};

/// One CUDA device: its primary context and a non-blocking stream for kvd's copies.
pub struct CudaBackend {
    ordinal: i32,
    name: String,
    device: sys::CUdevice,
    ctx: sys::CUcontext,
    stream: sys::CUstream,
}

// SAFETY: the driver API is thread-safe; every call first makes this backend's context
// current on the calling thread (`enter`), and the stream and context handles are only ever
// passed to driver calls.
unsafe impl Send for CudaBackend {}
// SAFETY: as above; copies on the shared stream are serialized by the driver.
unsafe impl Sync for CudaBackend {}

fn driver(call: &'static str, e: result::DriverError) -> GpuError {
    let name = e.error_name().map(|c| c.to_string_lossy().into_owned());
    let text = e.error_string().map(|c| c.to_string_lossy().into_owned());
    GpuError::Driver {
        call,
        message: format!(
            "{}: {}",
            name.unwrap_or_else(|_| format!("{:?}", e.0)),
            text.unwrap_or_default()
        ),
    }
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("ordinal", &self.ordinal)
            .field("name", &self.name)
            .finish()
    }
}

impl CudaBackend {
    /// Whether the CUDA driver library can be loaded on this machine.
    pub fn driver_present() -> bool {
        // SAFETY: only tries to load libcuda; calls nothing in it.
        unsafe { sys::is_culib_present() }
    }

    /// Opens device `ordinal` (its primary context, shared with the engine's runtime API
    /// context on that device) and creates kvd's copy stream.
    pub fn open(ordinal: i32) -> Result<Self, GpuError> {
        if !Self::driver_present() {
            return Err(GpuError::Unavailable(
                "libcuda.so (the NVIDIA driver) was not found on this machine".into(),
            ));
        }
        result::init().map_err(|e| driver("cuInit", e))?;
        let count = result::device::get_count().map_err(|e| driver("cuDeviceGetCount", e))?;
        if ordinal < 0 || ordinal >= count {
            return Err(GpuError::Unavailable(format!(
                "CUDA device {ordinal} requested, {count} present"
            )));
        }
        let device = result::device::get(ordinal).map_err(|e| driver("cuDeviceGet", e))?;
        let name = result::device::get_name(device).unwrap_or_else(|_| "unknown".into());
        // SAFETY: `device` is a valid device handle from cuDeviceGet.
        let ctx = unsafe { result::primary_ctx::retain(device) }
            .map_err(|e| driver("cuDevicePrimaryCtxRetain", e))?;
        // SAFETY: `ctx` was just retained.
        unsafe { result::ctx::set_current(ctx) }.map_err(|e| driver("cuCtxSetCurrent", e))?;
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(|e| driver("cuStreamCreate", e))?;
        Ok(Self {
            ordinal,
            name,
            device,
            ctx,
            stream,
        })
    }

    /// A CUDA IPC handle of the allocation at `ptr` (from [`Backend::alloc`]), for another
    /// process to map with [`Backend::import`] (what an engine hands kvd).
    pub fn ipc_handle(
        &self,
        ptr: DevicePtr,
    ) -> Result<[u8; crate::CUDA_IPC_HANDLE_BYTES], GpuError> {
        self.enter()?;
        let mut h = sys::CUipcMemHandle_st { reserved: [0; 64] };
        // SAFETY: `h` is a valid out-pointer; the driver checks `ptr`.
        unsafe { sys::cuIpcGetMemHandle(&mut h, ptr).result() }
            .map_err(|e| driver("cuIpcGetMemHandle", e))?;
        Ok(h.reserved.map(|c| c as u8))
    }

    /// Makes this backend's context current on the calling thread.
    fn enter(&self) -> Result<(), GpuError> {
        // SAFETY: `ctx` stays retained until `drop`.
        unsafe { result::ctx::set_current(self.ctx) }.map_err(|e| driver("cuCtxSetCurrent", e))
    }

    fn sync(&self) -> Result<(), GpuError> {
        // SAFETY: the stream lives until `drop`.
        unsafe { result::stream::synchronize(self.stream) }
            .map_err(|e| driver("cuStreamSynchronize", e))
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        if self.enter().is_ok() {
            // SAFETY: the stream was created by `open` and no copy is in flight (every
            // copy waits for its stream before returning).
            let _ = unsafe { result::stream::destroy(self.stream) };
        }
        // SAFETY: balances the retain in `open`.
        let _ = unsafe { result::primary_ctx::release(self.device) };
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        format!("cuda:{} {}", self.ordinal, self.name)
    }

    unsafe fn register_host(&self, ptr: *mut u8, len: usize) -> Result<(), GpuError> {
        self.enter()?;
        // SAFETY: the caller guarantees the range is mapped for as long as it is registered.
        unsafe {
            sys::cuMemHostRegister_v2(ptr.cast(), len, sys::CU_MEMHOSTREGISTER_PORTABLE).result()
        }
        .map_err(|e| driver("cuMemHostRegister", e))
    }

    unsafe fn unregister_host(&self, ptr: *mut u8) -> Result<(), GpuError> {
        self.enter()?;
        // SAFETY: the caller guarantees `ptr` starts a registered range no copy uses.
        unsafe { sys::cuMemHostUnregister(ptr.cast()).result() }
            .map_err(|e| driver("cuMemHostUnregister", e))
    }

    fn alloc(&self, len: usize) -> Result<DevicePtr, GpuError> {
        self.enter()?;
        // SAFETY: plain allocation; the memory is uninitialized bytes, which is fine for u8.
        unsafe { result::malloc_sync(len) }.map_err(|e| driver("cuMemAlloc", e))
    }

    unsafe fn free(&self, ptr: DevicePtr) -> Result<(), GpuError> {
        self.enter()?;
        // SAFETY: the caller guarantees `ptr` came from `alloc` and is unused.
        unsafe { result::free_sync(ptr) }.map_err(|e| driver("cuMemFree", e))
    }

    fn import(&self, shared: Shared<'_>) -> Result<Mapped, GpuError> {
        let Shared::CudaIpc(handle) = shared else {
            return Err(GpuError::Invalid(
                "the CUDA backend maps CUDA IPC handles; a shared file descriptor needs the \
                 host backend"
                    .into(),
            ));
        };
        self.enter()?;
        let handle = sys::CUipcMemHandle_st {
            reserved: handle.map(|b| b as std::ffi::c_char),
        };
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: `ptr` is a valid out-pointer; the driver validates the handle's bytes.
        unsafe {
            sys::cuIpcOpenMemHandle_v2(
                &mut ptr,
                handle,
                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as std::ffi::c_uint,
            )
            .result()
        }
        .map_err(|e| driver("cuIpcOpenMemHandle", e))?;
        let (mut base, mut size): (sys::CUdeviceptr, usize) = (0, 0);
        // SAFETY: `ptr` was just mapped; both out-pointers are valid.
        let range = unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr).result() };
        match range {
            Ok(()) => Ok(Mapped {
                base: ptr,
                len: (base + size as u64).saturating_sub(ptr),
            }),
            Err(e) => {
                // SAFETY: `ptr` was mapped above and nothing uses it yet.
                let _ = unsafe { sys::cuIpcCloseMemHandle(ptr) };
                Err(driver("cuMemGetAddressRange", e))
            }
        }
    }

    unsafe fn close_import(&self, base: DevicePtr) -> Result<(), GpuError> {
        self.enter()?;
        // SAFETY: the caller guarantees `base` is a live import no copy uses.
        unsafe { sys::cuIpcCloseMemHandle(base).result() }
            .map_err(|e| driver("cuIpcCloseMemHandle", e))
    }

    unsafe fn copy_d2h(&self, runs: &[Run]) -> Result<(), GpuError> {
        self.enter()?;
        for r in runs {
            // SAFETY: the caller guarantees both ranges; the copy is waited for below before
            // the host range is handed back.
            unsafe {
                sys::cuMemcpyDtoHAsync_v2(r.host as *mut _, r.dev, r.len, self.stream).result()
            }
            .map_err(|e| driver("cuMemcpyDtoHAsync", e))?;
        }
        self.sync()
    }

    unsafe fn copy_d2d(&self, runs: &[DeviceRun]) -> Result<(), GpuError> {
        self.enter()?;
        for r in runs {
            // SAFETY: the caller guarantees both device ranges; waited for below.
            unsafe { sys::cuMemcpyDtoDAsync_v2(r.dst, r.src, r.len, self.stream).result() }
                .map_err(|e| driver("cuMemcpyDtoDAsync", e))?;
        }
        self.sync()
    }

    unsafe fn copy_h2d(&self, runs: &[Run]) -> Result<(), GpuError> {
        self.enter()?;
        for r in runs {
            // SAFETY: as in `copy_d2h`, with the direction reversed.
            unsafe {
                sys::cuMemcpyHtoDAsync_v2(r.dev, r.host as *const _, r.len, self.stream).result()
            }
            .map_err(|e| driver("cuMemcpyHtoDAsync", e))?;
        }
        self.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_a_device_or_says_why_not() {
        match CudaBackend::open(0) {
            Ok(b) => {
                let dev = b.alloc(1 << 20).unwrap();
                let src: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7) as u8).collect();
                let mut back = vec![0u8; 1 << 20];
                let up = [Run {
                    dev,
                    host: src.as_ptr() as usize,
                    len: src.len(),
                }];
                let down = [Run {
                    dev,
                    host: back.as_mut_ptr() as usize,
                    len: back.len(),
                }];
                // SAFETY: both host buffers are ours and live across the calls; `dev` holds
                // 1 MiB.
                unsafe {
                    b.copy_h2d(&up).unwrap();
                    b.copy_d2h(&down).unwrap();
                    b.free(dev).unwrap();
                }
                assert!(src == back);
            }
            Err(GpuError::Unavailable(why)) => {
                eprintln!("SKIPPED: no CUDA device: {why}");
            }
            Err(e) => panic!("opening CUDA device 0: {e}"),
        }
    }
}
