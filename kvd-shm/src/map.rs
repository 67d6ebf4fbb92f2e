//! Sealed memfds and their mappings.
//!
//! The daemon creates every shared region with [`create_memfd`]: sized once, then sealed
//! against growing and shrinking, so no client can truncate it and fault the daemon. Clients map
//! what they receive with [`Mapping::map_fd`], which re-checks the size and the seals.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

/// Why a shared region could not be created or mapped.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Os {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The received region is not what the protocol promised.
    #[error("shared region rejected: {0}")]
    Rejected(String),
}

impl MapError {
    fn last(op: &'static str) -> Self {
        MapError::Os {
            op,
            source: std::io::Error::last_os_error(),
        }
    }
}

/// How the pages of a new region are backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HugePages {
    /// Ordinary 4 KiB pages.
    Off,
    /// Ask for transparent huge pages (`madvise(MADV_HUGEPAGE)`; honoured when the kernel's
    /// `shmem_enabled` allows it).
    Transparent,
    /// Explicit 2 MiB hugetlb pages (`MFD_HUGETLB`); needs pages reserved in
    /// `/proc/sys/vm/nr_hugepages`.
    Explicit,
}

const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// Free explicit huge pages, in bytes, and the huge page size, from `/proc/meminfo` (zeros
/// where it cannot be read), so callers can choose [`HugePages::Explicit`] only when it will
/// succeed.
pub fn free_huge_pages() -> (u64, u64) {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let page = field("Hugepagesize:").saturating_mul(1024);
    (field("HugePages_Free:").saturating_mul(page), page)
}

/// Creates a sealed memfd of exactly `len` bytes.
pub fn create_memfd(name: &str, len: u64, huge: HugePages) -> Result<OwnedFd, MapError> {
    let cname = std::ffi::CString::new(name.replace('\0', "_"))
        .map_err(|_| MapError::Rejected("memfd name contains NUL".into()))?;
    let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    if huge == HugePages::Explicit {
        flags |= libc::MFD_HUGETLB;
    }
    // SAFETY: `cname` is a valid NUL-terminated string; the call has no other memory effects.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
    if fd < 0 {
        return Err(MapError::last("memfd_create"));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let file = File::from(fd);
    file.set_len(len).map_err(|source| MapError::Os {
        op: "ftruncate(memfd)",
        source,
    })?;
    // SAFETY: plain fcntl on a valid fd.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, SEALS) } < 0 {
        return Err(MapError::last("fcntl(F_ADD_SEALS)"));
    }
    Ok(OwnedFd::from(file))
}

