//! ZMTP 3 (ZeroMQ's wire protocol), as much of it as kvd's KV-event sockets speak: a PUB
//! socket that binds or connects, and a replay socket that binds and answers as a ROUTER.
//! Written for peers that may be hostile, because these sockets face the cluster network:
//! every inbound frame's length is checked against a small limit before a byte of it is
//! allocated (the `zeromq` crate allocated whatever a frame header announced, and one header
//! claiming 2^62 bytes aborted the daemon), a peer must finish its handshake within a
//! deadline, peers are capped in all and per address, and a subscriber too slow to take its
//! messages loses them (ZMQ's high-water mark) instead of holding up the publisher.
//!
//! Mechanism NULL only (what vLLM and llm-d use). Subscriptions arrive either as ZMTP 3.0
//! messages (`\x01prefix` / `\x00prefix`) or as ZMTP 3.1 `SUBSCRIBE`/`CANCEL` commands;
//! `PING` is answered with `PONG`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::accept::{Admission, Admitted, Caps};

const MORE: u8 = 0x01;
const LONG: u8 = 0x02;
const COMMAND: u8 = 0x04;

/// Bounds on what a peer may make these sockets do.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest inbound frame (subscriptions and replay requests are a few bytes).
    pub max_frame: usize,
    /// Most frames in one inbound message.
    pub max_parts: usize,
    /// Time a peer has to finish the greeting and `READY`.
    pub handshake: Duration,
    /// Most peers at once.
    pub max_peers: usize,
    /// Most peers at once from one IP address (TCP).
    pub max_peers_per_addr: usize,
    /// Messages queued for one peer before further ones are dropped for it.
    pub queue: usize,
    /// Most subscription prefixes one peer may hold.
    pub max_subscriptions: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame: 4096,
            max_parts: 8,
            handshake: Duration::from_secs(5),
            max_peers: 64,
            max_peers_per_addr: 8,
            queue: 1024,
            max_subscriptions: 256,
        }
    }
}

impl Limits {
    fn caps(&self) -> Caps {
        Caps {
            total: self.max_peers,
            per_addr: self.max_peers_per_addr,
        }
    }
}

/// What went wrong with an endpoint or a peer.
#[derive(Debug, thiserror::Error)]
pub enum ZmtpError {
    /// The endpoint is not one this module speaks.
    #[error("bad ZMQ endpoint {0:?}: want tcp://HOST:PORT, tcp://*:PORT or ipc:///PATH")]
    Endpoint(String),
    /// Reading, writing, binding or connecting failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The peer broke the protocol.
    #[error("ZMTP: {0}")]
    Protocol(&'static str),
    /// The peer announced a frame over the limit.
    #[error("ZMTP: a frame of {len} bytes is over the limit of {max}")]
    FrameTooLarge {
        /// Announced length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// The peer did not finish its handshake in time.
    #[error("ZMTP: handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
    /// The peer's socket type cannot talk to ours.
    #[error("ZMTP: a {theirs} socket cannot talk to a {ours} socket")]
    SocketType {
        /// The peer's.
        theirs: String,
        /// Ours.
        ours: &'static str,
    },
}

/// Where a socket binds or connects.
#[derive(Debug, Clone, PartialEq)]
pub enum Endpoint {
    /// `host:port` (`*` already turned into the unspecified address).
    Tcp(String),
    /// A Unix socket's path.
    Ipc(PathBuf),
}

impl Endpoint {
    /// Parses `tcp://HOST:PORT` (`*` for every address) or `ipc:///PATH`.
    pub fn parse(s: &str) -> Result<Endpoint, ZmtpError> {
        let bad = || ZmtpError::Endpoint(s.to_owned());
        if let Some(path) = s.strip_prefix("ipc://") {
            return if path.is_empty() {
                Err(bad())
            } else {
                Ok(Endpoint::Ipc(PathBuf::from(path)))
            };
        }
        let rest = s.strip_prefix("tcp://").ok_or_else(bad)?;
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        port.parse::<u16>().map_err(|_| bad())?;
        let host = match host {
            "*" => "0.0.0.0",
            "" => return Err(bad()),
            h => h,
        };
        Ok(Endpoint::Tcp(format!("{host}:{port}")))
    }
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
type Conn = Box<dyn Io>;

/// A bound endpoint.
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    async fn bind(ep: &Endpoint) -> Result<Listener, ZmtpError> {
        match ep {
            Endpoint::Tcp(addr) => Ok(Listener::Tcp(TcpListener::bind(addr.as_str()).await?)),
            Endpoint::Ipc(path) => {
                remove_stale_socket(path)?;
                Ok(Listener::Unix(UnixListener::bind(path)?, path.clone()))
            }
        }
    }

    async fn accept(&self) -> std::io::Result<(Conn, Option<IpAddr>)> {
        match self {
            Listener::Tcp(l) => {
                let (s, a) = l.accept().await?;
                s.set_nodelay(true)?;
                Ok((Box::new(s), Some(a.ip())))
            }
            Listener::Unix(l, _) => Ok((Box::new(l.accept().await?.0), None)),
        }
    }

    /// The TCP port bound (for `tcp://*:0`).
    fn port(&self) -> Option<u16> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            Listener::Unix(..) => None,
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// An `ipc://` path left by an earlier run is a socket and is removed; anything else there
/// (a file, a link) is not kvd's to delete.
fn remove_stale_socket(path: &std::path::Path) -> Result<(), ZmtpError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => Ok(std::fs::remove_file(path)?),
        Ok(_) => Err(ZmtpError::Io(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ))),
        Err(_) => Ok(()),
    }
}

