//! Hostile and broken clients: garbage frames, protocol misuse and ring corruption get typed
//! errors or a disconnect, and never disturb the daemon or other clients.

use std::time::Duration;

use kvd_client::{BlockKey, Control};
use kvd_proto::frame::{ErrorCode, Request, Response};
use kvd_proto::ring::{Op, Status, Submission};
use kvd_proto::PROTOCOL_VERSION;
use kvd_shm::{ClientRing, RingError};
use kvd_tests::{test_namespace, Daemon};

/// A raw connection with its ring, for sending what no well-behaved client sends.
fn raw(d: &Daemon) -> (Control, ClientRing, u32) {
    kvd_tests::raw_client(d, "raw", "raw")
}

fn submit(ring: &mut ClientRing, s: Submission) -> Result<kvd_proto::ring::Completion, RingError> {
    assert!(ring.push(&s).expect("push"));
    ring.notify();
    ring.wait(Duration::from_micros(100), Duration::from_secs(10))
}

fn still_serves(d: &Daemon) {
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("healthy")).expect("open");
    c.put(&ns, &BlockKey([3; 32]), b"still here").expect("put");
    assert_eq!(
        &c.get(&ns, &BlockKey([3; 32])).expect("get").expect("hit")[..],
        b"still here"
    );
}

#[test]
fn garbage_frames_get_an_error_and_a_disconnect() {
    let d = Daemon::start(&[]);
    let bystander = d.admin();
    let cases: Vec<Vec<u8>> = vec![
        vec![0xFF; 64],                                                // absurd length prefix
        [5u32.to_le_bytes().to_vec(), vec![200, 0, 0, 0, 0]].concat(), // unknown kind
        [2u32.to_le_bytes().to_vec(), vec![1, 2]].concat(),            // shorter than a header
        [(2u32 << 20).to_le_bytes().to_vec()].concat(), // over server.max_frame_bytes
    ];
    for bytes in cases {
        let mut ctl = Control::connect(&d.socket).expect("connect");
        ctl.send_raw(&bytes).expect("send");
        match ctl.recv_response() {
            Ok(Response::Error { code, .. }) => assert_eq!(code, ErrorCode::BadRequest),
            other => panic!("{bytes:?}: {other:?}"),
        }
        assert!(
            ctl.recv_response().is_err(),
            "connection closed after garbage"
        );
    }
    // The first request must be Hello; a wrong protocol version is refused by name.
    let mut ctl = Control::connect(&d.socket).expect("connect");
    let e = ctl.call(&Request::Stats).unwrap_err().to_string();
    assert!(e.contains("Hello"), "{e}");
    let mut ctl = Control::connect(&d.socket).expect("connect");
    let e = ctl
        .call(&Request::Hello {
            protocol_version: PROTOCOL_VERSION + 1,
            client_name: "future".into(),
            admin: false,
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("protocol"), "{e}");
    bystander.stats().expect("bystander unaffected");
    still_serves(&d);
}

#[test]
fn ring_corruption_drops_only_that_client() {
    let d = Daemon::start(&["dram.max_namespaces=3"]);
    let good = d.admin();
    let gns = good.open_namespace(&test_namespace("good")).expect("open");
    good.put(&gns, &BlockKey([1; 32]), b"good data")
        .expect("put");

    // A token that was never issued: protocol violation, connection dropped.
    let (mut ctl, mut ring, h) = raw(&d);
    let mut s = Submission::new(Op::Commit, h, 1);
    s.arg0 = 999_999;
    s.arg1 = 10;
    assert!(matches!(submit(&mut ring, s), Err(RingError::Closed)));
    // The control socket follows the ring shortly after.
    let t = std::time::Instant::now();
    while ctl.call(&Request::Stats).is_ok() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "control socket still open"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // A submission tail far ahead of the head: corrupt ring, dropped.
    let (_ctl, mut ring, h) = raw(&d);
    for i in 0..3 {
        ring.push(&Submission::new(Op::Nop, h, i)).expect("push");
    }
    // Release tokens of leases we never had are protocol violations too.
    let mut s = Submission::new(Op::Release, h, 7);
    s.arg0 = u64::MAX;
    ring.push(&s).expect("push");
    ring.notify();
    let mut closed = false;
    for _ in 0..5 {
        if let Err(RingError::Closed) = ring.wait(Duration::ZERO, Duration::from_secs(10)) {
            closed = true;
            break;
        }
    }
    assert!(closed);
    d.expect_log("dropping client");

    // The good client never noticed.
    assert_eq!(
        &good
            .get(&gns, &BlockKey([1; 32]))
            .expect("get")
            .expect("hit")[..],
        b"good data"
    );
    still_serves(&d);
}

#[test]
fn typed_statuses_for_bad_but_well_formed_descriptors() {
    let d = Daemon::start(&[]);
    let (_ctl, mut ring, h) = raw(&d);
    // A namespace handle this connection never opened.
    let mut s = Submission::new(Op::Get, h + 5, 1);
    s.key = BlockKey([1; 32]);
    assert_eq!(
        submit(&mut ring, s).expect("cpl").status,
        Status::BadNamespace as u16
    );
    // Too large.
    let mut s = Submission::new(Op::Reserve, h, 2);
    s.arg0 = 1 << 40;
    assert_eq!(
        submit(&mut ring, s).expect("cpl").status,
        Status::TooLarge as u16
    );
    // Reserve, then commit with a bad length, then a valid commit, then a stale re-commit.
    let mut s = Submission::new(Op::Reserve, h, 3);
    s.key = BlockKey([2; 32]);
    s.arg0 = 4096;
    let c = submit(&mut ring, s).expect("cpl");
    assert_eq!(c.status, Status::Ok as u16);
    let mut commit = Submission::new(Op::Commit, h, 4);
    commit.arg0 = c.token;
    commit.arg1 = 1 << 20;
    assert_eq!(
        submit(&mut ring, commit).expect("cpl").status,
        Status::BadLength as u16
    );
    commit.arg1 = 4096;
    assert_eq!(
        submit(&mut ring, commit).expect("cpl").status,
        Status::Ok as u16
    );
    assert_eq!(
        submit(&mut ring, commit).expect("cpl").status,
        Status::Stale as u16
    );
    // The block exists now: a second reserve says so.
    assert_eq!(
        submit(&mut ring, s).expect("cpl").status,
        Status::Exists as u16
    );
    still_serves(&d);
}

#[test]
fn read_leases_time_out() {
    let d = Daemon::start(&["ring.lease_timeout_ms=200"]);
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("lease")).expect("open");
    c.put(&ns, &BlockKey([4; 32]), &[1u8; 4096]).expect("put");
    let lease = c.get(&ns, &BlockKey([4; 32])).expect("get").expect("hit");
    let t = std::time::Instant::now();
    loop {
        let s = c.stats().expect("stats");
        if s.namespaces[0].leases == 0 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "lease never expired");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(lease); // Its release is stale now and answered as such, not as a violation.
    c.nop().expect("connection still fine");
    assert!(d.log_contains("timed out"));
}

