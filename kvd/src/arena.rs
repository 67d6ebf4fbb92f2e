//! A namespace's shared DRAM arena: a sealed memfd, mapped and pre-faulted by the daemon.
//!
//! Arenas are created once at start (the pool is sized by `dram.max_namespaces`) so that the
//! cost of faulting gigabytes in is paid before the first request, and handed to a namespace
//! when it is first opened. The memfd is what clients receive with `SCM_RIGHTS`.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

use kvd_proto::arena::{ArenaHeader, ARENA_HEADER_BYTES};
use kvd_proto::NamespaceId;
use kvd_shm::map::{create_memfd, HugePages};
use kvd_shm::{MapError, Mapping};

use crate::config::{DramConfig, HugePagesMode};
use crate::disk::engine::{IoBuf, IoEngine, RegisterError, Registered};

/// Why an arena could not be created.
#[derive(Debug, thiserror::Error)]
pub enum ArenaError {
    /// The OS refused the memory.
    #[error("cannot create a {bytes}-byte arena ({hint}): {source}")]
    Create {
        /// Requested size.
        bytes: u64,
        /// What to check.
        hint: &'static str,
        /// Cause.
        #[source]
        source: MapError,
    },
}

/// One arena: its memfd and the daemon's mapping of it.
#[derive(Debug)]
pub struct Arena {
    /// Its registration with the disk IO engine, if any; declared first so it is released
    /// before the mapping goes.
    io: Option<Arc<Registered>>,
    /// Its pinning for GPU DMA, if any; released before the mapping, like `io`.
    gpu: Option<kvd_gpu::register::Pinned>,
    fd: OwnedFd,
    map: Mapping,
    data_offset: u64,
}

impl Arena {
    /// Creates, maps and (per config) pre-faults an arena.
    pub fn create(cfg: &DramConfig) -> Result<Arena, ArenaError> {
        let bytes = cfg.arena_bytes.0;
        let huge = match cfg.huge_pages {
            HugePagesMode::Off => HugePages::Off,
            HugePagesMode::Transparent => HugePages::Transparent,
            HugePagesMode::Explicit => HugePages::Explicit,
        };
        let hint = if huge == HugePages::Explicit {
            "explicit huge pages: reserve them in /proc/sys/vm/nr_hugepages, size a multiple of 2 MiB"
        } else {
            "check dram.arena_bytes × dram.max_namespaces against memory and /dev/shm limits"
        };
        let err = |source| ArenaError::Create {
            bytes,
            hint,
            source,
        };
        let fd = create_memfd("kvd-arena", bytes, huge).map_err(err)?;
        let len = usize::try_from(bytes).map_err(|_| {
            err(MapError::Rejected(
                "arena larger than the address space".into(),
            ))
        })?;
        let map = Mapping::map_fd(&fd, len, false, true).map_err(err)?;
        if huge == HugePages::Transparent {
            if let Err(e) = map.advise_huge() {
                tracing::warn!(error = %e, "transparent huge pages unavailable; using 4 KiB pages");
            }
        }
        // After the huge-page advice, so the pages are faulted in at the size asked for.
        if cfg.prefault {
            map.populate();
        }
        let data_offset = if huge == HugePages::Off {
            ARENA_HEADER_BYTES as u64
        } else {
            2 << 20
        };
        Ok(Arena {
            io: None,
            gpu: None,
            fd,
            map,
            data_offset,
        })
    }

    /// Creates `n` arenas, logging how long pre-faulting took.
    pub fn create_pool(cfg: &DramConfig, n: u32) -> Result<Vec<Arena>, ArenaError> {
        let t = Instant::now();
        let pool = (0..n)
            .map(|_| Arena::create(cfg))
            .collect::<Result<Vec<_>, _>>()?;
        tracing::info!(
            arenas = n,
            arena_bytes = cfg.arena_bytes.0,
            prefault = cfg.prefault,
            elapsed_ms = t.elapsed().as_millis() as u64,
            "DRAM arenas ready"
        );
        Ok(pool)
    }

    /// Writes the header for namespace `ns` (when the arena is bound to it).
    pub fn bind(&self, ns: NamespaceId) {
        let h = ArenaHeader {
            total_bytes: self.map.len() as u64,
            data_offset: self.data_offset,
            ns,
        };
        // SAFETY: the header page is inside the mapping; the arena is bound before any client
        // of this namespace receives it, so nobody else reads it concurrently.
        h.write(unsafe { self.map.slice_mut(0, ARENA_HEADER_BYTES) });
    }

    /// Registers the whole arena with `engine`, so disk IOs into and out of its slots skip
    /// per-IO page pinning (see [`Registered`]).
    pub fn register_io(&mut self, engine: &dyn IoEngine) -> Result<(), RegisterError> {
        // SAFETY: the mapping is readable and writable and lives as long as `self`; the
        // registration is kept in `self.io`, dropped before the mapping (field order), and
        // the clones buffers take are held only while an IO runs, by callers that keep the
        // arena's namespace (hence the arena) alive meanwhile.
        let r = unsafe { engine.register(self.map.as_ptr(), self.map.len())? };
        self.io = Some(r);
        Ok(())
    }