async fn dial(ep: &Endpoint) -> std::io::Result<Conn> {
    match ep {
        Endpoint::Tcp(addr) => {
            let s = TcpStream::connect(addr.as_str()).await?;
            s.set_nodelay(true)?;
            Ok(Box::new(s))
        }
        Endpoint::Ipc(path) => Ok(Box::new(UnixStream::connect(path).await?)),
    }
}

/// Our 64-byte greeting: ZMTP 3.0, mechanism NULL.
fn greeting(as_server: bool) -> [u8; 64] {
    let mut g = [0u8; 64];
    g[0] = 0xff;
    g[9] = 0x7f;
    g[10] = 3;
    g[12..16].copy_from_slice(b"NULL");
    g[32] = u8::from(as_server);
    g
}

fn check_greeting(g: &[u8; 64]) -> Result<(), ZmtpError> {
    if g[0] != 0xff || g[9] & 1 != 1 {
        return Err(ZmtpError::Protocol("not a ZMTP greeting"));
    }
    if g[10] < 3 {
        return Err(ZmtpError::Protocol("ZMTP before 3.0 is not spoken"));
    }
    let mech = &g[12..32];
    if &mech[..4] != b"NULL" || mech[4..].iter().any(|&b| b != 0) {
        return Err(ZmtpError::Protocol("only the NULL mechanism is spoken"));
    }
    Ok(())
}

/// A `READY` command body naming our socket type.
fn ready(socket_type: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(32);
    b.push(5);
    b.extend_from_slice(b"READY");
    b.push(11);
    b.extend_from_slice(b"Socket-Type");
    b.extend_from_slice(&(socket_type.len() as u32).to_be_bytes());
    b.extend_from_slice(socket_type.as_bytes());
    b
}

/// Splits a command body into its name and data.
fn command(body: &[u8]) -> Result<(&[u8], &[u8]), ZmtpError> {
    let n = usize::from(*body.first().ok_or(ZmtpError::Protocol("empty command"))?);
    if body.len() < 1 + n {
        return Err(ZmtpError::Protocol("command name past its frame"));
    }
    Ok((&body[1..1 + n], &body[1 + n..]))
}

