//! Peer fetch end to end: two real daemons on one machine (own sockets, data dirs and data
//! ports on 127.0.0.1) sharing a real `redis-server` as the cluster index, speaking mutual
//! TLS with certificates made for the test. A block put on node A is read through node B
//! byte for byte (from A's DRAM and from A's disk); a client without a certificate, with
//! another CA's, an expired one, and a node answering under another node's name get and give
//! nothing; renewed certificate files are used without a restart; a peer sending wrong
//! bytes is never believed; garbage on the data port is refused; a flood of idle connections
//! does not starve real fetches; lookups keep answering locally while Redis or the peer is
//! gone.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvd_client::{BlockKey, Client, Namespace};
use kvd_proto::peer as wire;
use kvd_tests::pki::{Ca, NodeFiles, Validity};
use kvd_tests::redis::{free_port, Redis};
use kvd_tests::{pattern, start_with as start, test_namespace, wait_for, Daemon};

fn key(i: u64) -> BlockKey {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&i.to_le_bytes());
    k[31] = 0x9E;
    BlockKey(k)
}

fn len_of(i: u64) -> usize {
    20_000 + (i as usize % 5) * 7_777
}

/// A node's settings: `tls` is its certificate's files, or `None` for `peer.tls = "off"`.
fn sets(redis: &Redis, node: &str, disk: &Path, port: u16, tls: Option<&NodeFiles>) -> Vec<String> {
    let tls = tls.map_or_else(|| vec!["peer.tls=off".to_string()], NodeFiles::sets);
    vec![
        format!("index.redis_urls={}", redis.url()),
        format!("index.node_id={node}"),
        "index.lease_ttl_ms=2000".into(),
        "index.timeout_ms=500".into(),
        format!("peer.listen=127.0.0.1:{port}"),
        "peer.timeout_ms=2000".into(),
    ]
    .into_iter()
    .chain(kvd_tests::disk_sets(disk, "64MiB", "1.0"))
    .chain(tls)
    .collect()
}

fn keys(r: std::ops::Range<u64>) -> Vec<BlockKey> {
    r.map(key).collect()
}

/// Waits until the cluster index (as seen from `c`) says `n` leading blocks are held.
fn published(c: &Client, ns: &Namespace, n: u64) {
    wait_for(
        &format!("{n} blocks in the cluster index"),
        Duration::from_secs(10),
        || {
            let r = c.cluster_lookup(&ns.id, &keys(0..n)).ok()?;
            (r.cluster && r.prefix_len as u64 == n).then_some(())
        },
    );
}