/// A shared read-write mapping, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory; all concurrent access goes through atomics or raw-pointer
// copies whose synchronisation the users document.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` hands out only raw pointers and atomics.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` shared read-write. With `populate`, every page is faulted in now
    /// (page faults on first touch cost several times the copy itself). Unless `trusted`, checks
    /// that the file is exactly `len` bytes and sealed against resizing.
    pub fn map_fd(
        fd: &OwnedFd,
        len: usize,
        populate: bool,
        trusted: bool,
    ) -> Result<Self, MapError> {
        if len == 0 {
            return Err(MapError::Rejected("zero-length region".into()));
        }
        if !trusted {
            // SAFETY: plain fcntl on a valid fd.
            let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
            if seals < 0 || seals & (libc::F_SEAL_SHRINK) == 0 {
                return Err(MapError::Rejected(
                    "region is not sealed against shrinking".into(),
                ));
            }
            let size = File::from(fd.try_clone().map_err(|source| MapError::Os {
                op: "dup(memfd)",
                source,
            })?)
            .metadata()
            .map_err(|source| MapError::Os {
                op: "fstat(memfd)",
                source,
            })?
            .len();
            if size != len as u64 {
                return Err(MapError::Rejected(format!(
                    "region is {size} bytes, expected {len}"
                )));
            }
        }
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL) over a valid fd; the result
        // is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MapError::last("mmap"));
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| MapError::last("mmap"))?;
        let m = Self { ptr, len };
        if populate {
            m.populate();
        }
        Ok(m)
    }

    /// Faults every page in now, writable, without changing content: `MADV_POPULATE_WRITE`
    /// (Linux ≥ 5.14). `MAP_POPULATE` would map shared pages for reading only, leaving a write
    /// fault per page on the data path. On older kernels, falls back to reading one byte per
    /// page (allocates the pages; first writes still take a minor fault). Never writes, so it
    /// is safe on a region other processes are using.
    pub fn populate(&self) {
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        // SAFETY: the range is exactly this live mapping; the advice only faults pages in.
        let r = unsafe { libc::madvise(self.ptr.as_ptr().cast(), self.len, MADV_POPULATE_WRITE) };
        if r == 0 {
            return;
        }
        let mut off = 0;
        while off < self.len {
            // SAFETY: `off < len`, inside the live mapping; a volatile read faults the page in.
            unsafe { self.ptr.as_ptr().add(off).read_volatile() };
            off += 4096;
        }
    }

    /// Asks for transparent huge pages on this mapping (best effort).
    pub fn advise_huge(&self) -> Result<(), MapError> {
        // SAFETY: the range is exactly this live mapping.
        let r = unsafe { libc::madvise(self.ptr.as_ptr().cast(), self.len, libc::MADV_HUGEPAGE) };
        if r < 0 {
            return Err(MapError::last("madvise(MADV_HUGEPAGE)"));
        }
        Ok(())
    }

    /// Start of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never true; mappings have a length).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `[off, off+len)` lies inside the mapping.
    pub fn contains(&self, off: usize, len: usize) -> bool {
        off.checked_add(len).is_some_and(|end| end <= self.len)
    }

    /// Copies `src` into the mapping at `off`. Panics only on a range outside the mapping,
    /// which callers rule out with [`contains`](Self::contains) or a checked slot.
    pub fn copy_in(&self, off: usize, src: &[u8]) {
        assert!(self.contains(off, src.len()), "copy_in outside mapping");
        // SAFETY: the range is inside the live mapping (asserted) and cannot overlap `src`,
        // which is ordinary process memory the caller borrowed.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(off), src.len())
        }
    }

    /// Copies from the mapping at `off` into `dst`. Panics only on a range outside the mapping.
    pub fn copy_out(&self, off: usize, dst: &mut [u8]) {
        assert!(self.contains(off, dst.len()), "copy_out outside mapping");
        // SAFETY: the range is inside the live mapping (asserted); `dst` is exclusively borrowed
        // ordinary memory, so the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), dst.as_mut_ptr(), dst.len())
        }
    }

    /// A shared view of `[off, off+len)`.
    ///
    /// # Safety
    /// The range must be inside the mapping and nobody may write it while the slice lives (for
    /// arena slots: the caller holds a read lease on a committed block).
    pub unsafe fn slice(&self, off: usize, len: usize) -> &[u8] {
        debug_assert!(self.contains(off, len));
        // SAFETY: guaranteed by the caller per this function's contract.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(off), len) }
    }

    /// An exclusive view of `[off, off+len)`.
    ///
    /// # Safety
    /// The range must be inside the mapping and nobody else may read or write it while the
    /// slice lives (for arena slots: the caller holds the reservation of an uncommitted slot).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, off: usize, len: usize) -> &mut [u8] {
        debug_assert!(self.contains(off, len));
        // SAFETY: guaranteed by the caller per this function's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(off), len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region mmap returned; no references outlive `self`
        // because every view borrows the mapping.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_map_and_share() {
        let fd = create_memfd("kvd-test", 1 << 16, HugePages::Off).unwrap();
        let a = Mapping::map_fd(&fd, 1 << 16, true, true).unwrap();
        let b = Mapping::map_fd(&fd, 1 << 16, false, false).unwrap();
        a.copy_in(100, b"hello");
        let mut out = [0u8; 5];
        b.copy_out(100, &mut out);
        assert_eq!(&out, b"hello");
        b.populate();
        assert!(a.contains(0, 1 << 16));
        assert!(!a.contains(1, 1 << 16));
        assert!(!a.contains(usize::MAX, 2));
    }

    #[test]
    fn sealed_region_cannot_be_resized_and_wrong_size_is_rejected() {
        let fd = create_memfd("kvd-test", 8192, HugePages::Off).unwrap();
        let f = File::from(fd.try_clone().unwrap());
        assert!(
            f.set_len(4096).is_err(),
            "shrink must be refused by the seal"
        );
        assert!(
            f.set_len(1 << 20).is_err(),
            "grow must be refused by the seal"
        );
        assert!(matches!(
            Mapping::map_fd(&fd, 4096, false, false),
            Err(MapError::Rejected(_))
        ));
    }

    #[test]
    fn unsealed_region_is_rejected_when_untrusted() {
        let f = tempfile_in_memfd();
        assert!(matches!(
            Mapping::map_fd(&f, 4096, false, false),
            Err(MapError::Rejected(_))
        ));
    }

    fn tempfile_in_memfd() -> OwnedFd {
        let name = std::ffi::CString::new("plain").unwrap();
        // SAFETY: valid C string; result checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        File::from(fd.try_clone().unwrap()).set_len(4096).unwrap();
        fd
    }
}