/// The `Socket-Type` property of a `READY` command body.
fn peer_socket_type(body: &[u8]) -> Result<String, ZmtpError> {
    let (name, mut props) = command(body)?;
    if name != b"READY" {
        return Err(ZmtpError::Protocol("expected READY"));
    }
    let mut found = None;
    while !props.is_empty() {
        let n = usize::from(props[0]);
        let name = props
            .get(1..1 + n)
            .ok_or(ZmtpError::Protocol("READY name"))?;
        let len = props
            .get(1 + n..5 + n)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or(ZmtpError::Protocol("READY value length"))?;
        let value = props
            .get(5 + n..5 + n + len)
            .ok_or(ZmtpError::Protocol("READY value past its frame"))?;
        if name.eq_ignore_ascii_case(b"Socket-Type") {
            found = Some(String::from_utf8_lossy(value).into_owned());
        }
        props = &props[5 + n + len..];
    }
    found.ok_or(ZmtpError::Protocol("READY without a Socket-Type"))
}

/// Appends one message (`frames`, the last without MORE) in ZMTP framing.
pub fn encode(frames: &[Bytes], out: &mut BytesMut) {
    for (i, f) in frames.iter().enumerate() {
        let more = if i + 1 < frames.len() { MORE } else { 0 };
        frame_header(out, more, f.len());
        out.extend_from_slice(f);
    }
}

fn frame_header(out: &mut BytesMut, flags: u8, len: usize) {
    if len > 255 {
        out.put_u8(flags | LONG);
        out.put_u64(len as u64);
    } else {
        out.put_u8(flags);
        out.put_u8(len as u8);
    }
}

fn command_frame(body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(body.len() + 9);
    frame_header(&mut out, COMMAND, body.len());
    out.extend_from_slice(body);
    out.freeze()
}

/// One inbound unit.
enum Inbound {
    Command(Bytes),
    Message(Vec<Bytes>),
}

/// Reads one frame: its flags and its body, refusing a length over `max` before reading it.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<(u8, Bytes), ZmtpError> {
    let flags = r.read_u8().await?;
    if flags & !(MORE | LONG | COMMAND) != 0 {
        return Err(ZmtpError::Protocol("reserved frame flag bits set"));
    }
    let len = if flags & LONG != 0 {
        r.read_u64().await?
    } else {
        u64::from(r.read_u8().await?)
    };
    if len > max as u64 {
        return Err(ZmtpError::FrameTooLarge { len, max });
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body).await?;
    Ok((flags, Bytes::from(body)))
}

/// Reads one command or one whole message of at most `limits.max_parts` frames.
async fn read_inbound<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: &Limits,
) -> Result<Inbound, ZmtpError> {
    let mut parts = Vec::new();
    loop {
        let (flags, body) = read_frame(r, limits.max_frame).await?;
        if flags & COMMAND != 0 {
            if flags & MORE != 0 || !parts.is_empty() {
                return Err(ZmtpError::Protocol("a command inside a message"));
            }
            return Ok(Inbound::Command(body));
        }
        parts.push(body);
        if flags & MORE == 0 {
            return Ok(Inbound::Message(parts));
        }
        if parts.len() >= limits.max_parts {
            return Err(ZmtpError::Protocol("too many frames in one message"));
        }
    }
}

/// Greets, exchanges `READY`, and checks the peer's socket type is one of `accepts`.
async fn handshake(
    conn: &mut Conn,
    ours: &'static str,
    accepts: &[&str],
    as_server: bool,
    limits: &Limits,
) -> Result<(), ZmtpError> {
    let steps = async {
        conn.write_all(&greeting(as_server)).await?;
        let mut g = [0u8; 64];
        conn.read_exact(&mut g).await?;
        check_greeting(&g)?;
        conn.write_all(&command_frame(&ready(ours))).await?;
        let Inbound::Command(body) = read_inbound(conn, limits).await? else {
            return Err(ZmtpError::Protocol("expected READY"));
        };
        let theirs = peer_socket_type(&body)?;
        if accepts.iter().any(|t| t.eq_ignore_ascii_case(&theirs)) {
            Ok(())
        } else {
            Err(ZmtpError::SocketType { theirs, ours })
        }
    };
    tokio::time::timeout(limits.handshake, steps)
        .await
        .map_err(|_| ZmtpError::HandshakeTimeout(limits.handshake))?
}

