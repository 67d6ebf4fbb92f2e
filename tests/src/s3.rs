//! S3-compatible servers for the S3 tier's tests, and a fault-injecting proxy in front of them.
//!
//! `s3s-fs` (checks signatures; installed by `scripts/s3-servers.sh` under
//! `~/.cache/kvd/tools/bin`) and moto's server (closest to AWS's error behaviour; in
//! `~/.cache/kvd/s3-venv`) each run on a free 127.0.0.1 port in a private directory. The
//! proxy sits between kvd and a server and, per request, passes it on, delays it, answers 503,
//! resets the connection or cuts the response body short — the failures a real S3 shows.
//! With `KVD_REQUIRE_S3=1` (set by `scripts/test.sh`) a missing server fails the test instead
//! of skipping it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::redis::free_port;
use crate::wait_for;

/// Access key of the test servers.
pub const ACCESS_KEY: &str = "kvdtestaccess";
/// Secret key of the test servers.
pub const SECRET_KEY: &str = "kvdtestsecret0123456789";

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// s3s-fs 0.14 (Rust, filesystem-backed, checks SigV4 signatures).
    S3sFs,
    /// moto's server (Python; accepts any credentials).
    Moto,
}

/// A running S3-compatible server, killed on drop.
pub struct S3Server {
    child: Child,
    /// Its port.
    pub port: u16,
    /// Which server.
    pub kind: Kind,
    dir: tempfile::TempDir,
}

fn tools_home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
        .join(".cache/kvd")
}

fn skip(why: &str) -> Option<S3Server> {
    assert!(
        std::env::var("KVD_REQUIRE_S3").as_deref() != Ok("1"),
        "{why} (KVD_REQUIRE_S3=1; scripts/s3-servers.sh installs the test servers)"
    );
    eprintln!("SKIPPED: {why} (scripts/s3-servers.sh installs the test servers)");
    None
}

impl S3Server {
    /// Starts a server of `kind` on `port` (a free one if `None`) with `bucket` created, or
    /// returns None (test skipped) where it is not installed.
    pub fn start(kind: Kind, port: Option<u16>, bucket: &str) -> Option<S3Server> {
        let port = port.unwrap_or_else(free_port);
        let dir = tempfile::tempdir().expect("s3 dir");
        let child = match kind {
            Kind::S3sFs => {
                let bin = std::env::var_os("KVD_S3S_FS")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| tools_home().join("tools/bin/s3s-fs"));
                if !bin.exists() {
                    return skip(&format!("s3s-fs not found at {}", bin.display()));
                }
                Command::new(bin)
                    .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                    .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                    .arg(dir.path())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn s3s-fs")
            }
            Kind::Moto => {
                let bin = tools_home().join("s3-venv/bin/moto_server");
                if !bin.exists() {
                    return skip(&format!("moto_server not found at {}", bin.display()));
                }
                Command::new(bin)
                    .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn moto_server")
            }
        };
        let s = S3Server {
            child,
            port,
            kind,
            dir,
        };
        wait_for("the S3 server to listen", Duration::from_secs(30), || {
            TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        });
        s.create_bucket(bucket);
        Some(s)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket (s3s-fs: a directory of its root; moto: an unsigned PUT, which it
    /// accepts).
    pub fn create_bucket(&self, bucket: &str) {
        match self.kind {
            Kind::S3sFs => std::fs::create_dir_all(self.dir.path().join(bucket)).expect("bucket"),
            Kind::Moto => {
                let (code, body) = crate::http_request(
                    self.port,
                    &format!(
                        "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\
                         Connection: close\r\n\r\n"
                    ),
                );
                assert_eq!(code, 200, "moto create bucket: {body}");
            }
        }
    }

    /// Objects under `prefix` in `bucket` (s3s-fs only: read from its directory), with sizes.
    pub fn objects(&self, bucket: &str) -> Vec<(String, u64)> {
        assert_eq!(self.kind, Kind::S3sFs, "objects() reads s3s-fs's directory");
        let root = self.dir.path().join(bucket);
        let mut out = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Ok(rel) = p.strip_prefix(&root) {
                    let name = rel.to_string_lossy().into_owned();
                    // s3s-fs keeps its own metadata files beside the objects.
                    if name.ends_with(".kseg") {
                        let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                        out.push((name, len));
                    }
                }
            }
        }
        out.sort();
        out
    }

    /// The file of object `key` (s3s-fs only), to damage it in place.
    pub fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.dir.path().join(bucket).join(key)
    }

    /// Stops the server (as if S3 died).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port with the same data (s3s-fs only).
    pub fn restart(&mut self) {
        assert_eq!(self.kind, Kind::S3sFs, "restart() keeps s3s-fs's directory");
        self.stop();
        let bin = std::env::var_os("KVD_S3S_FS")
            .map(PathBuf::from)
            .unwrap_or_else(|| tools_home().join("tools/bin/s3s-fs"));
        self.child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn s3s-fs");
        let port = self.port;
        wait_for("the S3 server to listen", Duration::from_secs(30), || {
            TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        });
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the proxy does to each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Passes it on.
    Pass,
    /// Waits this long, then passes it on.
    Delay(Duration),
    /// Answers `503 SlowDown` without asking the server.
    Unavailable,
    /// Resets the connection (RST) without answering.
    Reset,
    /// Passes it on, then sends only half of a response body of more than 64 bytes and
    /// closes the connection.
    Truncate,
    /// Passes every other request on and answers `500 InternalError` to the others.
    Flaky,
}

