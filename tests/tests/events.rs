//! The KV-event sockets against hostile peers: a frame header announcing an absurd length,
//! and a flood of idle connections, while a well-behaved replay requester keeps being
//! answered. (A frame header of 2^62 bytes used to abort the daemon.) Real subscribers
//! (pyzmq, vLLM's decoder) are tested in `python/tests/test_events.py`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use kvd_tests::{connect_from, Daemon};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn greeting() -> [u8; 64] {
    let mut g = [0u8; 64];
    g[0] = 0xff;
    g[9] = 0x7f;
    g[10] = 3;
    g[12..16].copy_from_slice(b"NULL");
    g
}

fn frame(flags: u8, body: &[u8]) -> Vec<u8> {
    let mut f = vec![flags, body.len() as u8];
    f.extend_from_slice(body);
    f
}

fn ready(socket_type: &str) -> Vec<u8> {
    let mut b = vec![5];
    b.extend_from_slice(b"READY");
    b.push(11);
    b.extend_from_slice(b"Socket-Type");
    b.extend_from_slice(&(socket_type.len() as u32).to_be_bytes());
    b.extend_from_slice(socket_type.as_bytes());
    frame(0x04, &b)
}

/// Reads one frame's flags and body (short or long).
fn read_frame(s: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 1];
    s.read_exact(&mut h)?;
    let len = if h[0] & 0x02 != 0 {
        let mut l = [0u8; 8];
        s.read_exact(&mut l)?;
        u64::from_be_bytes(l) as usize
    } else {
        let mut l = [0u8; 1];
        s.read_exact(&mut l)?;
        usize::from(l[0])
    };
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok((h[0], body))
}

/// Greets, says READY as `socket_type`, and reads the daemon's greeting and READY.
fn handshake(s: &mut (impl Read + Write), socket_type: &str) {
    s.write_all(&greeting()).expect("greeting");
    let mut g = [0u8; 64];
    s.read_exact(&mut g).expect("daemon's greeting");
    assert_eq!((g[0], g[10]), (0xff, 3), "a ZMTP 3 greeting");
    s.write_all(&ready(socket_type)).expect("ready");
    let (flags, body) = read_frame(s).expect("daemon's READY");
    assert_eq!(flags & 0x04, 0x04, "a command");
    assert_eq!(&body[..6], b"\x05READY");
}

/// Asks the replay socket for everything from sequence 0; the number of batches before the
/// end marker.
fn replay_all(port: u16) -> usize {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    handshake(&mut s, "DEALER");
    let mut req = frame(0x01, b"");
    req.extend(frame(0x00, &0u64.to_be_bytes()));
    s.write_all(&req).expect("request");
    let mut batches = 0;
    loop {
        let mut parts = Vec::new();
        loop {
            let (flags, body) = read_frame(&mut s).expect("answer");
            parts.push(body);
            if flags & 0x01 == 0 {
                break;
            }
        }
        assert_eq!(parts.len(), 4, "[\"\", topic, seq, payload]");
        if parts[2] == [0xff; 8] {
            return batches;
        }
        batches += 1;
    }
}

/// Sends a valid greeting and a frame header announcing 2^62 bytes; the daemon must close
/// the connection rather than allocate.
fn oversized_frame(s: &mut (impl Read + Write)) {
    s.write_all(&greeting()).expect("greeting");
    s.write_all(&[0x02, 0x40, 0, 0, 0, 0, 0, 0x01, 0x09])
        .expect("header");
    let mut sink = Vec::new();
    // The daemon's greeting and READY, then the end of the connection.
    let _ = s.read_to_end(&mut sink);
}

fn start(dir: &tempfile::TempDir) -> (Daemon, u16, std::path::PathBuf) {
    let port = free_port();
    let ipc = dir.path().join("events.ipc");
    let d = Daemon::start(&[
        &format!("events.endpoint=ipc://{}", ipc.display()),
        &format!("events.replay_endpoint=tcp://127.0.0.1:{port}"),
        "events.publish_interval_ms=5",
    ]);
    (d, port, ipc)
}

#[test]
fn an_oversized_frame_closes_that_connection_and_nothing_else() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (d, port, ipc) = start(&dir);
    let before = replay_all(port);
    let mut pub_conn = UnixStream::connect(&ipc).expect("connect PUB");
    pub_conn
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    oversized_frame(&mut pub_conn);
    let mut router_conn = TcpStream::connect(("127.0.0.1", port)).expect("connect ROUTER");
    router_conn
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    oversized_frame(&mut router_conn);
    // A frame over the limit after a proper handshake, as a subscriber.
    let mut sub = UnixStream::connect(&ipc).expect("connect SUB");
    handshake(&mut sub, "SUB");
    sub.write_all(&[0x02, 0, 0, 0, 0, 0, 1, 0, 0])
        .expect("64 KiB header");
    sub.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    assert_eq!(
        sub.read(&mut [0u8; 16]).expect("closed, not timed out"),
        0,
        "connection closed"
    );
    assert!(replay_all(port) >= before, "replay still answers");
    let c = d.admin();
    c.stats().expect("the daemon is alive");
    assert!(!d.log_contains("memory allocation"), "{}", d.log_text());
}

#[test]
fn idle_connections_from_one_address_do_not_lock_out_another() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (d, port, _) = start(&dir);
    // 100 connections from 127.0.0.2 that never say a word: at most a few are admitted,
    // the rest closed at once, and the admitted ones dropped at the handshake deadline.
    let idle: Vec<TcpStream> = (0..100)
        .filter_map(|_| connect_from([127, 0, 0, 2], port).ok())
        .collect();
    assert!(
        idle.len() >= 50,
        "the flood connected ({} of 100)",
        idle.len()
    );
    let t = Instant::now();
    let n = replay_all(port);
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "replay answered {n} batches after {took:?} with {} idle connections held",
        idle.len()
    );
    d.admin().stats().expect("alive");
}
