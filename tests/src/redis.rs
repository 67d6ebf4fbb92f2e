//! A private `redis-server` for tests (Debian's, on a free 127.0.0.1 port, no persistence),
//! shared by the cluster-index and peer-fetch tests.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::wait_for;

/// A private redis-server on a free loopback port, in a fresh working directory; killed on
/// drop.
pub struct Redis {
    child: Child,
    /// Its port.
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    /// Starts redis-server, or returns None (test skipped) where it is not installed.
    pub fn start(port: Option<u16>) -> Option<Redis> {
        Redis::start_with(port, &[])
    }

    /// Same, with extra server arguments.
    pub fn start_with(port: Option<u16>, extra: &[&str]) -> Option<Redis> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("SKIPPED: redis-server not installed (scripts/system-deps.sh installs it)");
            return None;
        }
        let port = port.unwrap_or_else(free_port);
        let dir = tempfile::tempdir().expect("redis dir");
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let r = Redis {
            child,
            port,
            _dir: dir,
        };
        wait_for("redis-server to answer", Duration::from_secs(10), || {
            (r.cli(&["PING"]).trim() == "PONG").then_some(())
        });
        Some(r)
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs redis-cli against it; stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "--raw"])
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
