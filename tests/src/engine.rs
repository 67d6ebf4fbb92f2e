//! A stand-in for an inference engine's paged KV cache, for daemon-driven transfer tests: the
//! layer buffers live in one sealed memfd, which the daemon's host GPU backend maps the way
//! the CUDA backend maps an engine's CUDA IPC handles.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use kvd_client::gpu::{GpuLayer, GpuShare};
use kvd_client::{Client, GpuAttachment, NamespaceId};
use kvd_shm::Mapping;

use crate::pattern;

/// `layers` buffers of `pages` pages of `page` bytes, `stride` bytes apart, back to back in
/// one memfd.
pub struct FakeEngine {
    fd: OwnedFd,
    map: Mapping,
    /// Layer buffers.
    pub layers: u64,
    /// Pages per layer.
    pub pages: u64,
    /// Bytes of one page.
    pub page: u64,
    /// Bytes from one page to the next.
    pub stride: u64,
}

impl FakeEngine {
    /// A zeroed KV cache in a memfd sealed against shrinking.
    pub fn new(layers: u64, pages: u64, page: u64, stride: u64) -> FakeEngine {
        assert!(stride >= page && layers > 0 && pages > 0);
        let len = layers * pages * stride;
        // SAFETY: plain syscalls on a name we own and the descriptor they return.
        let fd = unsafe {
            let raw = libc::memfd_create(c"kvd-fake-engine".as_ptr(), libc::MFD_ALLOW_SEALING);
            assert!(
                raw >= 0,
                "memfd_create: {}",
                std::io::Error::last_os_error()
            );
            OwnedFd::from_raw_fd(raw)
        };
        // SAFETY: valid descriptor; the results are checked.
        unsafe {
            assert_eq!(libc::ftruncate(fd.as_raw_fd(), len as libc::off_t), 0);
            assert_eq!(
                libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK),
                0
            );
        }
        let map = Mapping::map_fd(&fd, len as usize, true, false).expect("map the fake engine");
        FakeEngine {
            fd,
            map,
            layers,
            pages,
            page,
            stride,
        }
    }

    /// The memfd to pass with the attach.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The one share (the memfd) this engine's layers live in.
    pub fn shares(&self) -> Vec<GpuShare> {
        vec![GpuShare::Fd {
            len: self.map.len() as u64,
        }]
    }

    /// The layer buffers as the daemon should see them.
    pub fn layout(&self) -> Vec<GpuLayer> {
        (0..self.layers)
            .map(|l| GpuLayer {
                share: 0,
                offset: l * self.pages * self.stride,
                stride: self.stride,
                page: self.page,
                pages: self.pages,
            })
            .collect()
    }

    /// Attaches this engine to `c`'s connection for namespace `ns`.
    pub fn attach(&self, c: &Client, ns: &NamespaceId) -> GpuAttachment {
        c.gpu_attach(ns, &self.shares(), &[self.fd()], &self.layout())
            .expect("attach the fake engine")
    }

    fn at(&self, layer: u64, page: u64) -> usize {
        assert!(layer < self.layers && page < self.pages);
        ((layer * self.pages + page) * self.stride) as usize
    }

    /// Writes page `page` of every layer with content derived from `seed` (what
    /// [`expected_page`] returns).
    pub fn fill(&self, page: u64, seed: u64) {
        for l in 0..self.layers {
            self.map
                .copy_in(self.at(l, page), &expected_page(seed, l, self.page));
        }
    }

    /// Zeroes page `page` of every layer.
    pub fn clear(&self, page: u64) {
        for l in 0..self.layers {
            self.map
                .copy_in(self.at(l, page), &vec![0u8; self.page as usize]);
        }
    }

    /// The bytes of page `page` of layer `layer`.
    pub fn read(&self, layer: u64, page: u64) -> Vec<u8> {
        let mut out = vec![0u8; self.page as usize];
        self.map.copy_out(self.at(layer, page), &mut out);
        out
    }

    /// A block as kvd stores it: page `page` of every layer, layer 0 first.
    pub fn block(&self, page: u64) -> Vec<u8> {
        (0..self.layers).flat_map(|l| self.read(l, page)).collect()
    }
}

/// The content [`FakeEngine::fill`] writes into one layer's page for `seed`.
pub fn expected_page(seed: u64, layer: u64, page: u64) -> Vec<u8> {
    pattern(seed, layer, page as usize)
}
