//! Copy planning: which contiguous copies move a batch of KV blocks between an engine's paged
//! KV tensors and kvd's arena slots.
//!
//! A kvd block is the concatenation, in layer order, of one page of every layer buffer (the
//! connector's layout, python/README.md). Saving blocks is a gather (many device pages → one
//! host slot each), loading a scatter. Plans are checked here — page ids in range, slots big
//! enough, pages inside their layer — so a backend only ever sees copies that stay inside the
//! buffers it was given, and adjacent copies are merged so the driver gets as few as possible.

use crate::{DevicePtr, GpuError, Run};

/// One layer's paged KV buffer on the device: page `i` lies at `base + i * stride` and holds
/// `page` bytes; `pages` pages exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layer {
    /// Address of page 0.
    pub base: DevicePtr,
    /// Bytes from one page to the next (≥ `page`).
    pub stride: u64,
    /// Bytes of one page.
    pub page: u64,
    /// Pages in the buffer.
    pub pages: u64,
}

/// Bytes from the start of page 0 to the end of the last page of a buffer of `pages` pages
/// of `page` bytes, `stride` apart; `None` when that overflows or there are no pages.
pub fn extent(pages: u64, stride: u64, page: u64) -> Option<u64> {
    pages.checked_sub(1)?.checked_mul(stride)?.checked_add(page)
}

/// Bytes of one kvd block for these layers (one page of each).
pub fn block_bytes(layers: &[Layer]) -> u64 {
    layers.iter().map(|l| l.page).sum()
}

/// The copies that move page `block_ids[i]` of every layer to or from the host slot at
/// `slots[i]` (layer pages back to back, layer 0 first), merged where two copies are
/// adjacent on both sides. Each slot must hold [`block_bytes`].
pub fn block_runs(
    layers: &[Layer],
    block_ids: &[u64],
    slots: &[usize],
) -> Result<Vec<Run>, GpuError> {
    if block_ids.len() != slots.len() {
        return Err(GpuError::Invalid(format!(
            "{} block ids but {} host slots",
            block_ids.len(),
            slots.len()
        )));
    }
    for (i, l) in layers.iter().enumerate() {
        let last_end = extent(l.pages, l.stride, l.page).and_then(|o| o.checked_add(l.base));
        if l.page == 0 || l.stride < l.page || last_end.is_none() {
            return Err(GpuError::Invalid(format!(
                "layer {i}: page {} B every {} B over {} pages at {:#x} is not a valid buffer",
                l.page, l.stride, l.pages, l.base
            )));
        }
    }
    let per_block = usize::try_from(block_bytes(layers))
        .map_err(|_| GpuError::Invalid("block larger than the address space".into()))?;
    let mut runs: Vec<Run> = Vec::with_capacity(block_ids.len() * layers.len());
    for (&id, &slot) in block_ids.iter().zip(slots) {
        if slot.checked_add(per_block).is_none() {
            return Err(GpuError::Invalid(format!("host slot {slot:#x} overflows")));
        }
        let mut host = slot;
        for (i, l) in layers.iter().enumerate() {
            if id >= l.pages {
                return Err(GpuError::Invalid(format!(
                    "page {id} is out of range for layer {i} ({} pages)",
                    l.pages
                )));
            }
            // In range: checked above for the last page.
            let run = Run {
                dev: l.base + id * l.stride,
                host,
                len: l.page as usize,
            };
            host += run.len;
            match runs.last_mut() {
                Some(prev)
                    if prev.dev + prev.len as u64 == run.dev
                        && prev.host + prev.len == run.host =>
                {
                    prev.len += run.len;
                }
                _ => runs.push(run),
            }
        }
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(base: u64, page: u64, stride: u64, pages: u64) -> Layer {
        Layer {
            base,
            stride,
            page,
            pages,
        }
    }

    #[test]
    fn each_block_gathers_one_page_of_every_layer_in_order() {
        let layers = [layer(0x10_000, 256, 256, 8), layer(0x90_000, 256, 512, 8)];
        let runs = block_runs(&layers, &[3, 0], &[0x1000, 0x2000]).unwrap();
        assert_eq!(
            runs,
            vec![
                Run {
                    dev: 0x10_000 + 3 * 256,
                    host: 0x1000,
                    len: 256
                },
                Run {
                    dev: 0x90_000 + 3 * 512,
                    host: 0x1100,
                    len: 256
                },
                Run {
                    dev: 0x10_000,
                    host: 0x2000,
                    len: 256
                },
                Run {
                    dev: 0x90_000,
                    host: 0x2100,
                    len: 256
                },
            ]
        );
    }

    #[test]
    fn adjacent_pages_and_slots_become_one_copy() {
        // One layer, consecutive pages into consecutive slots: a single copy.
        let layers = [layer(0, 4096, 4096, 16)];
        let runs = block_runs(&layers, &[4, 5, 6], &[0x8000, 0x9000, 0xA000]).unwrap();
        assert_eq!(
            runs,
            vec![Run {
                dev: 4 * 4096,
                host: 0x8000,
                len: 3 * 4096
            }]
        );
        // Layers laid out back to back for one block (cross-layer contiguous pages).
        let l0 = layer(0, 1024, 2048, 4);
        let l1 = layer(1024, 1024, 2048, 4);
        let runs = block_runs(&[l0, l1], &[2], &[0x100]).unwrap();
        assert_eq!(
            runs,
            vec![Run {
                dev: 2 * 2048,
                host: 0x100,
                len: 2048
            }]
        );
    }

    #[test]
    fn bad_requests_are_refused_not_planned() {
        let layers = [layer(0, 256, 256, 4)];
        let e = block_runs(&layers, &[4], &[0]).unwrap_err();
        assert!(e.to_string().contains("page 4 is out of range"), "{e}");
        assert!(block_runs(&layers, &[0, 1], &[0]).is_err());
        assert!(
            block_runs(&[layer(0, 512, 256, 4)], &[0], &[0]).is_err(),
            "stride < page"
        );
        assert!(block_runs(&[layer(u64::MAX - 10, 256, 256, 4)], &[0], &[0]).is_err());
        assert!(block_runs(&layers, &[0], &[usize::MAX - 8]).is_err());
        assert!(block_runs(&[layer(0, 0, 0, 4)], &[0], &[0]).is_err());
    }
}