/// A `PONG` for a `PING` command's data (TTL, then a context echoed back), if it is one.
fn pong(name: &[u8], data: &[u8]) -> Option<Bytes> {
    if name != b"PING" || data.len() < 2 {
        return None;
    }
    let ctx = &data[2..data.len().min(18)];
    let mut b = Vec::with_capacity(5 + ctx.len());
    b.push(4);
    b.extend_from_slice(b"PONG");
    b.extend_from_slice(ctx);
    Some(command_frame(&b))
}

/// Accepts peers until `stop`, admitting each (or closing it at once) and serving it with
/// `serve` on a task of its own.
fn accept_loop<F, Fut>(listener: Listener, adm: Arc<Admission>, stop: CancellationToken, serve: F)
where
    F: Fn(Conn, Admitted) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((conn, addr)) => {
                    if let Some(a) = adm.admit(addr) {
                        let stop = stop.clone();
                        let fut = serve(conn, a);
                        tokio::spawn(async move {
                            tokio::select! {
                                _ = stop.cancelled() => {}
                                _ = fut => {}
                            }
                        });
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ZMQ endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
}

/// One subscriber of a PUB socket.
struct Subscriber {
    id: u64,
    prefixes: Arc<Mutex<Vec<Bytes>>>,
    tx: mpsc::Sender<Bytes>,
}

/// Subscribers of a PUB socket, and counts.
#[derive(Default)]
struct Subscribers {
    list: Mutex<Vec<Subscriber>>,
    next_id: AtomicU64,
    dropped: AtomicU64,
}

impl Subscribers {
    fn add(&self, prefixes: Arc<Mutex<Vec<Bytes>>>, tx: mpsc::Sender<Bytes>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.list.lock().push(Subscriber { id, prefixes, tx });
        id
    }

    fn remove(&self, id: u64) {
        self.list.lock().retain(|s| s.id != id);
    }
}

/// A PUB socket: messages go to every subscriber whose prefixes match the first frame, and
/// are dropped for a subscriber whose queue is full.
pub struct PubSocket {
    subs: Arc<Subscribers>,
    adm: Arc<Admission>,
    stop: CancellationToken,
    connected: watch::Receiver<bool>,
    /// A bound socket's (always up) state; a connecting socket's is its dialer's.
    _up: Option<watch::Sender<bool>>,
    port: Option<u16>,
}

impl PubSocket {
    /// Binds `endpoint` and accepts subscribers (SUB or XSUB) in the background.
    pub async fn bind(endpoint: &str, limits: Limits) -> Result<PubSocket, ZmtpError> {
        let listener = Listener::bind(&Endpoint::parse(endpoint)?).await?;
        let port = listener.port();
        let subs = Arc::new(Subscribers::default());
        let adm = Admission::new(limits.caps());
        let stop = CancellationToken::new();
        let s = subs.clone();
        accept_loop(
            listener,
            adm.clone(),
            stop.clone(),
            move |conn, admitted| serve_subscriber(conn, s.clone(), limits, admitted),
        );
        let (up, connected) = watch::channel(true);
        Ok(PubSocket {
            subs,
            adm,
            stop,
            connected,
            _up: Some(up),
            port,
        })
    }

    /// Connects to a subscriber that binds `endpoint`, in the background, and again whenever
    /// it goes away (backing off up to 5 s between tries).
    pub fn connect(endpoint: &str, limits: Limits) -> Result<PubSocket, ZmtpError> {
        let ep = Endpoint::parse(endpoint)?;
        let subs = Arc::new(Subscribers::default());
        let adm = Admission::new(limits.caps());
        let stop = CancellationToken::new();
        let (tx, rx) = watch::channel(false);
        let (s, st, ep_name) = (subs.clone(), stop.clone(), endpoint.to_owned());
        tokio::spawn(async move {
            tokio::select! {
                _ = st.cancelled() => {}
                _ = dial_loop(ep, ep_name, s, limits, tx) => {}
            }
        });
        Ok(PubSocket {
            subs,
            adm,
            stop,
            connected: rx,
            _up: None,
            port: None,
        })
    }

    /// Queues `frames` for every matching subscriber; how many took it.
    pub fn send(&self, frames: &[Bytes]) -> usize {
        let topic = frames.first().cloned().unwrap_or_default();
        let mut wire = BytesMut::new();
        encode(frames, &mut wire);
        let wire = wire.freeze();
        let mut took = 0;
        for s in self.subs.list.lock().iter() {
            if !s.prefixes.lock().iter().any(|p| topic.starts_with(p)) {
                continue;
            }
            match s.tx.try_send(wire.clone()) {
                Ok(()) => took += 1,
                Err(_) => {
                    self.subs.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        took
    }

    /// Whether a connecting socket is connected now (a binding one always is).
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Waits until the connection state is `up` (forever, once the socket has stopped).
    pub async fn wait_connected(&mut self, up: bool) {
        if self.connected.wait_for(|c| *c == up).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Subscribers now, messages dropped for slow subscribers, peers refused at the caps.
    pub fn counts(&self) -> (usize, u64, u64) {
        (
            self.subs.list.lock().len(),
            self.subs.dropped.load(Ordering::Relaxed),
            self.adm.refused(),
        )
    }

    /// The TCP port bound, for an endpoint bound on port 0.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// Waits (at most `linger`) until every subscriber's queue has been taken by its writer.
    pub async fn flush(&self, linger: Duration) {
        let deadline = tokio::time::Instant::now() + linger;
        while tokio::time::Instant::now() < deadline {
            let busy = self
                .subs
                .list
                .lock()
                .iter()
                .any(|s| s.tx.capacity() < s.tx.max_capacity());
            if !busy {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for PubSocket {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn dial_loop(
    ep: Endpoint,
    name: String,
    subs: Arc<Subscribers>,
    limits: Limits,
    connected: watch::Sender<bool>,
) {
    let mut delay = Duration::from_millis(100);
    let mut warned = false;
    loop {
        match tokio::time::timeout(Duration::from_secs(2), dial(&ep)).await {
            Ok(Ok(conn)) => {
                delay = Duration::from_millis(100);
                warned = false;
                tracing::info!(endpoint = %name, "KV events: connected to the subscriber");
                let on_ready = || {
                    connected.send_replace(true);
                };
                serve_connected(conn, &subs, limits, on_ready).await;
                connected.send_replace(false);
                tracing::warn!(endpoint = %name, "KV events: subscriber went away; reconnecting");
            }
            Ok(Err(e)) if !warned => {
                tracing::warn!(endpoint = %name, error = %e,
                    "KV events: subscriber not reachable; retrying");
                warned = true;
            }
            _ => {}
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn serve_connected(
    mut conn: Conn,
    subs: &Arc<Subscribers>,
    limits: Limits,
    on_ready: impl FnOnce(),
) {
    if let Err(e) = handshake(&mut conn, "PUB", &["SUB", "XSUB"], false, &limits).await {
        tracing::warn!(error = %e, "KV events: subscriber's handshake failed");
        return;
    }
    on_ready();
    if let Err(e) = run_subscriber(conn, subs, &limits).await {
        tracing::debug!(error = %e, "KV events: subscriber connection ended");
    }
}

async fn serve_subscriber(
    mut conn: Conn,
    subs: Arc<Subscribers>,
    limits: Limits,
    _admitted: Admitted,
) {
    let shook = handshake(&mut conn, "PUB", &["SUB", "XSUB"], true, &limits).await;
    let r = match shook {
        Ok(()) => run_subscriber(conn, &subs, &limits).await,
        Err(e) => Err(e),
    };
    if let Err(e) = r {
        tracing::debug!(error = %e, "KV events: subscriber dropped");
    }
}

/// Serves one subscriber after its handshake: its subscriptions in, messages out.
async fn run_subscriber(
    conn: Conn,
    subs: &Arc<Subscribers>,
    limits: &Limits,
) -> Result<(), ZmtpError> {
    let (mut rd, mut wr) = tokio::io::split(conn);
    let prefixes = Arc::new(Mutex::new(Vec::new()));
    let (tx, mut rx) = mpsc::channel::<Bytes>(limits.queue.max(1));
    let id = subs.add(prefixes.clone(), tx.clone());
    let writer = async {
        while let Some(b) = rx.recv().await {
            wr.write_all(&b).await?;
        }
        Ok::<(), ZmtpError>(())
    };
    let reader = async {
        loop {
            match read_inbound(&mut rd, limits).await? {
                Inbound::Message(parts) => {
                    if let [one] = parts.as_slice() {
                        if let Some(&op) = one.first() {
                            subscription(&prefixes, op, one.slice(1..), limits)?;
                        }
                    }
                }
                Inbound::Command(body) => {
                    let (name, data) = command(&body)?;
                    let data = body.slice(body.len() - data.len()..);
                    match name {
                        b"SUBSCRIBE" => subscription(&prefixes, 1, data, limits)?,
                        b"CANCEL" => subscription(&prefixes, 0, data, limits)?,
                        _ => {
                            if let Some(p) = pong(name, &data) {
                                let _ = tx.try_send(p);
                            }
                        }
                    }
                }
            }
        }
    };
    let r = tokio::select! {
        r = writer => r,
        r = reader => r,
    };
    subs.remove(id);
    r
}

/// Applies a subscription (`op` 1) or its cancellation (`op` 0) of `prefix`.
fn subscription(
    prefixes: &Mutex<Vec<Bytes>>,
    op: u8,
    prefix: Bytes,
    limits: &Limits,
) -> Result<(), ZmtpError> {
    let mut p = prefixes.lock();
    match op {
        1 => {
            if p.len() >= limits.max_subscriptions {
                return Err(ZmtpError::Protocol("too many subscriptions"));
            }
            p.push(prefix);
        }
        0 => {
            if let Some(i) = p.iter().position(|x| *x == prefix) {
                p.swap_remove(i);
            }
        }
        _ => {}
    }
    Ok(())
}

/// What a replay socket answers a request with: the messages to send back (each the frames
/// after the requester's envelope), computed off the socket's tasks by the owner.
pub type Answer = Box<dyn Fn(&[Bytes]) -> Vec<Vec<Bytes>> + Send + Sync>;

/// A bound socket that speaks as a ROUTER to DEALER/REQ clients: each request (the frames
/// after an empty delimiter) is answered on its own connection, on that connection's task,
/// with what `answer` returns; a peer that does not read its answers is cut off after
/// `write_timeout` of no progress.
pub struct RouterSocket {
    stop: CancellationToken,
    adm: Arc<Admission>,
    port: Option<u16>,
}

impl RouterSocket {
    /// Binds `endpoint` and answers requests with `answer` in the background.
    pub async fn bind(
        endpoint: &str,
        limits: Limits,
        write_timeout: Duration,
        answer: Answer,
    ) -> Result<RouterSocket, ZmtpError> {
        let listener = Listener::bind(&Endpoint::parse(endpoint)?).await?;
        let port = listener.port();
        let adm = Admission::new(limits.caps());
        let stop = CancellationToken::new();
        let answer = Arc::new(answer);
        accept_loop(
            listener,
            adm.clone(),
            stop.clone(),
            move |conn, admitted| {
                serve_requester(conn, answer.clone(), limits, write_timeout, admitted)
            },
        );
        Ok(RouterSocket { stop, adm, port })
    }

    /// The TCP port bound, for an endpoint bound on port 0.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// Peers refused at the caps.
    pub fn refused(&self) -> u64 {
        self.adm.refused()
    }
}

impl Drop for RouterSocket {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve_requester(
    mut conn: Conn,
    answer: Arc<Answer>,
    limits: Limits,
    write_timeout: Duration,
    _admitted: Admitted,
) {
    let r = async {
        handshake(
            &mut conn,
            "ROUTER",
            &["DEALER", "REQ", "ROUTER"],
            true,
            &limits,
        )
        .await?;
        loop {
            let req = match read_inbound(&mut conn, &limits).await? {
                Inbound::Command(body) => {
                    let (name, data) = command(&body)?;
                    if let Some(p) = pong(name, data) {
                        conn.write_all(&p).await?;
                    }
                    continue;
                }
                Inbound::Message(parts) => parts,
            };
            let Some(at) = req.iter().position(|f| f.is_empty()) else {
                continue;
            };
            for msg in answer(&req[at + 1..]) {
                let mut wire = BytesMut::new();
                let mut frames = Vec::with_capacity(msg.len() + 1);
                frames.push(Bytes::new());
                frames.extend(msg);
                encode(&frames, &mut wire);
                tokio::time::timeout(write_timeout, conn.write_all(&wire))
                    .await
                    .map_err(|_| ZmtpError::Protocol("requester stopped reading its answer"))??;
            }
        }
    }
    .await;
    if let Err::<(), ZmtpError>(e) = r {
        tracing::debug!(error = %e, "KV events replay: requester dropped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_like_zmqs() {
        assert_eq!(
            Endpoint::parse("tcp://*:5557").unwrap(),
            Endpoint::Tcp("0.0.0.0:5557".into())
        );
        assert_eq!(
            Endpoint::parse("tcp://[::1]:9").unwrap(),
            Endpoint::Tcp("[::1]:9".into())
        );
        assert_eq!(
            Endpoint::parse("ipc:///tmp/x.sock").unwrap(),
            Endpoint::Ipc("/tmp/x.sock".into())
        );
        for bad in [
            "udp://x:1",
            "tcp://x",
            "tcp://:1",
            "tcp://x:99999",
            "ipc://",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ready_round_trips_and_rejects_truncation() {
        let r = ready("PUB");
        assert_eq!(peer_socket_type(&r).unwrap(), "PUB");
        for cut in 1..r.len() {
            assert!(peer_socket_type(&r[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn greetings_check_version_and_mechanism() {
        assert!(check_greeting(&greeting(true)).is_ok());
        let mut g = greeting(false);
        g[10] = 2;
        assert!(check_greeting(&g).is_err());
        let mut g = greeting(false);
        g[12..17].copy_from_slice(b"CURVE");
        assert!(check_greeting(&g).is_err());
    }

    #[tokio::test]
    async fn a_frame_over_the_limit_is_refused_before_it_is_read() {
        let mut wire: &[u8] = &[LONG, 0x40, 0, 0, 0, 0, 0, 0x01, 0x09];
        let limits = Limits::default();
        match read_inbound(&mut wire, &limits).await {
            Err(ZmtpError::FrameTooLarge { len, .. }) => assert_eq!(len, 0x4000_0000_0000_0109),
            other => panic!("{:?}", other.err()),
        }
    }

    #[tokio::test]
    async fn messages_decode_as_encoded() {
        let frames = vec![
            Bytes::from_static(b"kv@a"),
            Bytes::from(vec![7u8; 300]),
            Bytes::new(),
        ];
        let mut wire = BytesMut::new();
        encode(&frames, &mut wire);
        let limits = Limits {
            max_frame: 300,
            ..Limits::default()
        };
        let mut r: &[u8] = &wire;
        let Inbound::Message(got) = read_inbound(&mut r, &limits).await.unwrap() else {
            panic!("a command")
        };
        assert_eq!(got, frames);
        let many: Vec<Bytes> = (0..limits.max_parts + 1).map(|_| Bytes::new()).collect();
        let mut wire = BytesMut::new();
        encode(&many, &mut wire);
        assert!(read_inbound(&mut &wire[..], &limits).await.is_err());
    }
}
