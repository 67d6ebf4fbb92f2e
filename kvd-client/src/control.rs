//! Blocking control-socket connection: frames out, frames (and passed fds) in.

use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use kvd_proto::frame::{self, Request, Response, LEN_PREFIX, MAX_FRAME_BYTES};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

use crate::error::{ClientError, Result};

/// A connected control socket.
#[derive(Debug)]
pub struct Control {
    stream: UnixStream,
    next_id: u32,
}

impl Control {
    /// Connects to the daemon's socket.
    pub fn connect(path: &Path) -> Result<Self> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::NotRunning {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self { stream, next_id: 1 })
    }

    /// Sends `req` and waits for its response, with any file descriptor passed alongside.
    pub fn call(&mut self, req: &Request) -> Result<(Response, Option<OwnedFd>)> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.stream.write_all(&req.encode(id))?;
        loop {
            let (rid, resp, fd) = self.recv()?;
            if rid == id || rid == 0 {
                if let Response::Error { code, message } = resp {
                    return Err(ClientError::Server { code, message });
                }
                return Ok((resp, fd));
            }
        }
    }

    fn recv(&mut self) -> Result<(u32, Response, Option<OwnedFd>)> {
        let mut prefix = [0u8; LEN_PREFIX];
        let mut got = 0;
        let mut fd: Option<OwnedFd> = None;
        while got < LEN_PREFIX {
            let mut space = nix::cmsg_space!([RawFd; 2]);
            let mut iov = [IoSliceMut::new(&mut prefix[got..])];
            let msg = recvmsg::<()>(
                self.stream.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            let n = msg.bytes;
            for c in msg.cmsgs().map_err(std::io::Error::from)? {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    for raw in fds {
                        // SAFETY: the kernel just installed `raw` in our fd table for us;
                        // nobody else owns it.
                        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                        if fd.is_none() {
                            fd = Some(owned);
                        }
                    }
                }
            }
            if n == 0 {
                return Err(ClientError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "kvd closed the control connection",
                )));
            }
            got += n;
        }
        let n = frame::body_len(prefix, MAX_FRAME_BYTES)?;
        let mut body = vec![0u8; n];
        self.stream.read_exact(&mut body)?;
        let (id, resp) = Response::decode(&body)?;
        Ok((id, resp, fd))
    }

    /// Writes raw bytes (tests of the daemon's handling of garbage).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    /// Reads one raw response (tests).
    pub fn recv_response(&mut self) -> Result<Response> {
        Ok(self.recv()?.1)
    }
}
