//! A backend whose "device" memory is ordinary host memory.
//!
//! Why: CI and most development machines have no GPU, yet the copy plans, pinning and the
//! daemon's transfer paths must be exercised. This backend keeps the driver's rules — pinned
//! ranges may not overlap and are unpinned by their start, copies must stay inside a device
//! allocation — and fails the way a driver would, so a plan that would fault a GPU fails here.
//! Memory shared by another process arrives as a sealed memfd ([`Shared::Fd`]) and is mapped
//! here the way `cuIpcOpenMemHandle` maps a CUDA IPC handle, so daemon-driven copies between
//! two processes run in CI too.

use std::collections::BTreeMap;
use std::hash::Hasher;
use std::sync::Mutex;

use kvd_shm::Mapping;
use twox_hash::XxHash3_64;

use crate::plan::Layer;
use crate::{Backend, DevicePtr, DeviceRun, GpuError, Mapped, Run, Shared};

/// Host memory standing in for a device.
#[derive(Debug, Default)]
pub struct HostBackend {
    /// Device allocations by start address (the boxes never move).
    allocs: Mutex<BTreeMap<u64, Box<[u8]>>>,
    /// Pinned host ranges: start → length.
    pinned: Mutex<BTreeMap<usize, usize>>,
    /// Mappings of memory shared by other processes, by start address.
    imports: Mutex<BTreeMap<u64, Mapping>>,
}

fn poisoned<T>(_: T) -> GpuError {
    GpuError::Invalid("host backend poisoned".into())
}

impl HostBackend {
    /// An empty backend.
    pub fn new() -> Self {
        Self::default()
    }

    /// The pinned ranges as (start, length), by start.
    pub fn registrations(&self) -> Vec<(usize, usize)> {
        self.pinned
            .lock()
            .map(|p| p.iter().map(|(&s, &l)| (s, l)).collect())
            .unwrap_or_default()
    }

    /// Imports currently mapped, as (start, length).
    pub fn imports(&self) -> Vec<(u64, usize)> {
        self.imports
            .lock()
            .map(|m| m.iter().map(|(&s, m)| (s, m.len())).collect())
            .unwrap_or_default()
    }

    /// Checks that `[dev, dev + len)` lies inside one allocation or import; returns its
    /// address.
    fn device_range(&self, dev: DevicePtr, len: usize) -> Result<*mut u8, GpuError> {
        let within = |start: u64, size: usize| {
            let end = start.checked_add(size as u64)?;
            (dev.checked_add(len as u64)? <= end).then_some(())
        };
        let inside = {
            let allocs = self.allocs.lock().map_err(poisoned)?;
            let imports = self.imports.lock().map_err(poisoned)?;
            allocs
                .range(..=dev)
                .next_back()
                .and_then(|(&start, b)| within(start, b.len()))
                .or_else(|| {
                    imports
                        .range(..=dev)
                        .next_back()
                        .and_then(|(&start, m)| within(start, m.len()))
                })
        };
        match inside {
            Some(()) => Ok(dev as usize as *mut u8),
            None => Err(GpuError::Driver {
                call: "memcpy",
                message: format!(
                    "CUDA_ERROR_INVALID_VALUE: {len} bytes at {dev:#x} are not inside one device allocation"
                ),
            }),
        }
    }
}

impl Backend for HostBackend {
    fn name(&self) -> String {
        "host".into()
    }

    unsafe fn register_host(&self, ptr: *mut u8, len: usize) -> Result<(), GpuError> {
        let start = ptr as usize;
        let end = start
            .checked_add(len)
            .ok_or_else(|| GpuError::Invalid("range overflows".into()))?;
        let mut p = self.pinned.lock().map_err(poisoned)?;
        let overlaps = p
            .range(..end)
            .next_back()
            .is_some_and(|(&s, &l)| s + l > start);
        if len == 0 || overlaps {
            return Err(GpuError::Driver {
                call: "cuMemHostRegister",
                message: format!(
                    "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED: {len} bytes at {start:#x}"
                ),
            });
        }
        p.insert(start, len);
        Ok(())
    }

    unsafe fn unregister_host(&self, ptr: *mut u8) -> Result<(), GpuError> {
        let mut p = self.pinned.lock().map_err(poisoned)?;
        match p.remove(&(ptr as usize)) {
            Some(_) => Ok(()),
            None => Err(GpuError::Driver {
                call: "cuMemHostUnregister",
                message: format!("CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED: {ptr:p}"),
            }),
        }
    }

    fn alloc(&self, len: usize) -> Result<DevicePtr, GpuError> {
        if len == 0 {
            return Err(GpuError::Invalid("zero-byte device allocation".into()));
        }
        let b = vec![0u8; len].into_boxed_slice();
        let addr = b.as_ptr() as u64;
        self.allocs.lock().map_err(poisoned)?.insert(addr, b);
        Ok(addr)
    }

