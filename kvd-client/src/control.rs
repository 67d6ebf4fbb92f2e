//! Blocking control-socket connection: frames out, frames (and passed fds) in.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use kvd_proto::frame::{self, Request, Response, LEN_PREFIX, MAX_FRAME_BYTES};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::error::{ClientError, Result};

/// A connected control socket.
#[derive(Debug)]
pub struct Control {
    stream: UnixStream,
    next_id: u32,
    timeout: Option<Duration>,
}

/// Environment variable naming the uid kvd runs as; a client refuses a socket served by any
/// other uid.
pub const SERVER_UID_ENV: &str = "KVD_SERVER_UID";

/// The uid a client insists on for the daemon behind the socket: `explicit`, else
/// `$KVD_SERVER_UID`, else none (see [`check_server`]).
pub fn expected_server_uid(explicit: Option<u32>) -> Result<Option<u32>> {
    if explicit.is_some() {
        return Ok(explicit);
    }
    match std::env::var(SERVER_UID_ENV) {
        Ok(v) => v.trim().parse().map(Some).map_err(|_| {
            ClientError::Invalid(format!(
                "{SERVER_UID_ENV}={v:?} is not a uid; set it to the numeric uid kvd runs as"
            ))
        }),
        Err(_) => Ok(None),
    }
}

/// Checks who serves the socket (`SO_PEERCRED`) before anything is sent to it: the daemon must
/// run as `expected` when given; otherwise as root, as this process's own uid, or as the owner
/// of the socket's directory — somebody who could replace the socket anyway. Anyone else
/// serving there has replaced kvd's socket and would see every block.
fn check_server(stream: &UnixStream, path: &Path, expected: Option<u32>) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| ClientError::Io(e.into()))?;
    let uid = cred.uid();
    let trusted = match expected {
        Some(want) => uid == want,
        None => {
            let dir_owner = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .and_then(|d| std::fs::metadata(d).ok())
                .map(|m| m.uid());
            uid == 0 || uid == nix::unistd::geteuid().as_raw() || dir_owner == Some(uid)
        }
    };
    if trusted {
        return Ok(());
    }
    Err(ClientError::Impostor {
        path: path.to_owned(),
        uid,
        expected: match expected {
            Some(want) => format!("uid {want} ({SERVER_UID_ENV})"),
            None => "root, this process's uid or the socket directory's owner".into(),
        },
    })
}

impl Control {
    /// Connects to the daemon's socket, checking who serves it (`$KVD_SERVER_UID` or the
    /// defaults of [`Control::connect_to`]).
    pub fn connect(path: &Path) -> Result<Self> {
        Self::connect_to(path, expected_server_uid(None)?)
    }

    /// Connects to the daemon's socket and refuses it unless the process serving it runs as
    /// `server_uid` (when `None`: as root, this process's uid, or the owner of the socket's
    /// directory).
    pub fn connect_to(path: &Path, server_uid: Option<u32>) -> Result<Self> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::NotRunning {
            path: path.to_owned(),
            source,
        })?;
        check_server(&stream, path, server_uid)?;
        Ok(Self {
            stream,
            next_id: 1,
            timeout: None,
        })
    }

    /// Bounds how long a call may wait for the daemon (`None`: forever). A call that runs
    /// out fails with a `TimedOut` IO error; the connection is then unusable (a late reply
    /// may still arrive), so drop it and reconnect.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<()> {
        self.stream.set_read_timeout(timeout)?;
        self.stream.set_write_timeout(timeout)?;
        self.timeout = timeout;
        Ok(())
    }

    /// Sends `req` and waits for its response, with any file descriptor passed alongside.
    pub fn call(&mut self, req: &Request) -> Result<(Response, Option<OwnedFd>)> {
        self.call_with_fds(req, &[])
    }

    /// Like [`call`](Self::call), passing `fds` with the request (`SCM_RIGHTS` on the frame's
    /// first bytes, where the daemon looks for them).
    pub fn call_with_fds(
        &mut self,
        req: &Request,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(Response, Option<OwnedFd>)> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let timeout = self.timeout;
        let timed_out = |e: ClientError| match e {
            ClientError::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                ClientError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("kvd did not answer within {timeout:?}"),
                ))
            }
            other => other,
        };
        let bytes = req.encode(id);
        let mut sent = 0;
        if !fds.is_empty() {
            let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
            let cmsg = [ControlMessage::ScmRights(&raw)];
            sent = sendmsg::<()>(
                self.stream.as_raw_fd(),
                &[IoSlice::new(&bytes)],
                &cmsg,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(|e| timed_out(std::io::Error::from(e).into()))?;
        }
        self.stream
            .write_all(&bytes[sent..])
            .map_err(|e| timed_out(e.into()))?;
        loop {
            let (rid, resp, fd) = self.recv().map_err(timed_out)?;
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

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::time::Instant;

    use super::*;
    use crate::{Client, Options};

    /// A daemon that accepts and then never answers (hung, stopped) must not hang the client.
    #[test]
    fn silent_daemon_times_out_as_a_retryable_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("silent.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let holder = std::thread::spawn(move || {
            let (conn, _) = listener.accept().expect("accept");
            std::thread::sleep(Duration::from_secs(1));
            drop(conn);
        });
        let start = Instant::now();
        let opts = Options {
            timeout: Duration::from_millis(200),
            ..Options::default()
        };
        let err = Client::connect_with(&path, opts).expect_err("nobody answered");
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        assert!(err.is_retryable(), "{err}");
        assert!(err.to_string().contains("did not answer within"), "{err}");
        holder.join().expect("holder");
    }

    /// A socket served by a uid other than the one the client was told to expect is refused
    /// before anything is sent; the expected uid (here this process's own) is accepted.
    #[test]
    fn a_socket_served_by_another_uid_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kvd.sock");
        let _listener = UnixListener::bind(&path).expect("bind");
        let me = nix::unistd::geteuid().as_raw();
        Control::connect_to(&path, Some(me)).expect("served by the expected uid");
        Control::connect_to(&path, None).expect("served by this process's uid");
        let err = Control::connect_to(&path, Some(me.wrapping_add(1))).expect_err("impostor");
        assert!(
            matches!(err, ClientError::Impostor { uid, .. } if uid == me),
            "{err}"
        );
        assert!(err.is_permanent(), "{err}");
        assert!(err.to_string().contains("KVD_SERVER_UID"), "{err}");
    }

    #[test]
    fn server_uid_comes_from_the_option_first() {
        assert_eq!(expected_server_uid(Some(7)).expect("explicit"), Some(7));
    }
}