#[test]
fn a_block_put_on_node_a_is_read_through_node_b_byte_for_byte() {
    let Some(mut redis) = Redis::start(None) else {
        return;
    };
    let (da, db) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let (pki, ca) = (
        tempfile::tempdir().expect("pki"),
        Ca::new("kvd test cluster"),
    );
    let (ta, tb) = (
        ca.node(pki.path(), "a", "node-a", Validity::Current),
        ca.node(pki.path(), "b", "node-b", Validity::Current),
    );
    let a_port = free_port();
    let mut a = start(&sets(&redis, "node-a", da.path(), a_port, Some(&ta)));
    let b = start(&sets(&redis, "node-b", db.path(), free_port(), Some(&tb)));
    let (ca, cb) = (a.admin(), b.admin());
    let nsa = ca.open_namespace(&test_namespace("peer")).expect("ns a");
    let nsb = cb.open_namespace(&test_namespace("peer")).expect("ns b");
    for i in 0..8 {
        ca.put(&nsa, &key(i), &pattern(3, i, len_of(i)))
            .expect("put");
    }
    // Blocks 6 and 7 leave A's DRAM: A serves them from its disk.
    a.ctl(&["drain"]);
    let evicted = ca.evict(Some(nsa.id), &keys(6..8)).expect("evict");
    assert_eq!(evicted, 2);
    published(&cb, &nsb, 8);

    // 100 idle connections to A's data port from another address: closed at A's caps and
    // handshake deadline, they do not starve B's fetches (70 used to).
    let flood = kvd_tests::idle_flood(a_port, 100);
    assert!(flood.len() >= 50, "{} connected", flood.len());

    // B's lookup misses locally, fetches all 8 from A, and answers 8 held locally.
    let t = Instant::now();
    let l = cb.lookup(&nsb.id, &keys(0..8)).expect("lookup");
    assert_eq!(l.prefix_len, 8, "{l:?}");
    eprintln!("8 blocks fetched through the lookup in {:?}", t.elapsed());
    for i in 0..8 {
        let lease = cb.get(&nsb, &key(i)).expect("get").expect("held on b");
        assert_eq!(&lease[..], &pattern(3, i, len_of(i))[..], "block {i}");
    }
    let pb = cb.stats().expect("stats b").peer.expect("peer report b");
    assert_eq!((pb.fetched_blocks, pb.fetch_failures), (8, 0), "{pb:?}");
    let pa = served(&ca, 8);
    assert_eq!(pa.served_blocks, 8, "{pa:?}");
    let wanted: u64 = (0..8).map(|i| len_of(i) as u64).sum();
    assert_eq!(pb.fetched_bytes, wanted);
    drop(flood);
    assert!(b.ctl(&["status"]).contains("fetched 8 blocks"));

    // A chain with a hole: fetched up to the hole, no further.
    ca.put(&nsa, &key(8), &pattern(3, 8, 5000)).expect("put");
    ca.put(&nsa, &key(10), &pattern(3, 10, 5000)).expect("put");
    published(&cb, &nsb, 9);
    assert_eq!(
        cb.lookup(&nsb.id, &keys(0..11)).expect("lookup").prefix_len,
        9
    );

    // Redis killed mid-run: lookups answer locally at once, and fetch again once it is back.
    let port = redis.port;
    ca.put(&nsa, &key(9), &pattern(3, 9, 5000)).expect("put");
    ca.put(&nsa, &key(11), &pattern(3, 11, 5000)).expect("put");
    published(&cb, &nsb, 12);
    drop(redis);
    let t = Instant::now();
    let l = cb
        .lookup(&nsb.id, &keys(0..12))
        .expect("lookup while redis is down");
    assert_eq!(l.prefix_len, 9);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let r = cb.cluster_lookup(&nsb.id, &keys(0..12)).expect("where");
    assert!(!r.cluster, "{r:?}");
    redis = Redis::start(Some(port)).expect("redis again");
    b.expect_log("cluster index reachable again");
    wait_for(
        "a fetch after redis came back",
        Duration::from_secs(15),
        || {
            let l = cb.lookup(&nsb.id, &keys(0..12)).ok()?;
            (l.prefix_len == 12).then_some(())
        },
    );
    ca.put(&nsa, &key(12), &pattern(3, 12, 5000)).expect("put");
    published(&cb, &nsb, 13);

    // Node A killed: its lease still names it for up to 2 s, but its port refuses; the
    // lookup answers what B holds, promptly, and counts the failure.
    a.kill9();
    let t = Instant::now();
    let l = cb.lookup(&nsb.id, &keys(0..13)).expect("lookup");
    assert_eq!(l.prefix_len, 12);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let pb = cb.stats().expect("stats").peer.expect("peer");
    assert!(
        pb.fetch_failures >= 1 && !pb.last_error.is_empty(),
        "{pb:?}"
    );
    drop(redis);
}

/// The serving node's peer report once it has counted `n` blocks served: it counts a block
/// when its last bytes are written, which can be just after the reader has them.
fn served(c: &Client, n: u64) -> kvd_proto::frame::PeerReport {
    wait_for("the served blocks counted", Duration::from_secs(5), || {
        let p = c.stats().expect("stats").peer.expect("peer report");
        (p.served_blocks >= n).then_some(p)
    })
}