    unsafe fn free(&self, ptr: DevicePtr) -> Result<(), GpuError> {
        let removed = self.allocs.lock().map_err(poisoned)?.remove(&ptr);
        removed.map(drop).ok_or_else(|| GpuError::Driver {
            call: "cuMemFree",
            message: format!("CUDA_ERROR_INVALID_VALUE: {ptr:#x} is not an allocation"),
        })
    }

    fn import(&self, shared: Shared<'_>) -> Result<Mapped, GpuError> {
        let Shared::Fd { fd, len } = shared else {
            return Err(GpuError::Invalid(
                "the host backend maps shared memfds, not CUDA IPC handles".into(),
            ));
        };
        let size = usize::try_from(len)
            .map_err(|_| GpuError::Invalid(format!("cannot map {len} bytes")))?;
        let owned = fd
            .try_clone_to_owned()
            .map_err(|e| GpuError::Invalid(format!("cannot duplicate the shared memfd: {e}")))?;
        // Checks the memfd is sealed against shrinking and exactly `len` bytes, so no page of
        // the mapping can go away under a copy (which would be SIGBUS in the daemon).
        let m = Mapping::map_fd(&owned, size, false, false)
            .map_err(|e| GpuError::Invalid(format!("the shared memfd: {e}")))?;
        let base = m.as_ptr() as u64;
        self.imports.lock().map_err(poisoned)?.insert(base, m);
        Ok(Mapped { base, len })
    }

    unsafe fn close_import(&self, base: DevicePtr) -> Result<(), GpuError> {
        match self.imports.lock().map_err(poisoned)?.remove(&base) {
            Some(m) => {
                drop(m); // unmapped; the caller guarantees no copy is using it
                Ok(())
            }
            None => Err(GpuError::Driver {
                call: "cuIpcCloseMemHandle",
                message: format!("CUDA_ERROR_INVALID_VALUE: {base:#x} is not an import"),
            }),
        }
    }

    unsafe fn copy_d2h(&self, runs: &[Run]) -> Result<(), GpuError> {
        let srcs = runs
            .iter()
            .map(|r| self.device_range(r.dev, r.len))
            .collect::<Result<Vec<_>, _>>()?;
        for (r, src) in runs.iter().zip(srcs) {
            // SAFETY: the source lies inside a live allocation (checked above); the caller
            // guarantees the host range is valid for writes and not shared; a host range and
            // an allocation of this backend never overlap.
            unsafe { std::ptr::copy_nonoverlapping(src, r.host as *mut u8, r.len) };
        }
        Ok(())
    }

    unsafe fn copy_d2d(&self, runs: &[DeviceRun]) -> Result<(), GpuError> {
        let ends = runs
            .iter()
            .map(|r| {
                Ok((
                    self.device_range(r.src, r.len)?,
                    self.device_range(r.dst, r.len)?,
                ))
            })
            .collect::<Result<Vec<_>, GpuError>>()?;
        for (r, (src, dst)) in runs.iter().zip(ends) {
            // SAFETY: both ranges lie inside live allocations or imports (checked above); the
            // caller guarantees nobody else uses the destination; `copy` allows overlap.
            unsafe { std::ptr::copy(src, dst, r.len) };
        }
        Ok(())
    }

    unsafe fn copy_h2d(&self, runs: &[Run]) -> Result<(), GpuError> {
        let dsts = runs
            .iter()
            .map(|r| self.device_range(r.dev, r.len))
            .collect::<Result<Vec<_>, _>>()?;
        for (r, dst) in runs.iter().zip(dsts) {
            // SAFETY: as in `copy_d2h`, with the roles of the two ranges swapped.
            unsafe { std::ptr::copy_nonoverlapping(r.host as *const u8, dst, r.len) };
        }
        Ok(())
    }