    /// Pins the whole arena for DMA with `backend`, in pieces of `chunk` bytes (a multiple of
    /// the allocator chunk) cut on allocator chunk boundaries, from `threads` threads.
    pub fn pin_for_gpu(
        &mut self,
        backend: Arc<dyn kvd_gpu::Backend>,
        chunk: u64,
        threads: usize,
    ) -> Result<kvd_gpu::register::PinReport, kvd_gpu::GpuError> {
        let too_big = |_| kvd_gpu::GpuError::Invalid("arena offsets overflow usize".into());
        let origin = usize::try_from(self.data_offset).map_err(too_big)?;
        let chunk = usize::try_from(chunk).map_err(too_big)?;
        // SAFETY: the mapping lives as long as `self`; the guard is kept in `self.gpu`,
        // dropped before the mapping (field order); `chunk` is a multiple of the allocator
        // chunk and the cuts start at the data offset, where the allocator's chunks start.
        let pinned = unsafe {
            kvd_gpu::register::pin_parallel(
                backend,
                self.map.as_ptr(),
                self.map.len(),
                origin,
                chunk,
                threads,
            )?
        };
        let report = pinned.report();
        self.gpu = Some(pinned);
        Ok(report)
    }

    /// The memfd to pass to clients.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// The daemon's mapping.
    pub fn map(&self) -> &Mapping {
        &self.map
    }

    /// Offset of the first slot.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Bytes available to slots.
    pub fn data_bytes(&self) -> u64 {
        self.map.len() as u64 - self.data_offset
    }

    /// Total size.
    pub fn total_bytes(&self) -> u64 {
        self.map.len() as u64
    }

    /// Feeds `[offset, offset+len)` into `hasher`; false (and nothing hashed) when the range
    /// is outside the arena. The range must be a block the caller holds (committed, so no
    /// client writes it, and held, so it is not freed and reused meanwhile).
    pub fn hash_range(&self, hasher: &mut twox_hash::XxHash3_64, offset: u64, len: u64) -> bool {
        let Some((o, l)) = self.range(offset, len) else {
            return false;
        };
        // SAFETY: the range is inside the mapping (checked) and the caller holds the block, so
        // the daemon does not hand the slot to anyone else while it is read. A misbehaving
        // client scribbling on its own committed block only changes the checksum recorded.
        std::hash::Hasher::write(hasher, unsafe { self.map.slice(o, l) });
        true
    }

    /// The bytes of a block, for sending them; `None` when the range is outside the arena.
    ///
    /// # Safety
    /// The caller holds the block (committed, so no client writes it; leased, so it is not
    /// freed and reused) for as long as the slice lives.
    pub unsafe fn block(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let (o, l) = self.range(offset, len)?;
        // SAFETY: inside the mapping (checked); the caller holds the block (above).
        Some(unsafe { self.map.slice(o, l) })
    }

    /// The bytes of a reserved slot, for filling it; `None` when outside the arena.
    ///
    /// # Safety
    /// The slot is reserved by the caller and not committed: nobody else reads or writes it
    /// while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slot_mut(&self, offset: u64, len: u64) -> Option<&mut [u8]> {
        let (o, l) = self.range(offset, len)?;
        // SAFETY: inside the mapping (checked); the slot is the caller's alone (above).
        Some(unsafe { self.map.slice_mut(o, l) })
    }

    /// `[offset, offset + len)` as mapping offsets, when it lies inside the arena.
    fn range(&self, offset: u64, len: u64) -> Option<(usize, usize)> {
        let (o, l) = (usize::try_from(offset).ok()?, usize::try_from(len).ok()?);
        self.map.contains(o, l).then_some((o, l))
    }

    /// A buffer over `[offset, offset + len)` for a disk IO, using the arena's IO
    /// registration; `None` when the range is not inside the arena.
    ///
    /// # Safety
    /// `keep` must keep this arena alive until the buffer is dropped, and nobody else may
    /// write the range while the IO is in flight (nor read it, for a disk read into it).
    pub unsafe fn io_buf(
        &self,
        keep: Arc<dyn Send + Sync>,
        offset: u64,
        len: u64,
    ) -> Option<IoBuf> {
        let (o, l) = self.range(offset, len)?;
        // SAFETY: the range is inside the mapping (checked); the caller keeps the arena alive
        // through `keep` and the range to itself for the duration of the IO.
        let buf = unsafe { IoBuf::from_raw(keep, self.map.as_ptr().add(o), l) };
        Some(buf.with_fixed(self.io.as_ref()))
    }
}