/// Sends raw bytes to a data port; returns what came back before the peer closed (or
/// stopped talking for 2 s).
fn exchange(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    s.write_all(bytes).expect("send");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

#[test]
fn garbage_and_oversized_requests_are_refused_and_another_namespace_gets_nothing() {
    let port = free_port();
    let listen = format!("peer.listen=127.0.0.1:{port}");
    let d = Daemon::start(&[&listen, "peer.tls=off"]);
    d.expect_log("peer.tls = \"off\": the data port serves");
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("peer-bad")).expect("ns");
    let other = c
        .open_namespace(&test_namespace("peer-other"))
        .expect("other ns");
    c.put(&ns, &key(1), &pattern(9, 1, 12_345)).expect("put");

    // Not a kvd peer at all.
    assert!(exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").is_empty());
    d.expect_log("bad greeting");
    // An oversized frame: refused before its body is read.
    let mut big = wire::PEER_MAGIC.to_vec();
    big.extend_from_slice(&(64u32 << 20).to_be_bytes());
    big.extend_from_slice(&[0u8; 1024]);
    assert!(exchange(port, &big).is_empty());
    d.expect_log("longer than 256");
    // An unknown request.
    let mut unknown = wire::PEER_MAGIC.to_vec();
    unknown.extend_from_slice(&3u32.to_be_bytes());
    unknown.extend_from_slice(&[42, 0, 0]);
    assert!(exchange(port, &unknown).is_empty());
    d.expect_log("unknown request tag 42");

    // The same key asked for under another namespace: Missing, no bytes. Then under its
    // own: the block, with its checksum.
    let mut both = wire::PEER_MAGIC.to_vec();
    both.extend_from_slice(&wire::encode_fetch(&other.id, &key(1)));
    both.extend_from_slice(&wire::encode_fetch(&ns.id, &key(1)));
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(&both).expect("send");
    let mut h = [0u8; wire::REPLY_HEADER];
    s.read_exact(&mut h).expect("first reply");
    assert_eq!(wire::decode_reply(&h), (Some(wire::Status::Missing), 0, 0));
    s.read_exact(&mut h).expect("second reply");
    let (status, len, _checksum) = wire::decode_reply(&h);
    assert_eq!((status, len), (Some(wire::Status::Found), 12_345));
    let mut body = vec![0u8; 12_345];
    s.read_exact(&mut body).expect("block");
    assert_eq!(body, pattern(9, 1, 12_345));
    drop(s);

    let p = served(&c, 1);
    assert_eq!((p.bad_requests, p.served_blocks), (3, 1), "{p:?}");
    assert_eq!(
        d.log_text().matches("bad request; disconnecting").count(),
        3
    );
    // The daemon serves its own clients throughout.
    assert!(c.get(&ns, &key(1)).expect("get").is_some());
}

/// A fake peer registered in the index that answers every fetch with bytes that do not
/// match the checksum it announces: the block must never enter the cache.
#[test]
fn a_peer_sending_wrong_bytes_is_never_believed() {
    let Some(redis) = Redis::start(None) else {
        return;
    };
    let db = tempfile::tempdir().expect("b");
    let b = start(&sets(&redis, "node-b", db.path(), free_port(), None));
    let cb = b.admin();
    let ns = cb.open_namespace(&test_namespace("liar")).expect("ns");
    let liar = std::net::TcpListener::bind("127.0.0.1:0").expect("bind liar");
    let liar_addr = liar.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        for s in liar.incoming().take(4) {
            let Ok(mut s) = s else { continue };
            let mut req = [0u8; 8 + wire::FETCH_FRAME];
            if s.read_exact(&mut req).is_ok() {
                let _ = s.write_all(&wire::encode_reply(wire::Status::Found, 4096, 12345));
                let _ = s.write_all(&[0xAB; 4096]);
            }
        }
    });
    // Register "liar" as a live node holding block 0 in DRAM.
    let epoch = "7";
    redis.cli(&["ZADD", "kvd:nodes", &format!("{}", u64::MAX / 2), "liar"]);
    redis.cli(&["HSET", "kvd:node:liar", "epoch", epoch, "peer", &liar_addr]);
    redis.cli(&["PEXPIRE", "kvd:node:liar", "60000"]);
    let h = format!("kvd:res:liar:{epoch}:{}", ns.id.to_hex());
    redis.cli(&["HSET", &h, &format!("{}|dram", key(0).to_hex()), "1"]);

    let l = cb.lookup(&ns.id, &keys(0..1)).expect("lookup");
    assert_eq!(l.prefix_len, 0);
    assert!(cb.get(&ns, &key(0)).expect("get").is_none());
    let p = cb.stats().expect("stats").peer.expect("peer");
    assert_eq!((p.checksum_failures, p.fetched_blocks), (1, 0), "{p:?}");
    b.expect_log("failed its checksum");
}

