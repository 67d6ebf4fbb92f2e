//! Test harness: starts the real `kvd` binary on a private socket and cleans up after it.
//!
//! Binaries are found next to the test executable's target directory (`target/<profile>/`),
//! or through `KVD_BIN_DIR`; `scripts/test.sh` builds them first with `cargo build --bins`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvd_client::{Client, Options};

pub mod engine;
pub mod pki;
pub mod redis;
pub mod s3;

/// Directory holding the workspace's binaries.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KVD_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test-binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_owned()
}

/// Path of a workspace binary, with a clear failure if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not found; build the binaries first: cargo build --workspace --bins",
        p.display()
    );
    p
}

/// A running daemon, killed on drop.
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// Its socket.
    pub socket: PathBuf,
    /// Its private directory.
    pub dir: tempfile::TempDir,
    /// Captured stderr lines (filled by a reader thread).
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Daemon {
    /// Starts `kvd` with a small arena and extra `--set` overrides; waits until it accepts.
    pub fn start(sets: &[&str]) -> Daemon {
        Daemon::start_with_env(sets, &[])
    }

    /// [`start`](Self::start) with extra environment variables for the daemon.
    pub fn start_with_env(sets: &[&str], env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("kvd.sock");
        let mut cmd = Command::new(bin("kvd"));
        cmd.arg("--socket")
            .arg(&socket)
            .args([
                "--set",
                "dram.arena_bytes=64MiB",
                "--set",
                "dram.max_block_bytes=4MiB",
            ])
            .args(["--set", "dram.max_namespaces=2", "--set", "ring.spin_us=50"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for s in sets {
            cmd.args(["--set", s]);
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd.spawn().expect("spawn kvd");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let l2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                l2.lock().expect("log lock").push(line);
            }
        });
        let d = Daemon {
            child,
            socket,
            dir,
            log,
        };
        d.wait_ready();
        d
    }

    fn wait_ready(&self) {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if self.socket.exists() && Client::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "kvd did not become ready: {:?}",
            self.log.lock().expect("log")
        );
    }

    /// An admin client.
    pub fn admin(&self) -> Client {
        Client::connect_with(
            &self.socket,
            Options {
                name: "test-admin".into(),
                admin: true,
                ..Options::default()
            },
        )
        .expect("admin connect")
    }

    /// Whether the log contains `needle`.
    pub fn log_contains(&self, needle: &str) -> bool {
        self.log
            .lock()
            .expect("log")
            .iter()
            .any(|l| l.contains(needle))
    }

    /// Waits (at most 10 s) for a log line containing `needle`; panics with the log if none
    /// comes. Lines reach the test through a pipe and a reader thread, so a line logged just
    /// before something the test observed may still be on its way.
    pub fn expect_log(&self, needle: &str) {
        let t = Instant::now();
        while !self.log_contains(needle) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "no log line contains {needle:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM and waits for exit (at most `timeout`); returns the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < timeout {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Daemon {
    /// Kills the daemon with SIGKILL (no cleanup at all) and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Runs `kvd-ctl --socket <this daemon> ARGS`, asserts it succeeded, returns its stdout.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new(bin("kvd-ctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run kvd-ctl");
        assert!(
            out.status.success(),
            "kvd-ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("kvd-ctl prints UTF-8")
    }

    /// The log lines so far, joined (for failure messages).
    pub fn log_text(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }
}

/// Polls `f` every 20 ms until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The key `kvd-test-client` gives block `i` of seed `seed` (tests that read what a client
/// process stored derive the same keys).
pub fn client_key(seed: u64, i: u64) -> kvd_client::BlockKey {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&seed.to_le_bytes());
    k[8..16].copy_from_slice(&i.to_le_bytes());
    kvd_client::BlockKey(k)
}

/// Deterministic, block-distinct content: what the test client writes for `(seed, index)`.
pub fn pattern(seed: u64, index: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(index.wrapping_mul(0xD1B5_4A32_D192_ED03))
        | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A raw connection (no kvd-client) named `name` with its ring and the handle of namespace
/// `model`: for sending what no well-behaved client sends, or not reaping what it should.
pub fn raw_client(
    d: &Daemon,
    name: &str,
    model: &str,
) -> (kvd_client::Control, kvd_shm::ClientRing, u32) {
    use kvd_proto::{Request, Response};
    let mut ctl = kvd_client::Control::connect(&d.socket).expect("connect");
    let hello = Request::Hello {
        protocol_version: kvd_proto::PROTOCOL_VERSION,
        client_name: name.into(),
        admin: false,
    };
    let (resp, fd) = ctl.call(&hello).expect("hello");
    let Response::Welcome { ring_bytes, .. } = resp else {
        panic!("{resp:?}")
    };
    let ring =
        kvd_shm::ClientRing::from_fd(&fd.expect("ring fd"), ring_bytes as usize).expect("map");
    let (resp, _) = ctl
        .call(&Request::OpenNamespace(test_namespace(model)))
        .expect("open");
    let Response::NamespaceOpened { handle, .. } = resp else {
        panic!("{resp:?}")
    };
    (ctl, ring, handle)
}

/// Sends `request` raw over TCP to 127.0.0.1:`port` (as Prometheus or a kubelet probe
/// would); returns (status code, body).
pub fn http_request(port: u16, request: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(request.as_bytes()).expect("send");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

/// `GET path` with [`http_request`].
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    http_request(
        port,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
}

/// The namespace every test client uses unless told otherwise.
pub fn test_namespace(model: &str) -> kvd_client::NamespaceDesc {
    kvd_client::NamespaceDesc::new(model, "bfloat16", "LBHNC", 32)
}

/// `--set` values for a disk tier in `path`: `capacity` of 16 MiB regions, every block
/// admitted, demotion starting above `demote_watermark` of DRAM (1.0: only on drain).
pub fn disk_sets(path: &Path, capacity: &str, demote_watermark: &str) -> Vec<String> {
    vec![
        format!("disk.path={}", path.display()),
        format!("disk.capacity_bytes={capacity}"),
        "disk.region_bytes=16MiB".into(),
        "disk.admission=always".into(),
        format!("disk.demote_watermark={demote_watermark}"),
    ]
}

/// [`Daemon::start`] with owned `--set` values.
pub fn start_with(sets: &[String]) -> Daemon {
    let refs: Vec<&str> = sets.iter().map(String::as_str).collect();
    Daemon::start(&refs)
}

/// A TCP connection to 127.0.0.1:`port` from the source address `src` (any of 127/8).
pub fn connect_from(src: [u8; 4], port: u16) -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::FromRawFd;
    let sockaddr = |ip: [u8; 4], port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket call; the descriptor is owned by the TcpStream made below or
    // closed on error.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket we own and no one else uses; it becomes the TcpStream's.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let (from, to) = (sockaddr(src, 0), sockaddr([127, 0, 0, 1], port));
    // SAFETY: `from` is a valid sockaddr_in of `len` bytes living across the call.
    if unsafe { libc::bind(fd, (&raw const from).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `to` is a valid sockaddr_in of `len` bytes living across the call.
    if unsafe { libc::connect(fd, (&raw const to).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

/// `n` connections to 127.0.0.1:`port` from 127.0.0.2 that never send a byte (a flood of
/// idle connections from another address).
pub fn idle_flood(port: u16, n: usize) -> Vec<std::net::TcpStream> {
    (0..n)
        .filter_map(|_| connect_from([127, 0, 0, 2], port).ok())
        .collect()
}
