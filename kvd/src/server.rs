//! The control plane: a tokio Unix-socket server speaking [`kvd_proto::frame`].
//!
//! Each connection is checked with `SO_PEERCRED` against the configured uids/gids, must open
//! with a version-matched `Hello`, and receives its ring memfd (and later each namespace's arena
//! memfd) with `SCM_RIGHTS`. A frame that does not decode gets one `BadRequest` error frame and
//! the connection is closed; a well-formed request that fails gets an error frame and the
//! connection continues. When the socket closes — or the ring thread reports a protocol
//! violation — the connection's ring thread stops and releases what the client held, and the
//! engine KV buffers it attached for daemon-driven GPU transfers are unmapped. Descriptors a
//! client sends (`SCM_RIGHTS`, only with [`Request::GpuAttach`]) ride on a frame's first bytes.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use kvd_proto::frame::{
    self, ClusterLookup, ErrorCode, NodeHolding, Request, Response, LEN_PREFIX, MAX_LIST,
};
use kvd_proto::gpu::MAX_GPU_FDS;
use kvd_proto::PROTOCOL_VERSION;
use kvd_proto::{BlockKey, NamespaceId};
use kvd_shm::DaemonRing;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinSet;

use crate::daemon::{Conn, Daemon, OpError, VERSION};
use crate::gpu::attach::{self, Attachment};
use crate::ring_service;

/// Most engine KV attachments one connection may hold.
const MAX_ATTACHMENTS: usize = 64;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another daemon answers on the socket.
    #[error(
        "another kvd is already listening on {0}; stop it or choose another server.socket_path"
    )]
    InUse(String),
    /// Something kvd did not make sits at the socket path.
    #[error(
        "{0} exists and is not a socket of this daemon's uid; remove it, or set \
         server.replace_socket = true if kvd may delete it"
    )]
    NotOurs(String),
    /// Binding failed.
    #[error("cannot bind the control socket {path}: {source}")]
    Bind {
        /// Socket path.
        path: String,
        /// OS error.
        #[source]
        source: io::Error,
    },
}

/// Binds the control socket. A socket file left by a dead daemon is replaced only when it is
/// a socket owned by this daemon's uid (or `replace` says so): anything else at the path —
/// a file, a link, another user's socket — is not kvd's to delete.
pub fn bind(path: &Path, mode: u32, replace: bool) -> Result<UnixListener, ServerError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let shown = path.display().to_string();
    let bind_err = |source| ServerError::Bind {
        path: shown.clone(),
        source,
    };
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse(shown));
        }
        let ours = m.file_type().is_socket() && m.uid() == nix::unistd::geteuid().as_raw();
        if !(ours || replace) {
            return Err(ServerError::NotOurs(shown));
        }
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(bind_err)?;
        }
    }
    let l = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(bind_err)?;
    Ok(l)
}

/// Most connections at once that have not sent their first frame yet (they do not count
/// against `server.max_clients`; beyond this, new ones are closed at once).
const MAX_PENDING: usize = 64;