/// A peer that asks for a block and stops reading holds its read lease (and a connection)
/// only until peer.timeout_ms: then the daemon drops it and the block is evictable again.
#[test]
fn a_peer_that_stops_reading_loses_its_lease_after_the_timeout() {
    let port = free_port();
    let listen = format!("peer.listen=127.0.0.1:{port}");
    let d = Daemon::start(&[
        &listen,
        "peer.tls=off",
        "peer.timeout_ms=500",
        "dram.max_block_bytes=32MiB",
        "dram.arena_bytes=256MiB",
    ]);
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("peer-slow")).expect("ns");
    // Larger than what the socket buffers on both sides can absorb.
    let big = pattern(5, 1, 30 << 20);
    c.put(&ns, &key(1), &big).expect("put");
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut req = wire::PEER_MAGIC.to_vec();
    req.extend_from_slice(&wire::encode_fetch(&ns.id, &key(1)));
    s.write_all(&req).expect("send");
    let readers = || -> u32 {
        c.inspect(&key(1))
            .expect("inspect")
            .iter()
            .map(|b| b.readers)
            .sum()
    };
    wait_for(
        "the stalled send to hold the block",
        Duration::from_secs(5),
        || (readers() == 1).then_some(()),
    );
    wait_for("the lease to be dropped", Duration::from_secs(10), || {
        (readers() == 0).then_some(())
    });
    assert_eq!(c.evict(Some(ns.id), &[key(1)]).expect("evict"), 1);
    drop(s);
}

/// A client of the data port speaking TLS with rustls: asks `port` (expected to be node
/// `server`, under `ca`) for `key` of `ns`, presenting `cert` or no certificate. The block's
/// bytes, or why not.
fn tls_fetch(
    port: u16,
    ca: &Path,
    cert: Option<&NodeFiles>,
    server: &str,
    ns: &kvd_client::NamespaceId,
    key: &BlockKey,
) -> Result<Vec<u8>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let pem = |p: &Path| -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(p)
            .expect("pem")
            .map(|c| c.expect("certificate"))
            .collect()
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in pem(ca) {
        roots.add(c).expect("CA");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots);
    let mut cfg = match cert {
        Some(f) => b
            .with_client_auth_cert(
                pem(&f.cert),
                PrivateKeyDer::from_pem_file(&f.key).expect("key"),
            )
            .expect("client certificate"),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"kvd-peer/1".to_vec()];
    let name = ServerName::try_from(server.to_owned()).expect("name");
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let mut req = wire::PEER_MAGIC.to_vec();
    req.extend_from_slice(&wire::encode_fetch(ns, key));
    s.write_all(&req).map_err(|e| e.to_string())?;
    s.flush().map_err(|e| e.to_string())?;
    let mut h = [0u8; wire::REPLY_HEADER];
    s.read_exact(&mut h).map_err(|e| e.to_string())?;
    let (status, len, _) = wire::decode_reply(&h);
    if status != Some(wire::Status::Found) {
        return Err(format!("{status:?}"));
    }
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok(body)
}