/// Connections that never say Hello neither count against `server.max_clients` nor stay
/// open past `server.handshake_timeout_ms`; real clients keep connecting meanwhile.
#[test]
fn silent_connections_do_not_take_client_slots() {
    let d = Daemon::start(&["server.max_clients=4", "server.handshake_timeout_ms=500"]);
    let silent: Vec<std::os::unix::net::UnixStream> = (0..40)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(&d.socket).ok())
        .collect();
    assert!(silent.len() >= 30, "{} connected", silent.len());
    for _ in 0..3 {
        still_serves(&d);
    }
    std::thread::sleep(Duration::from_millis(1500));
    for mut s in silent {
        use std::io::Read;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        assert_eq!(s.read(&mut [0u8; 8]).expect("closed by kvd"), 0);
    }
    still_serves(&d);
}

/// kvd deletes nothing at its socket path but a dead daemon's socket.
#[test]
fn a_file_at_the_socket_path_is_not_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kvd.sock");
    std::fs::write(&path, b"not kvd's").expect("write");
    let out = std::process::Command::new(kvd_tests::bin("kvd"))
        .arg("--socket")
        .arg(&path)
        .output()
        .expect("run kvd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.replace_socket"), "{err}");
    assert_eq!(std::fs::read(&path).expect("still there"), b"not kvd's");
}