    /// The checksums computed from the "device" pages, as the CUDA backend's kernel does.
    fn checksums(&self, layers: &[Layer], ids: &[u64]) -> Result<Option<Vec<u64>>, GpuError> {
        let mut sums = Vec::with_capacity(ids.len());
        for &id in ids {
            let mut h = XxHash3_64::new();
            for (i, l) in layers.iter().enumerate() {
                if id >= l.pages {
                    return Err(GpuError::Invalid(format!(
                        "page {id} is out of range for layer {i} ({} pages)",
                        l.pages
                    )));
                }
                let len = usize::try_from(l.page)
                    .map_err(|_| GpuError::Invalid("page larger than the address space".into()))?;
                let at = self.device_range(l.base + id * l.stride, len)?;
                // SAFETY: `device_range` checked the page lies in a live allocation or import;
                // the engine may write its own pages meanwhile, as a device would let it.
                h.write(unsafe { std::slice::from_raw_parts(at, len) });
            }
            sums.push(h.finish());
        }
        Ok(Some(sums))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{block_bytes, block_runs};
    use proptest::prelude::*;

    /// A paged "engine" KV cache of `layers` layers on `backend`, each page filled with
    /// bytes derived from (layer, page, seed).
    fn engine(
        backend: &HostBackend,
        layers: usize,
        pages: u64,
        page: u64,
        stride: u64,
    ) -> Vec<Layer> {
        (0..layers)
            .map(|_| {
                let base = backend.alloc((pages * stride) as usize).unwrap();
                Layer {
                    base,
                    stride,
                    page,
                    pages,
                }
            })
            .collect()
    }

    fn fill(backend: &HostBackend, layers: &[Layer], seed: u64) {
        for (li, l) in layers.iter().enumerate() {
            for p in 0..l.pages {
                let bytes: Vec<u8> = (0..l.page)
                    .map(|i| (i ^ p.wrapping_mul(31) ^ (li as u64) << 3 ^ seed) as u8)
                    .collect();
                let run = Run {
                    dev: l.base + p * l.stride,
                    host: bytes.as_ptr() as usize,
                    len: bytes.len(),
                };
                // SAFETY: `bytes` lives across the call; the device range is inside the layer.
                unsafe { backend.copy_h2d(&[run]) }.unwrap();
            }
        }
    }

    fn read(backend: &HostBackend, l: &Layer, p: u64) -> Vec<u8> {
        let mut out = vec![0u8; l.page as usize];
        let run = Run {
            dev: l.base + p * l.stride,
            host: out.as_mut_ptr() as usize,
            len: out.len(),
        };
        // SAFETY: `out` is ours and large enough; the device range is inside the layer.
        unsafe { backend.copy_d2h(&[run]) }.unwrap();
        out
    }

    proptest! {
        /// Random pages of a random layout: gathered into arena slots, scattered into other
        /// pages of a second engine, they arrive bit for bit.
        #[test]
        fn pages_round_trip_engine_to_arena_to_engine(
            layers in 1usize..5,
            page in prop::sample::select(vec![16u64, 256, 4096]),
            pad in 0u64..3,
            picks in prop::collection::vec((0u64..12, 0u64..12), 1..10),
        ) {
            let backend = HostBackend::new();
            let stride = page * (1 + pad);
            let a = engine(&backend, layers, 12, page, stride);
            let b = engine(&backend, layers, 12, page, stride);
            fill(&backend, &a, 7);
            let per = block_bytes(&a) as usize;
            let mut arena = vec![0u8; per * picks.len()];
            let slots: Vec<usize> = (0..picks.len()).map(|i| arena.as_mut_ptr() as usize + i * per).collect();
            let from: Vec<u64> = picks.iter().map(|p| p.0).collect();
            let mut to: Vec<u64> = picks.iter().map(|p| p.1).collect();
            to.sort_unstable();
            to.dedup();
            let gather = block_runs(&a, &from, &slots).unwrap();
            // SAFETY: slots lie in `arena`, which nothing else touches meanwhile.
            unsafe { backend.copy_d2h(&gather) }.unwrap();
            let scatter = block_runs(&b, &to, &slots[..to.len()]).unwrap();
            // SAFETY: as above.
            unsafe { backend.copy_h2d(&scatter) }.unwrap();
            for (i, &dst) in to.iter().enumerate() {
                for li in 0..layers {
                    prop_assert_eq!(read(&backend, &b[li], dst), read(&backend, &a[li], from[i]));
                }
            }
        }
    }

    #[test]
    fn checksums_of_pages_are_the_checksums_of_the_gathered_blocks() {
        let backend = HostBackend::new();
        let a = engine(&backend, 3, 6, 256, 512);
        fill(&backend, &a, 5);
        let per = block_bytes(&a) as usize;
        let ids = [4u64, 0, 5];
        let mut arena = vec![0u8; per * ids.len()];
        let slots: Vec<usize> = (0..ids.len())
            .map(|i| arena.as_mut_ptr() as usize + i * per)
            .collect();
        // SAFETY: slots lie in `arena`, which nothing else touches meanwhile.
        unsafe { backend.copy_d2h(&block_runs(&a, &ids, &slots).unwrap()) }.unwrap();
        let want: Vec<u64> = arena
            .chunks(per)
            .map(twox_hash::XxHash3_64::oneshot)
            .collect();
        assert_eq!(backend.checksums(&a, &ids).unwrap(), Some(want));
        let e = backend.checksums(&a, &[6]).unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
    }

    #[test]
    fn copies_outside_an_allocation_fail_like_a_driver() {
        let backend = HostBackend::new();
        let dev = backend.alloc(4096).unwrap();
        let mut buf = vec![0u8; 8192];
        let run = Run {
            dev,
            host: buf.as_mut_ptr() as usize,
            len: 4097,
        };
        // SAFETY: `buf` is ours; the backend refuses before copying.
        let e = unsafe { backend.copy_d2h(&[run]) }.unwrap_err();
        assert!(
            e.to_string().contains("not inside one device allocation"),
            "{e}"
        );
        // SAFETY: `dev` came from `alloc`.
        unsafe { backend.free(dev) }.unwrap();
        let run = Run {
            dev,
            host: buf.as_mut_ptr() as usize,
            len: 1,
        };
        // SAFETY: as above.
        assert!(unsafe { backend.copy_h2d(&[run]) }.is_err(), "freed memory");
        // SAFETY: the backend refuses a pointer that is no longer an allocation.
        assert!(unsafe { backend.free(dev) }.is_err(), "double free");
    }

    /// A memfd of `len` bytes, sealed against shrinking when `seal`.
    fn memfd(len: i64, seal: bool) -> std::os::fd::OwnedFd {
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        use nix::sys::memfd::{memfd_create, MFdFlags};
        let fd = memfd_create("kvd-gpu-test", MFdFlags::MFD_ALLOW_SEALING).unwrap();
        nix::unistd::ftruncate(&fd, len).unwrap();
        if seal {
            fcntl(&fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK)).unwrap();
        }
        fd
    }