/// Node A alone (no index), serving its data port with mutual TLS under `ca`, its files in
/// `pki`, with `extra` settings: its files, its data port and the daemon.
fn certified_node_a(ca: &Ca, pki: &Path, extra: &[&str]) -> (NodeFiles, u16, Daemon) {
    let files = ca.node(pki, "a", "node-a", Validity::Current);
    let port = free_port();
    let mut sets = vec![
        format!("peer.listen=127.0.0.1:{port}"),
        "index.node_id=node-a".to_string(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    sets.extend(files.sets());
    (files, port, start(&sets))
}

/// Writes `from`'s files over `to`'s paths the way a Secret update does: each file renamed
/// into place whole.
fn replace_files(from: &NodeFiles, to: &NodeFiles) {
    for (f, t) in [
        (&from.key, &to.key),
        (&from.ca, &to.ca),
        (&from.cert, &to.cert),
    ] {
        let tmp = t.with_extension("new");
        std::fs::copy(f, &tmp).expect("copy");
        std::fs::rename(&tmp, t).expect("rename");
    }
}

/// The data port with mutual TLS serves a node of the cluster's CA and nobody else: not a
/// plaintext client, not one without a certificate, with another CA's or with an expired
/// one. Renewed files (another CA, here) are used by new connections without a restart.
#[test]
fn mutual_tls_serves_only_certified_nodes_and_picks_up_renewed_files() {
    let pki = tempfile::tempdir().expect("pki");
    let (ca, stranger_ca) = (Ca::new("kvd test cluster"), Ca::new("somebody else"));
    let (ta, port, d) = certified_node_a(&ca, pki.path(), &[]);
    let good = ca.node(pki.path(), "b", "node-b", Validity::Current);
    let foreign = stranger_ca.node(pki.path(), "f", "node-b", Validity::Current);
    let expired = ca.node(pki.path(), "x", "node-b", Validity::Expired);
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("peer-tls")).expect("ns");
    c.put(&ns, &key(1), &pattern(4, 1, 30_000)).expect("put");

    let fetch = |cert: Option<&NodeFiles>, trust: &Path| {
        tls_fetch(port, trust, cert, "node-a", &ns.id, &key(1))
    };
    assert_eq!(
        fetch(Some(&good), &ta.ca).expect("a node of the cluster"),
        pattern(4, 1, 30_000)
    );
    for (who, cert) in [
        ("no certificate", None),
        ("another CA's certificate", Some(&foreign)),
        ("an expired certificate", Some(&expired)),
    ] {
        let r = fetch(cert, &ta.ca);
        assert!(r.is_err(), "{who} was served");
    }
    let mut plain = wire::PEER_MAGIC.to_vec();
    plain.extend_from_slice(&wire::encode_fetch(&ns.id, &key(1)));
    // At most a TLS alert record (content type 21) comes back, never a reply.
    let back = exchange(port, &plain);
    assert!(
        back.is_empty() || (back[0] == 21 && back.len() < 64),
        "plaintext was served: {back:?}"
    );
    let p = c.stats().expect("stats").peer.expect("peer");
    assert_eq!(p.served_blocks, 1, "{p:?}");
    assert!(p.bad_requests >= 4, "{p:?}");
    d.expect_log("TLS handshake refused");

    // The Secret is renewed under a new CA: new connections use the new files.
    let (pki2, ca2) = (
        tempfile::tempdir().expect("pki2"),
        Ca::new("renewed cluster"),
    );
    let renewed = ca2.node(pki2.path(), "a", "node-a", Validity::Current);
    let good2 = ca2.node(pki2.path(), "b", "node-b", Validity::Current);
    replace_files(&renewed, &ta);
    wait_for(
        "the renewed certificate in use",
        Duration::from_secs(10),
        || fetch(Some(&good2), &good2.ca).ok(),
    );
    d.expect_log("peer TLS files changed");
    assert!(
        fetch(Some(&good), &good.ca).is_err(),
        "the old CA still accepted"
    );
}

/// 200 connections from another address that never say a word (70 used to starve real
/// fetches) leave a certified node's fetch and the daemon's own clients unhurt: those over
/// `peer.max_connections_per_peer` are closed at once, the admitted ones at the handshake
/// deadline (5 s).
#[test]
fn an_idle_flood_on_the_data_port_does_not_starve_real_fetches() {
    let pki = tempfile::tempdir().expect("pki");
    let ca = Ca::new("kvd test cluster");
    let (ta, port, d) = certified_node_a(&ca, pki.path(), &["peer.max_connections_per_peer=8"]);
    let tb = ca.node(pki.path(), "b", "node-b", Validity::Current);
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("peer-flood")).expect("ns");
    c.put(&ns, &key(1), &pattern(6, 1, 40_000)).expect("put");

    let flood = kvd_tests::idle_flood(port, 200);
    assert!(flood.len() >= 100, "{} connected", flood.len());
    let t = Instant::now();
    let got = tls_fetch(port, &ta.ca, Some(&tb), "node-a", &ns.id, &key(1));
    let took = t.elapsed();
    assert_eq!(got.expect("fetch through the flood"), pattern(6, 1, 40_000));
    assert!(took < Duration::from_secs(3), "the fetch took {took:?}");
    assert!(c.get(&ns, &key(1)).expect("get").is_some());

    // Every flood connection ends: over the cap at once, the rest at the deadline.
    let open = |v: &[TcpStream]| {
        v.iter()
            .filter(|s| {
                s.set_nonblocking(true).expect("nonblocking");
                let r = (&**s).read(&mut [0u8; 64]);
                matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
            })
            .count()
    };
    let held = open(&flood);
    assert!(held <= 8, "{held} of the flood held");
    wait_for(
        "the flood dropped at the handshake deadline",
        Duration::from_secs(10),
        || (open(&flood) == 0).then_some(()),
    );
    assert_eq!(
        tls_fetch(port, &ta.ca, Some(&tb), "node-a", &ns.id, &key(1)).expect("fetch after"),
        pattern(6, 1, 40_000)
    );
}

