//! A bare io_uring random-read loop, the yardstick of `kvd-bench footprint`.
//!
//! fio reads into its `iodepth` buffers over and over; a cache reads every block into a
//! different DRAM slot. Where the disk is a virtual device whose host copies data into guest
//! memory, destinations that stay in the CPU's last-level cache are cheaper to fill, so the
//! two can differ by more than anything the cache's own code does. This loop is the same
//! reads (same file, block size, order and queue depth) with only the destinations changing,
//! so the difference it shows is the memory footprint's alone.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Reads block `order[j]` of `file` (blocks of `block` bytes) into slot `j % slots` of `mem`,
/// with `qd` reads in flight; returns the elapsed time. Every read must return the whole
/// block.
pub fn random_reads(
    file: &File,
    block: usize,
    order: &[usize],
    qd: u32,
    mem: &mut [u8],
    slots: usize,
) -> io::Result<Duration> {
    use io_uring::{opcode, types, IoUring};
    let len = u32::try_from(block)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "block too large"))?;
    if slots == 0 || slots.saturating_mul(block) > mem.len() || qd == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "need qd > 0 and 0 < slots × block ≤ memory",
        ));
    }
    let mut ring = IoUring::new(qd.next_power_of_two())?;
    let fd = types::Fd(file.as_raw_fd());
    let base = mem.as_mut_ptr();
    let (mut next, mut in_flight, mut done) = (0usize, 0u32, 0usize);
    let t = Instant::now();
    while done < order.len() {
        while in_flight < qd && next < order.len() {
            let slot = next % slots;
            let offset = (order[next] * block) as u64;
            // SAFETY: slot < slots and slots × block ≤ mem.len() (checked above), so the
            // destination is inside `mem`, which this call borrows mutably and returns only
            // once no read is in flight (`wait` never gives up with reads in flight).
            let sqe = opcode::Read::new(fd, unsafe { base.add(slot * block) }, len)
                .offset(offset)
                .build()
                .user_data(next as u64);
            // SAFETY: the buffer stays valid until completion (above).
            if unsafe { ring.submission().push(&sqe) }.is_err() {
                break;
            }
            next += 1;
            in_flight += 1;
        }
        wait(&ring);
        let results: Vec<i32> = ring.completion().map(|c| c.result()).collect();
        in_flight -= results.len() as u32;
        done += results.len();
        if let Some(&r) = results.iter().find(|&&r| r != len as i32) {
            // Let what is still in flight finish before `mem` is given back.
            while in_flight > 0 {
                wait(&ring);
                in_flight -= ring.completion().count() as u32;
            }
            return Err(if r < 0 {
                io::Error::from_raw_os_error(-r)
            } else {
                io::Error::new(io::ErrorKind::UnexpectedEof, "short read")
            });
        }
    }
    Ok(t.elapsed())
}

/// Submits and waits for a completion, retrying interrupted waits. Any other failure leaves
/// reads in flight into memory the caller would free on return: abort instead.
fn wait(ring: &io_uring::IoUring) {
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("kvd-bench: io_uring_enter failed with reads in flight: {e}");
                std::process::abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_land_in_their_slots() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let block = 4096;
        let mut f = File::create(&path).unwrap();
        for i in 0..8u8 {
            f.write_all(&[i; 4096]).unwrap();
        }
        let f = File::open(&path).unwrap();
        let order = [3, 1, 7, 0, 5];
        let mut mem = vec![0xFFu8; 5 * block];
        match random_reads(&f, block, &order, 2, &mut mem, 5) {
            Ok(_) => {
                for (j, &b) in order.iter().enumerate() {
                    assert!(mem[j * block..(j + 1) * block]
                        .iter()
                        .all(|&x| x == b as u8));
                }
            }
            // Sandboxes without io_uring: the bench says so at run time.
            Err(e) => eprintln!("io_uring unavailable here ({e}); nothing to check"),
        }
        let mut small = vec![0u8; block];
        assert!(random_reads(&f, block, &order, 2, &mut small, 2).is_err());
        assert!(random_reads(&f, block, &[9], 1, &mut small, 1).is_err());
    }
}