/// A fault-injecting HTTP/1.1 proxy on a free 127.0.0.1 port.
pub struct FaultProxy {
    /// Its port (point kvd's endpoint here).
    pub port: u16,
    fault: Arc<Mutex<Fault>>,
    stop: Arc<AtomicBool>,
    /// Requests seen.
    pub requests: Arc<AtomicU64>,
}

impl FaultProxy {
    /// Starts a proxy to 127.0.0.1:`upstream`.
    pub fn start(upstream: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let fault = Arc::new(Mutex::new(Fault::Pass));
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let (f, s, r) = (fault.clone(), stop.clone(), requests.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((c, _)) => {
                        let (f, s, r) = (f.clone(), s.clone(), r.clone());
                        std::thread::spawn(move || {
                            let _ = serve(c, upstream, &f, &s, &r);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FaultProxy {
            port,
            fault,
            stop,
            requests,
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Sets what happens to the next requests.
    pub fn set(&self, f: Fault) {
        *self.fault.lock().expect("fault lock") = f;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One HTTP message head: its lines, and the length of the body that follows.
struct Head {
    raw: Vec<u8>,
    content_length: Option<usize>,
    chunked: bool,
}

fn read_head(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<Head>> {
    let mut raw = Vec::new();
    let (mut content_length, mut chunked) = (None, false);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        raw.extend_from_slice(line.as_bytes());
        let l = line.to_ascii_lowercase();
        if let Some(v) = l.strip_prefix("content-length:") {
            content_length = v.trim().parse().ok();
        }
        if l.starts_with("transfer-encoding:") && l.contains("chunked") {
            chunked = true;
        }
        if line == "\r\n" {
            return Ok(Some(Head {
                raw,
                content_length,
                chunked,
            }));
        }
    }
}

fn read_body(r: &mut BufReader<TcpStream>, h: &Head, has_body: bool) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    if !has_body {
        return Ok(body);
    }
    if h.chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            body.extend_from_slice(size.as_bytes());
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .unwrap_or(0);
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk);
            if n == 0 {
                return Ok(body);
            }
        }
    }
    body.resize(h.content_length.unwrap_or(0), 0);
    r.read_exact(&mut body)?;
    Ok(body)
}

fn serve(
    client: TcpStream,
    upstream: u16,
    fault: &Mutex<Fault>,
    stop: &AtomicBool,
    count: &AtomicU64,
) -> std::io::Result<()> {
    client.set_nonblocking(false)?;
    let mut cw = client.try_clone()?;
    let mut cr = BufReader::new(client);
    let mut up: Option<(TcpStream, BufReader<TcpStream>)> = None;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Some(req) = read_head(&mut cr)? else {
            return Ok(());
        };
        let body = read_body(&mut cr, &req, true)?;
        count.fetch_add(1, Ordering::Relaxed);
        n += 1;
        let head_req = req.raw.starts_with(b"HEAD ");
        let f = *fault.lock().expect("fault lock");
        match f {
            Fault::Unavailable => {
                unavailable(&mut cw)?;
                continue;
            }
            Fault::Flaky if n % 2 == 0 => {
                error_reply(&mut cw, "500 Internal Server Error", "InternalError")?;
                continue;
            }
            Fault::Reset => {
                // SO_LINGER 0: close sends RST.
                let s = cw.try_clone()?;
                let fd = std::os::fd::AsRawFd::as_raw_fd(&s);
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                // SAFETY: a valid socket fd and a correctly sized linger struct.
                unsafe {
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&linger as *const libc::linger).cast(),
                        std::mem::size_of::<libc::linger>() as libc::socklen_t,
                    );
                }
                let _ = s.shutdown(Shutdown::Both);
                return Ok(());
            }
            Fault::Delay(d) => std::thread::sleep(d),
            _ => {}
        }
        if up.is_none() {
            let s = TcpStream::connect(("127.0.0.1", upstream))?;
            let r = BufReader::new(s.try_clone()?);
            up = Some((s, r));
        }
        let Some((uw, ur)) = up.as_mut() else {
            return Ok(());
        };
        uw.write_all(&req.raw)?;
        uw.write_all(&body)?;
        let Some(resp) = read_head(ur)? else {
            return Ok(());
        };
        let status_no_body =
            resp.raw.starts_with(b"HTTP/1.1 204") || resp.raw.starts_with(b"HTTP/1.1 304");
        let rbody = read_body(ur, &resp, !head_req && !status_no_body)?;
        if f == Fault::Truncate && rbody.len() > 64 && !resp.chunked {
            cw.write_all(&resp.raw)?;
            cw.write_all(&rbody[..rbody.len() / 2])?;
            cw.flush()?;
            let _ = cw.shutdown(Shutdown::Both);
            return Ok(());
        }
        cw.write_all(&resp.raw)?;
        cw.write_all(&rbody)?;
        cw.flush()?;
    }
    Ok(())
}

fn unavailable(w: &mut TcpStream) -> std::io::Result<()> {
    error_reply(w, "503 Service Unavailable", "SlowDown")
}

fn error_reply(w: &mut TcpStream, status: &str, code: &str) -> std::io::Result<()> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
         <Message>injected by the test proxy</Message></Error>"
    );
    write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    w.flush()
}

/// `--set` values for an S3 tier on `endpoint`/`bucket` with the test servers' static keys;
/// small segments and short intervals so tests run in seconds.
pub fn s3_sets(endpoint: &str, bucket: &str) -> Vec<String> {
    vec![
        format!("s3.bucket={bucket}"),
        format!("s3.endpoint={endpoint}"),
        "s3.path_style=true".into(),
        format!("s3.access_key_id={ACCESS_KEY}"),
        format!("s3.secret_access_key={SECRET_KEY}"),
        "s3.segment_bytes=4MiB".into(),
        "s3.part_bytes=5MiB".into(),
        "s3.flush_interval_ms=200".into(),
        "s3.admission=always".into(),
        "s3.retry_base_ms=20".into(),
        "s3.retry_max_ms=200".into(),
        "s3.connect_timeout_ms=1000".into(),
        "s3.request_timeout_ms=5000".into(),
        "s3.breaker_open_ms=1000".into(),
        "s3.rescan_interval_ms=0".into(),
    ]
}