/// Registers a fake node `name` at `addr` in the cluster index, holding `k` of `ns` in DRAM.
fn register_fake_node(redis: &Redis, name: &str, addr: &str, ns: &Namespace, k: &BlockKey) {
    let epoch = "7";
    redis.cli(&["ZADD", "kvd:nodes", &format!("{}", u64::MAX / 2), name]);
    let node = format!("kvd:node:{name}");
    redis.cli(&["HSET", &node, "epoch", epoch, "peer", addr]);
    redis.cli(&["PEXPIRE", &node, "60000"]);
    let h = format!("kvd:res:{name}:{epoch}:{}", ns.id.to_hex());
    redis.cli(&["HSET", &h, &format!("{}|dram", k.to_hex()), "1"]);
}

/// With mutual TLS, a node takes blocks only from the node the cluster index names at that
/// address: a real node's address registered under another name, and a node whose
/// certificate is another CA's, are refused before anything is asked of them.
#[test]
fn a_fetch_believes_only_the_node_the_index_names() {
    let Some(redis) = Redis::start(None) else {
        return;
    };
    let pki = tempfile::tempdir().expect("pki");
    let (ca, stranger_ca) = (Ca::new("kvd test cluster"), Ca::new("somebody else"));
    let (da, db, dc) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
        tempfile::tempdir().expect("c"),
    );
    let ta = ca.node(pki.path(), "a", "node-a", Validity::Current);
    let tb = ca.node(pki.path(), "b", "node-b", Validity::Current);
    let tc = stranger_ca.node(pki.path(), "c", "node-c", Validity::Current);
    let a_port = free_port();
    let a = start(&sets(&redis, "node-a", da.path(), a_port, Some(&ta)));
    let b = start(&sets(&redis, "node-b", db.path(), free_port(), Some(&tb)));
    let c = start(&sets(&redis, "node-c", dc.path(), free_port(), Some(&tc)));
    let (ca_, cb, cc) = (a.admin(), b.admin(), c.admin());
    let desc = test_namespace("peer-names");
    let (nsa, nsb, nsc) = (
        ca_.open_namespace(&desc).expect("ns a"),
        cb.open_namespace(&desc).expect("ns b"),
        cc.open_namespace(&desc).expect("ns c"),
    );
    // Node C, another CA's, holds block 1 and publishes it like any node; node A's real
    // address is registered as "impostor", claiming block 2 (which A does not hold).
    cc.put(&nsc, &key(1), &pattern(6, 1, 9_000)).expect("put c");
    register_fake_node(
        &redis,
        "impostor",
        &format!("127.0.0.1:{a_port}"),
        &nsb,
        &key(2),
    );
    ca_.put(&nsa, &key(0), &pattern(6, 0, 9_000))
        .expect("put a");
    published(&cb, &nsb, 1);
    for k in [key(1), key(2)] {
        wait_for("the claim in the index", Duration::from_secs(10), || {
            let r = cb.cluster_lookup(&nsb.id, &[k]).ok()?;
            (r.prefix_len == 1).then_some(())
        });
    }

    // Block 0 from node-a, which proves its name.
    assert_eq!(
        cb.lookup(&nsb.id, &keys(0..1))
            .expect("lookup 0")
            .prefix_len,
        1
    );
    // Block 1 only from node C: refused, nothing asked, nothing stored, no checksum needed.
    assert_eq!(
        cb.lookup(&nsb.id, &[key(1)]).expect("lookup 1").prefix_len,
        0
    );
    assert!(cb.get(&nsb, &key(1)).expect("get").is_none());
    let p = cb.stats().expect("stats").peer.expect("peer");
    assert_eq!((p.fetched_blocks, p.checksum_failures), (1, 0), "{p:?}");
    assert!(
        p.last_error.contains("failed mutual TLS authentication"),
        "{p:?}"
    );
    b.expect_log("peer fetch refused");
    // Block 2 only from the "impostor": node A's certificate is the cluster's, but not
    // issued to that name.
    assert_eq!(
        cb.lookup(&nsb.id, &[key(2)]).expect("lookup 2").prefix_len,
        0
    );
    let p = cb.stats().expect("stats").peer.expect("peer");
    assert!(
        p.last_error.contains("impostor") && p.last_error.contains("failed mutual TLS"),
        "{p:?}"
    );
    assert_eq!((p.fetched_blocks, p.checksum_failures), (1, 0), "{p:?}");
    let pa = served(&ca_, 1);
    assert_eq!(pa.served_blocks, 1, "{pa:?}");
}
