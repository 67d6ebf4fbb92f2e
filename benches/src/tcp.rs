//! The reference for peer fetch: a plain TCP copy of the same bytes over loopback, with as
//! many connections as kvd fetches over, from one buffer of distinct blocks into another
//! (a cache's footprint on both sides, as kvd's arenas have). No protocol, no checksum: what
//! the kernel's TCP can do here, which a peer fetch can at best match. `socket_buffer` sets
//! the sockets' buffers as kvd's data connections do (`None`: the kernel's autotuning).

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Copies `src` to `dst` (same length) in blocks of `size` bytes over `conns` connections,
/// block `i` on connection `i % conns`; returns the time from the first byte sent to the
/// last received.
pub fn copy(
    src: &[u8],
    dst: &mut [u8],
    size: usize,
    conns: usize,
    socket_buffer: Option<u32>,
) -> io::Result<Duration> {
    assert_eq!(
        src.len(),
        dst.len(),
        "source and destination differ in length"
    );
    let conns = conns.max(1);
    let size = size.max(1);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut receivers = Vec::with_capacity(conns);
    for _ in 0..conns {
        let out = TcpStream::connect(addr)?;
        let (inc, _) = listener.accept()?;
        out.set_nodelay(true)?;
        if let Some(b) = socket_buffer {
            set_buffer(&out, libc::SO_SNDBUF, b)?;
            set_buffer(&inc, libc::SO_RCVBUF, b)?;
        }
        receivers.push((out, inc));
    }
    // Each connection's destination blocks, as disjoint slices.
    let mut shares: Vec<Vec<&mut [u8]>> = (0..conns).map(|_| Vec::new()).collect();
    for (i, block) in dst.chunks_mut(size).enumerate() {
        shares[i % conns].push(block);
    }
    let start = Instant::now();
    std::thread::scope(|s| -> io::Result<()> {
        let mut handles = Vec::new();
        for (c, ((mut out, mut inc), share)) in receivers.into_iter().zip(shares).enumerate() {
            handles.push(s.spawn(move || -> io::Result<()> {
                for block in src.chunks(size).skip(c).step_by(conns) {
                    out.write_all(block)?;
                }
                Ok(())
            }));
            handles.push(s.spawn(move || -> io::Result<()> {
                for block in share {
                    inc.read_exact(block)?;
                }
                Ok(())
            }));
        }
        for h in handles {
            h.join()
                .map_err(|_| io::Error::other("a copy thread panicked"))??;
        }
        Ok(())
    })?;
    Ok(start.elapsed())
}

fn set_buffer(s: &TcpStream, opt: libc::c_int, bytes: u32) -> io::Result<()> {
    let v = bytes as libc::c_int;
    // SAFETY: a valid socket descriptor and a pointer to a c_int of the given size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_every_block_to_its_place() {
        let src: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut dst = vec![0u8; src.len()];
        copy(&src, &mut dst, 1000, 3, Some(1 << 20)).expect("copy");
        dst.fill(0);
        copy(&src, &mut dst, 777, 2, None).expect("copy");
        assert_eq!(src, dst);
        assert_eq!(src, dst);
    }
}