/// Accepts connections until `stop` fires, then closes every connection and waits for them.
pub async fn serve(daemon: Arc<Daemon>, listener: UnixListener, stop: Arc<tokio::sync::Notify>) {
    let mut tasks = JoinSet::new();
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING));
    loop {
        tokio::select! {
            _ = stop.notified() => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => match pending.clone().try_acquire_owned() {
                    Ok(permit) => {
                        tasks.spawn(connection(daemon.clone(), stream, permit));
                    }
                    Err(_) => tracing::debug!("closed a connection: {MAX_PENDING} still in handshake"),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    daemon.begin_shutdown();
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(std::time::Duration::from_secs(10), drain)
        .await
        .is_err()
    {
        tracing::warn!("some connections did not finish within 10 s of shutdown");
    }
}

/// Reads one frame, with the descriptors that came with its first bytes (at most
/// [`MAX_GPU_FDS`]; more closes the connection). `None` at a clean end of stream.
async fn read_frame(
    stream: &mut UnixStream,
    max: usize,
) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut prefix = [0u8; LEN_PREFIX];
    let mut got = 0;
    let mut fds = Vec::new();
    while got < LEN_PREFIX {
        stream.readable().await?;
        let raw = stream.as_raw_fd();
        let r = stream.try_io(Interest::READABLE, || {
            let mut space = nix::cmsg_space!([RawFd; MAX_GPU_FDS]);
            let mut iov = [IoSliceMut::new(&mut prefix[got..])];
            let msg = recvmsg::<()>(
                raw,
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
            )
            .map_err(io::Error::from)?;
            let mut here = Vec::new();
            for c in msg.cmsgs().map_err(io::Error::from)? {
                if let ControlMessageOwned::ScmRights(list) = c {
                    for fd in list {
                        // SAFETY: the kernel just installed `fd` in our table for us; nobody
                        // else owns it.
                        here.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
            Ok((msg.bytes, here, msg.flags.contains(MsgFlags::MSG_CTRUNC)))
        });
        match r {
            Ok((0, ..)) if got == 0 => return Ok(None),
            Ok((0, ..)) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok((_, _, true)) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("more than {MAX_GPU_FDS} descriptors with one frame"),
                ))
            }
            Ok((n, here, false)) => {
                got += n;
                fds.extend(here);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    let n =
        frame::body_len(prefix, max).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut body = vec![0u8; n];
    stream.read_exact(&mut body).await?;
    Ok(Some((body, fds)))
}

async fn send(stream: &mut UnixStream, bytes: &[u8], fd: Option<RawFd>) -> io::Result<()> {
    let Some(fd) = fd else {
        return stream.write_all(bytes).await;
    };
    loop {
        stream.writable().await?;
        let raw = stream.as_raw_fd();
        let r = stream.try_io(Interest::WRITABLE, || {
            let iov = [IoSlice::new(bytes)];
            let fds = [fd];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            sendmsg::<()>(raw, &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None).map_err(io::Error::from)
        });
        match r {
            Ok(n) => return stream.write_all(&bytes[n..]).await,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

fn error(e: OpError) -> Response {
    Response::Error {
        code: e.code,
        message: e.message,
    }
}

/// A frame read from a client: its body and descriptors, `None` at a clean end of stream.
type FrameRead = io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>>;

async fn connection(
    daemon: Arc<Daemon>,
    mut stream: UnixStream,
    pending: tokio::sync::OwnedSemaphorePermit,
) {
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read peer credentials; closing");
            return;
        }
    };
    let (uid, gid) = (cred.uid(), cred.gid());
    let pid = cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
    if !daemon.peer_allowed(uid, gid) {
        tracing::warn!(
            uid,
            gid,
            pid,
            "refused a peer not in server.allowed_uids/allowed_gids"
        );
        let r = error(OpError::new(
            ErrorCode::Unauthorized,
            format!(
                "uid {uid} / gid {gid} may not use kvd (server.allowed_uids, server.allowed_gids)"
            ),
        ));
        let _ = stream.write_all(&r.encode(0)).await;
        return;
    }
    // The first frame (Hello) within the handshake deadline, before the connection takes one
    // of server.max_clients.
    let max = daemon.cfg.server.max_frame_bytes.0 as usize;
    let deadline = Duration::from_millis(u64::from(daemon.cfg.server.handshake_timeout_ms));
    let Ok(first) = tokio::time::timeout(deadline, read_frame(&mut stream, max)).await else {
        tracing::debug!(
            uid,
            pid,
            "closed a client that sent nothing within server.handshake_timeout_ms"
        );
        return;
    };
    drop(pending);
    let conn = match daemon.register(pid, uid, gid) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(uid, pid, "refused a client: {}", e.message);
            let _ = stream.write_all(&error(e).encode(0)).await;
            return;
        }
    };
    let ring_thread = serve_connection(&daemon, &conn, &mut stream, first).await;
    conn.shut();
    if let Some(t) = ring_thread {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    daemon.unregister(&conn);
    tracing::debug!(client = conn.id, "client disconnected");
}

type RingThread = std::thread::JoinHandle<()>;

/// The next frame: `first` if still there, else one read from `stream`, unless the client is
/// kicked or — holding nothing (no namespace, no attachment) — stays silent for
/// `server.idle_timeout_ms`. `None`: stop serving.
async fn next_frame(
    daemon: &Daemon,
    conn: &Conn,
    stream: &mut UnixStream,
    first: &mut Option<FrameRead>,
    holds: bool,
) -> Option<FrameRead> {
    if let Some(f) = first.take() {
        return Some(f);
    }
    let max = daemon.cfg.server.max_frame_bytes.0 as usize;
    let idle = Duration::from_millis(u64::from(daemon.cfg.server.idle_timeout_ms));
    tokio::select! {
        _ = conn.kick.notified() => None,
        r = read_frame(stream, max) => Some(r),
        _ = tokio::time::sleep(idle), if !holds => {
            tracing::debug!(client = conn.id, "dropping an idle client that holds nothing");
            None
        }
    }
}

async fn serve_connection(
    daemon: &Arc<Daemon>,
    conn: &Arc<Conn>,
    stream: &mut UnixStream,
    first: FrameRead,
) -> Option<RingThread> {
    let mut first = Some(first);
    let mut ring_thread: Option<RingThread> = None;
    let mut gpu = GpuState::default();
    loop {
        let holds = !conn.handles.read().is_empty() || !gpu.attachments.is_empty();
        let Some(r) = next_frame(daemon, conn, stream, &mut first, holds).await else {
            break;
        };
        let (body, fds) = match r {
            Ok(Some(b)) => b,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(client = conn.id, error = %e, "dropping client: bad frame");
                let r = error(OpError::new(ErrorCode::BadRequest, e.to_string()));
                let _ = stream.write_all(&r.encode(0)).await;
                break;
            }
        };
        let (id, req) = match Request::decode(&body) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(client = conn.id, error = %e, "dropping client: malformed request");
                let r = error(OpError::new(
                    ErrorCode::BadRequest,
                    format!("malformed request: {e}"),
                ));
                let _ = stream.write_all(&r.encode(0)).await;
                break;
            }
        };
        let hello_done = ring_thread.is_some();
        let (resp, fd, fatal): (Response, Option<OwnedFd>, bool) = match (&req, hello_done) {
            (Request::Hello { .. }, true) => (
                error(OpError::new(ErrorCode::BadRequest, "Hello sent twice")),
                None,
                true,
            ),
            (
                Request::Hello {
                    protocol_version,
                    client_name,
                    admin,
                },
                false,
            ) => match hello(daemon, conn, *protocol_version, client_name, *admin) {
                Ok((resp, ring, fd)) => {
                    let (d, c) = (daemon.clone(), conn.clone());
                    *conn.waker.lock() = Some(ring.waker());
                    match std::thread::Builder::new()
                        .name(format!("kvd-ring-{}", conn.id))
                        .spawn(move || ring_service::run(d, c, ring))
                    {
                        Ok(t) => {
                            ring_thread = Some(t);
                            (resp, Some(fd), false)
                        }
                        Err(e) => (
                            error(OpError::new(
                                ErrorCode::Internal,
                                format!("cannot start ring thread: {e}"),
                            )),
                            None,
                            true,
                        ),
                    }
                }
                Err(e) => (error(e), None, true),
            },
            (_, false) => (
                error(OpError::new(
                    ErrorCode::BadRequest,
                    "the first request must be Hello",
                )),
                None,
                true,
            ),
            (Request::Lookup { ns, keys }, true) => {
                // With peer fetch on, blocks a peer holds are fetched before answering, then
                // what S3 holds (this awaits the network); otherwise it is the local answer.
                match daemon.namespace_for(conn, ns) {
                    Ok(ns) => {
                        let t = std::time::Instant::now();
                        let (prefix_len, tiers) = crate::s3::lookup(daemon, &ns, keys).await;
                        daemon.latency.since(crate::metrics::Op::Lookup, t);
                        (Response::LookupResult { prefix_len, tiers }, None, false)
                    }
                    Err(e) => (error(e), None, false),
                }
            }
            (Request::ClusterLookup { ns, keys }, true) => {
                match cluster_lookup(daemon, conn, ns, keys).await {
                    Ok(r) => (Response::ClusterResult(r), None, false),
                    Err(e) => (error(e), None, false),
                }
            }
            (
                Request::GpuAttach { .. }
                | Request::GpuSave { .. }
                | Request::GpuLoad { .. }
                | Request::GpuDetach { .. },
                true,
            ) => match gpu.serve(daemon, conn, &req, fds).await {
                Ok(r) => (r, None, false),
                Err(e) => (error(e), None, false),
            },
            (_, true) => match dispatch(daemon, conn, req) {
                Ok((r, fd)) => (r, fd, false),
                Err(e) => (error(e), None, false),
            },
        };
        let raw = fd.as_ref().map(|f| f.as_raw_fd());
        if let Err(e) = send(stream, &resp.encode(id), raw).await {
            tracing::debug!(client = conn.id, error = %e, "client went away while we replied");
            break;
        }
        if fatal {
            break;
        }
    }
    ring_thread
}

fn hello(
    daemon: &Daemon,
    conn: &Conn,
    version: u16,
    name: &str,
    admin: bool,
) -> Result<(Response, DaemonRing, OwnedFd), OpError> {
    if daemon.is_shutting_down() {
        return Err(OpError::new(
            ErrorCode::ShuttingDown,
            "kvd is shutting down",
        ));
    }
    if version != PROTOCOL_VERSION {
        return Err(OpError::new(
            ErrorCode::VersionMismatch,
            format!("client speaks protocol {version}, kvd {VERSION} speaks {PROTOCOL_VERSION}; upgrade the older side"),
        ));
    }
    if admin {
        if !daemon.peer_is_admin(conn.uid) {
            return Err(OpError::new(
                ErrorCode::Unauthorized,
                format!("uid {} is not an admin (server.admin_uids)", conn.uid),
            ));
        }
        conn.admin.store(true, Ordering::Relaxed);
    }
    *conn.name.lock() = name.chars().take(128).collect();
    let (ring, fd) = DaemonRing::create(daemon.cfg.ring.entries)
        .map_err(|e| OpError::new(ErrorCode::Internal, format!("cannot create ring: {e}")))?;
    tracing::info!(
        client = conn.id,
        pid = conn.pid,
        uid = conn.uid,
        name,
        admin,
        "client connected"
    );
    Ok((
        Response::Welcome {
            protocol_version: PROTOCOL_VERSION,
            daemon_version: VERSION.into(),
            client_id: conn.id,
            ring_entries: ring.entries(),
            ring_bytes: ring.bytes() as u64,
            max_block_bytes: daemon.cfg.dram.max_block_bytes.0,
            lease_timeout_ms: daemon.cfg.ring.lease_timeout_ms,
        },
        ring,
        fd,
    ))
}

/// Where a key chain's blocks are in the cluster: the index's view (when one is configured
/// and answers) with this node's own, fresher view folded in. Needs the namespace open on
/// this connection, or admin rights.
async fn cluster_lookup(
    daemon: &Daemon,
    conn: &Conn,
    ns: &NamespaceId,
    keys: &[BlockKey],
) -> Result<ClusterLookup, OpError> {
    let (prefix_len, tiers) = match daemon.namespace_for(conn, ns) {
        Ok(open) => daemon.lookup(&open, keys),
        // Admins are answered for any namespace open on this node (namespace_for found none),
        // so here only the disk tier can hold its blocks.
        Err(_) => {
            daemon.require_admin(conn, "a cluster lookup in a namespace not opened here")?;
            daemon.lookup_on_disk(ns, keys)
        }
    };
    let local = |node: &str| NodeHolding {
        node: node.to_string(),
        prefix_len,
        tiers,
        local: true,
    };
    let Some(index) = &daemon.index else {
        let node = crate::index::node_id(&daemon.cfg.index);
        return Ok(ClusterLookup {
            prefix_len,
            nodes: (prefix_len > 0).then(|| local(&node)).into_iter().collect(),
            cluster: false,
        });
    };
    match index.holders(ns, keys).await {
        Ok(h) => Ok(crate::index::summarize(
            &h.per_key,
            Some(local(index.node())),
        )),
        Err(e) => {
            tracing::debug!(error = %e, "cluster lookup answered from the local view only");
            Ok(ClusterLookup {
                prefix_len,
                nodes: (prefix_len > 0)
                    .then(|| local(index.node()))
                    .into_iter()
                    .collect(),
                cluster: false,
            })
        }
    }
}

fn dispatch(
    daemon: &Arc<Daemon>,
    conn: &Conn,
    req: Request,
) -> Result<(Response, Option<OwnedFd>), OpError> {
    let io_err =
        |e: io::Error| OpError::new(ErrorCode::Internal, format!("cannot pass the arena: {e}"));
    Ok(match req {
        Request::Hello { .. } => {
            return Err(OpError::new(ErrorCode::BadRequest, "Hello sent twice"))
        }
        Request::OpenNamespace(desc) => {
            let (ns, handle) = daemon.open_namespace(conn, desc)?;
            let fd = ns.arena.fd().try_clone().map_err(io_err)?;
            (
                Response::NamespaceOpened {
                    ns: ns.id,
                    handle,
                    arena_bytes: ns.arena.total_bytes(),
                    events: daemon.events.is_some(),
                },
                Some(fd),
            )
        }
        Request::Pin { ns, keys } => {
            let ns = daemon.namespace_for(conn, &ns)?;
            let n = ns.store.lock().pin(&keys);
            (Response::Count(n), None)
        }
        Request::Unpin { ns, keys } => {
            let ns = daemon.namespace_for(conn, &ns)?;
            let n = ns.store.lock().unpin(&keys);
            (Response::Count(n), None)
        }
        Request::Delete { ns, keys } => {
            let ns = daemon.namespace_for(conn, &ns)?;
            let n = daemon.delete(&ns, &keys);
            (Response::Count(n), None)
        }
        Request::Stats => (Response::Stats(Box::new(daemon.stats_for(conn))), None),
        Request::List { ns, after, limit } => {
            daemon.require_admin(conn, "ls")?;
            let limit = (limit as usize).clamp(1, MAX_LIST);
            let (blocks, more) = daemon.list(ns, after, limit);
            (Response::Blocks { blocks, more }, None)
        }
        Request::Inspect { key } => {
            daemon.require_admin(conn, "inspect")?;
            let blocks = daemon.inspect(&key);
            (
                Response::Blocks {
                    blocks,
                    more: false,
                },
                None,
            )
        }
        Request::Evict { ns, keys } => {
            daemon.require_admin(conn, "evict")?;
            let mut n = 0;
            for space in daemon.namespaces() {
                if ns.is_none_or(|id| id == space.id) {
                    n += space.store.lock().evict(&keys);
                }
            }
            (Response::Count(n), None)
        }
        Request::Drain { ns } => {
            daemon.require_admin(conn, "drain")?;
            let n = daemon.drain(ns)?;
            (Response::Count(u32::try_from(n).unwrap_or(u32::MAX)), None)
        }
        Request::Warm { ns } => {
            daemon.require_admin(conn, "warm")?;
            let n = daemon.warm(ns)?;
            (Response::Count(u32::try_from(n).unwrap_or(u32::MAX)), None)
        }
        Request::Lineage {
            ns,
            parent,
            keys,
            tokens,
        } => {
            let ns = daemon.namespace_for(conn, &ns)?;
            let n = daemon.record_lineage(&ns, parent, &keys, &tokens)?;
            (Response::Count(n), None)
        }
        Request::Lookup { .. }
        | Request::ClusterLookup { .. }
        | Request::GpuAttach { .. }
        | Request::GpuSave { .. }
        | Request::GpuLoad { .. }
        | Request::GpuDetach { .. } => {
            return Err(OpError::new(
                ErrorCode::Internal,
                "lookups and GPU transfers are answered before dispatch",
            ))
        }
    })
}

/// A connection's daemon-driven GPU transfer state: its attachments (unmapped when the
/// connection ends) and the checksum sealing of its last save, which runs after the reply,
/// beside the next save's copies, and is waited for before that save's sealing starts (one
/// batch sealing at a time per connection).
#[derive(Default)]
struct GpuState {
    attachments: HashMap<u32, Arc<Attachment>>,
    next: u32,
    sealing: Option<tokio::task::JoinHandle<()>>,
}

fn joined(e: tokio::task::JoinError) -> OpError {
    OpError::new(
        ErrorCode::Internal,
        format!("GPU transfer task failed: {e}"),
    )
}

impl GpuState {
    fn get(&self, id: u32) -> Result<Arc<Attachment>, OpError> {
        self.attachments.get(&id).cloned().ok_or_else(|| {
            OpError::new(
                ErrorCode::BadRequest,
                format!("attachment {id} is not held by this connection"),
            )
        })
    }

    async fn serve(
        &mut self,
        daemon: &Arc<Daemon>,
        conn: &Conn,
        req: &Request,
        fds: Vec<OwnedFd>,
    ) -> Result<Response, OpError> {
        let Some(gpu) = &daemon.gpu else {
            return Err(OpError::new(
                ErrorCode::Unsupported,
                "this kvd has no GPU backend (gpu.backend = \"off\"): daemon-driven transfers \
                 are unavailable; copy through the arena instead",
            ));
        };
        Ok(match req {
            Request::GpuAttach { ns, shares, layers } => {
                if self.attachments.len() >= MAX_ATTACHMENTS {
                    return Err(OpError::new(
                        ErrorCode::BadRequest,
                        format!("a connection may hold at most {MAX_ATTACHMENTS} attachments"),
                    ));
                }
                let ns = daemon.namespace_for(conn, ns)?;
                let n_layers = layers.len();
                let (b, c, p) = (gpu.backend.clone(), gpu.counters.clone(), gpu.pool.clone());
                let (shares, layers) = (shares.clone(), layers.clone());
                let a = tokio::task::spawn_blocking(move || {
                    Attachment::new(b, c, p, ns, &shares, fds, &layers)
                })
                .await
                .map_err(joined)??;
                self.next = self.next.wrapping_add(1);
                let id = self.next;
                tracing::info!(
                    client = conn.id,
                    attachment = id,
                    layers = n_layers,
                    block_bytes = a.block_bytes(),
                    "engine KV buffers attached for daemon-driven transfers"
                );
                let block_bytes = a.block_bytes();
                self.attachments.insert(id, Arc::new(a));
                Response::GpuAttached {
                    attachment: id,
                    block_bytes,
                }
            }
            Request::GpuSave {
                attachment,
                keys,
                pages,
            } => {
                let a = self.get(*attachment)?;
                let (d, keys, pages) = (daemon.clone(), keys.clone(), pages.clone());
                let (codes, entries) = tokio::task::spawn_blocking(move || {
                    let t = std::time::Instant::now();
                    let r = a.save(&d, &keys, &pages);
                    d.latency.since(crate::metrics::Op::GpuSave, t);
                    r.map(|(codes, entries)| (codes, (a, entries)))
                })
                .await
                .map_err(joined)??;
                let (a, entries) = entries;
                // At most one batch waits for its checksums per connection: the last one's
                // sealing ran beside this batch's copies (they touch other blocks) and is
                // waited for before this one's starts.
                if let Some(s) = self.sealing.take() {
                    s.await.map_err(joined)?;
                }
                if !entries.is_empty() {
                    let threads = daemon.cfg.gpu.seal_threads as usize;
                    self.sealing = Some(tokio::task::spawn_blocking(move || {
                        attach::seal(a.namespace(), &entries, threads)
                    }));
                }
                Response::BlockCodes(codes)
            }
            Request::GpuLoad {
                attachment,
                keys,
                pages,
                first_layer,
                layers,
                verify,
            } => {
                let a = self.get(*attachment)?;
                let (d, keys, pages) = (daemon.clone(), keys.clone(), pages.clone());
                let (first, count, verify) = (*first_layer, *layers, *verify);
                let codes = tokio::task::spawn_blocking(move || {
                    let t = std::time::Instant::now();
                    let r = a.load(&d, &keys, &pages, first, count, verify);
                    d.latency.since(crate::metrics::Op::GpuLoad, t);
                    r
                })
                .await
                .map_err(joined)??;
                Response::BlockCodes(codes)
            }
            Request::GpuDetach { attachment } => {
                Response::Count(u32::from(self.attachments.remove(attachment).is_some()))
            }
            _ => {
                return Err(OpError::new(
                    ErrorCode::Internal,
                    "not a GPU transfer request",
                ))
            }
        })
    }
}