    #[test]
    fn shared_memfds_are_mapped_like_ipc_handles() {
        use std::os::fd::AsFd;
        let backend = HostBackend::new();
        let unsealed = memfd(8192, false);
        let e = backend
            .import(Shared::Fd {
                fd: unsealed.as_fd(),
                len: 8192,
            })
            .unwrap_err();
        assert!(
            e.to_string().contains("not sealed against shrinking"),
            "{e}"
        );
        let fd = memfd(8192, true);
        let e = backend
            .import(Shared::Fd {
                fd: fd.as_fd(),
                len: 8193,
            })
            .unwrap_err();
        assert!(e.to_string().contains("8192 bytes"), "{e}");
        assert!(backend.imports().is_empty());
        let e = backend.import(Shared::CudaIpc([0; 64])).unwrap_err();
        assert!(e.to_string().contains("not CUDA IPC"), "{e}");

        let m = backend
            .import(Shared::Fd {
                fd: fd.as_fd(),
                len: 8192,
            })
            .unwrap();
        assert_eq!(m.len, 8192);
        // The owner's own view of the memory: what kvd writes through the import lands there.
        let own = backend
            .import(Shared::Fd {
                fd: fd.as_fd(),
                len: 8192,
            })
            .unwrap();
        let src = vec![0xa5u8; 4096];
        let mut back = vec![0u8; 4096];
        // SAFETY: `src`/`back` are ours and outlive the calls; both device ranges lie inside
        // the imports.
        unsafe {
            backend
                .copy_h2d(&[Run {
                    dev: m.base + 4096,
                    host: src.as_ptr() as usize,
                    len: 4096,
                }])
                .unwrap();
            backend
                .copy_d2h(&[Run {
                    dev: own.base + 4096,
                    host: back.as_mut_ptr() as usize,
                    len: 4096,
                }])
                .unwrap();
        }
        assert_eq!(back, src);
        let past = Run {
            dev: m.base + 4096,
            host: back.as_mut_ptr() as usize,
            len: 4097,
        };
        // SAFETY: refused before copying.
        assert!(unsafe { backend.copy_d2h(&[past]) }.is_err());
        // SAFETY: `m` is a live import; no copy uses it.
        unsafe { backend.close_import(m.base) }.unwrap();
        assert_eq!(backend.imports().len(), 1);
        let gone = Run {
            dev: m.base,
            host: back.as_mut_ptr() as usize,
            len: 1,
        };
        if m.base != own.base {
            // SAFETY: refused: no longer an import.
            assert!(unsafe { backend.copy_d2h(&[gone]) }.is_err());
        }
        // SAFETY: closed already: refused.
        assert!(unsafe { backend.close_import(m.base) }.is_err());
        drop(backend); // unmaps `own`
    }

    #[test]
    fn overlapping_pins_are_refused() {
        let backend = HostBackend::new();
        let mut buf = vec![0u8; 16384];
        let p = buf.as_mut_ptr();
        // SAFETY: `buf` outlives every registration in this test.
        unsafe {
            backend.register_host(p, 8192).unwrap();
            assert!(backend.register_host(p.add(4096), 8192).is_err());
            backend.register_host(p.add(8192), 8192).unwrap();
            assert!(backend.unregister_host(p.add(4096)).is_err());
            backend.unregister_host(p).unwrap();
            backend.unregister_host(p.add(8192)).unwrap();
        }
        assert!(backend.registrations().is_empty());
    }
}
