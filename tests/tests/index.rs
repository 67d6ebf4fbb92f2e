//! The cluster index end to end: a real `redis-server` (Debian's, started here on 127.0.0.1)
//! and the real `kvd` publishing what it holds, following deletes and demotions, surviving a
//! Redis outage and republishing under a new epoch after it and after a restart.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kvd_client::{BlockKey, Client, Namespace};
use kvd_tests::redis::Redis;
use kvd_tests::{pattern, start_with as start, test_namespace, wait_for, Daemon};

/// What the index tests read from Redis the way a lookup does.
trait IndexView {
    fn epoch(&self, node: &str) -> Option<String>;
    fn holders(&self, ns: &Namespace, key: &BlockKey, node: &str) -> Vec<String>;
}

impl IndexView for Redis {
    /// The epoch in `node`'s lease, if the lease exists.
    fn epoch(&self, node: &str) -> Option<String> {
        let e = self.cli(&["HGET", &format!("kvd:node:{node}"), "epoch"]);
        let e = e.trim();
        (!e.is_empty()).then(|| e.to_string())
    }

    /// Where `node` holds a block according to Redis (`node|dram`, `node|disk`), reading
    /// the holdings of the epoch in its lease, as a reader does.
    fn holders(&self, ns: &Namespace, key: &BlockKey, node: &str) -> Vec<String> {
        let Some(epoch) = self.epoch(node) else {
            return Vec::new();
        };
        let h = format!("kvd:res:{node}:{epoch}:{}", ns.id.to_hex());
        let mut out = Vec::new();
        for tier in ["disk", "dram"] {
            let v = self.cli(&["HEXISTS", &h, &format!("{}|{tier}", key.to_hex())]);
            if v.trim() == "1" {
                out.push(format!("{node}|{tier}"));
            }
        }
        out
    }
}

fn key(i: u64) -> BlockKey {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&i.to_le_bytes());
    k[31] = 0x1D;
    BlockKey(k)
}

fn sets(redis: &Redis, node: &str, disk: &Path) -> Vec<String> {
    vec![
        format!("index.redis_urls={}", redis.url()),
        format!("index.node_id={node}"),
        "index.publish_interval_ms=20".into(),
        "index.lease_ttl_ms=2000".into(),
        "index.timeout_ms=500".into(),
    ]
    .into_iter()
    .chain(kvd_tests::disk_sets(disk, "64MiB", "1.0"))
    .collect()
}

fn put(c: &Client, ns: &Namespace, range: std::ops::Range<u64>) {
    for i in range {
        c.put(ns, &key(i), &pattern(7, i, 20_000)).expect("put");
    }
}

/// Waits until Redis names exactly `want` as the holders of block `i`.
fn expect_holders(r: &Redis, ns: &Namespace, i: u64, node: &str, want: &[&str]) {
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    wait_for(
        &format!("block {i} held by {want:?} in redis"),
        Duration::from_secs(10),
        || (r.holders(ns, &key(i), node) == want).then_some(()),
    );
}

#[test]
fn residency_follows_puts_deletes_demotions_outages_and_restarts() {
    let Some(redis) = Redis::start(None) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let sets = sets(&redis, "node-a", dir.path());
    let mut d = start(&sets);
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("index")).expect("ns");
    put(&c, &ns, 0..6);
    for i in 0..6 {
        expect_holders(&redis, &ns, i, "node-a", &["node-a|dram"]);
    }
    let ttl: i64 = redis
        .cli(&["PTTL", "kvd:node:node-a"])
        .trim()
        .parse()
        .expect("pttl");
    assert!(ttl > 0 && ttl <= 2000, "the lease expires: pttl {ttl}");
    let epoch = redis.epoch("node-a").expect("epoch");
    let holdings = format!("kvd:res:node-a:{epoch}:{}", ns.id.to_hex());
    let ttl: i64 = redis
        .cli(&["PTTL", &holdings])
        .trim()
        .parse()
        .expect("pttl");
    assert!(
        ttl > 0 && ttl <= 2000,
        "the holdings expire with it: pttl {ttl}"
    );

    // The report is updated just after Redis answers: wait for it rather than race it.
    let x = wait_for("the index report", Duration::from_secs(10), || {
        let x = c.stats().expect("stats").index.expect("index report");
        (x.connected && x.published >= 6).then_some(x)
    });
    assert!(x.epoch > 0 && x.republishes == 1, "{x:?}");
    assert_eq!(x.node, "node-a");
    assert!(d.ctl(&["status"]).contains("node node-a  connected"));

    c.delete(&ns.id, &[key(0)]).expect("delete");
    expect_holders(&redis, &ns, 0, "node-a", &[]);
    c.drain(Some(ns.id)).expect("drain");
    for i in 1..6 {
        expect_holders(&redis, &ns, i, "node-a", &["node-a|disk", "node-a|dram"]);
    }
    c.evict(Some(ns.id), &[key(1)]).expect("evict");
    expect_holders(&redis, &ns, 1, "node-a", &["node-a|disk"]);

    // Redis goes away: kvd keeps serving, says so once, and republishes when it is back.
    let port = redis.port;
    let old_epoch = redis.epoch("node-a").expect("epoch");
    drop(redis);
    put(&c, &ns, 10..12);
    assert!(c.get(&ns, &key(10)).expect("get").is_some());
    d.expect_log("cluster index unavailable");
    let x = c.stats().expect("stats").index.expect("index report");
    assert!(!x.connected && x.outages == 1, "{x:?}");
    assert!(x.last_error.contains(&format!("127.0.0.1:{port}")), "{x:?}");
    assert!(d.ctl(&["status"]).contains("UNREACHABLE"));
    let redis = Redis::start(Some(port)).expect("redis again");
    for (i, want) in [
        (1, &["node-a|disk"][..]),
        (2, &["node-a|disk", "node-a|dram"]),
        (10, &["node-a|dram"]),
    ] {
        expect_holders(&redis, &ns, i, "node-a", want);
    }
    assert_ne!(redis.epoch("node-a").expect("epoch"), old_epoch);
    d.expect_log("cluster index reachable again");
    let x = c.stats().expect("stats").index.expect("index report");
    assert!(x.connected && x.republishes == 2, "{x:?}");
    let warned = d.log_text().matches("cluster index unavailable").count();
    assert_eq!(warned, 1, "one warning per outage");

    // Redis loses the data while the connection stays up (FLUSHALL; an eviction or a
    // failover to an empty replica looks the same): the next heartbeat notices the missing
    // lease and the node republishes.
    let before = redis.epoch("node-a").expect("epoch");
    redis.cli(&["FLUSHALL"]);
    d.expect_log("lease had vanished");
    expect_holders(&redis, &ns, 2, "node-a", &["node-a|disk", "node-a|dram"]);
    assert_ne!(redis.epoch("node-a").expect("epoch"), before);

    // kill -9 and restart: the old epoch's fields stop counting, the disk copies come back.
    let before = redis.epoch("node-a").expect("epoch");
    d.kill9();
    let d = start(&sets);
    wait_for(
        "a new epoch after the restart",
        Duration::from_secs(10),
        || redis.epoch("node-a").filter(|e| *e != before).map(|_| ()),
    );
    let c = d.admin();
    let ns = c.open_namespace(&test_namespace("index")).expect("ns");
    for i in 2..6 {
        expect_holders(&redis, &ns, i, "node-a", &["node-a|disk"]);
    }
    expect_holders(&redis, &ns, 10, "node-a", &[]);

    // A clean stop removes the lease at once.
    let mut d = d;
    d.terminate(Duration::from_secs(10));
    assert_eq!(redis.epoch("node-a"), None, "lease removed at shutdown");
}

#[test]
fn without_redis_configured_kvd_says_local_index_only() {
    let d = Daemon::start(&[]);
    d.expect_log("no cluster index configured");
    assert!(d.admin().stats().expect("stats").index.is_none());
    assert!(d.ctl(&["status"]).contains("index none configured"));
}

/// The namespace's blocks a node holds, per `where` from `c`: (node, prefix_len, local).
fn where_nodes(c: &Client, ns: &Namespace, n: u64) -> (u32, bool, Vec<(String, u32, bool)>) {
    let keys: Vec<BlockKey> = (0..n).map(key).collect();
    let r = c.cluster_lookup(&ns.id, &keys).expect("cluster lookup");
    let nodes = r
        .nodes
        .iter()
        .map(|h| (h.node.clone(), h.prefix_len, h.local))
        .collect();
    (r.prefix_len, r.cluster, nodes)
}

#[test]
fn where_names_every_node_holding_a_prefix_until_its_lease_ends() {
    let Some(redis) = Redis::start(None) else {
        return;
    };
    let (da, db) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let mut a = start(&sets(&redis, "node-a", da.path()));
    let b = start(&sets(&redis, "node-b", db.path()));
    let (ca, cb) = (a.admin(), b.admin());
    let nsa = ca.open_namespace(&test_namespace("where")).expect("ns a");
    let nsb = cb.open_namespace(&test_namespace("where")).expect("ns b");
    assert_eq!(nsa.id, nsb.id);
    // A name left by a node gone for days: forgotten at the next heartbeat.
    redis.cli(&["ZADD", "kvd:nodes", "1", "ghost"]);
    put(&ca, &nsa, 0..4);
    put(&cb, &nsb, 0..2);
    let want = (
        4,
        true,
        vec![
            ("node-a".to_string(), 4, false),
            ("node-b".to_string(), 2, true),
        ],
    );
    wait_for("b to see a's blocks", Duration::from_secs(10), || {
        (where_nodes(&cb, &nsb, 6) == want).then_some(())
    });
    wait_for("the ghost to be forgotten", Duration::from_secs(10), || {
        redis
            .cli(&["ZSCORE", "kvd:nodes", "ghost"])
            .trim()
            .is_empty()
            .then_some(())
    });
    assert!(!redis
        .cli(&["ZSCORE", "kvd:nodes", "node-a"])
        .trim()
        .is_empty());

    // The CLI says the same.
    let out = b.ctl(&[
        "--json",
        "where",
        "--ns",
        &nsb.id.to_hex(),
        &key(0).to_hex(),
        &key(1).to_hex(),
        &key(2).to_hex(),
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(v["prefix_len"], 3, "{v}");
    assert_eq!(v["cluster"], true, "{v}");
    assert_eq!(v["nodes"][0]["node"], "node-a", "{v}");
    assert_eq!(v["nodes"][0]["tiers"]["dram"], 3, "{v}");
    assert_eq!(v["nodes"][1]["local"], true, "{v}");

    // node-a dies without a word: it stops counting once its lease (2 s) runs out, and its
    // holdings expire with it.
    a.kill9();
    wait_for("node-a's lease to run out", Duration::from_secs(10), || {
        (where_nodes(&cb, &nsb, 6) == (2, true, vec![("node-b".to_string(), 2, true)]))
            .then_some(())
    });
    wait_for(
        "node-a's holdings to expire",
        Duration::from_secs(10),
        || {
            redis
                .cli(&["KEYS", "kvd:res:node-a:*"])
                .trim()
                .is_empty()
                .then_some(())
        },
    );
    assert!(!redis.cli(&["KEYS", "kvd:res:node-b:*"]).trim().is_empty());
    assert!(
        !b.log_contains("vanished") && !b.log_contains("unavailable"),
        "no spurious republish: {}",
        b.log_text()
    );
}

#[test]
fn where_without_an_index_answers_for_this_node_only() {
    let d = Daemon::start(&[]);
    let c = d.admin();
    let ns = c
        .open_namespace(&test_namespace("where-local"))
        .expect("ns");
    put(&c, &ns, 0..3);
    assert_eq!(
        where_nodes(&c, &ns, 5),
        (3, false, vec![(host_name(), 3, true)])
    );
    let out = d.ctl(&["where", "--ns", &ns.id.to_hex(), &key(0).to_hex()]);
    assert!(
        out.contains("1 of 1 leading blocks held on this node"),
        "{out}"
    );
}

/// The node name a daemon without `index.node_id` uses: the host name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().replace(['|', ' '], "_"))
        .unwrap_or_default()
}

#[test]
fn a_three_node_redis_cluster_serves_as_the_index() {
    let Some(first) = Redis::start_with(None, &["--cluster-enabled", "yes"]) else {
        return;
    };
    let mut nodes = vec![first];
    for _ in 0..2 {
        nodes.push(Redis::start_with(None, &["--cluster-enabled", "yes"]).expect("redis"));
    }
    let addrs: Vec<String> = nodes
        .iter()
        .map(|r| format!("127.0.0.1:{}", r.port))
        .collect();
    let out = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli --cluster create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    for r in &nodes {
        wait_for("the cluster to form", Duration::from_secs(20), || {
            r.cli(&["CLUSTER", "INFO"])
                .contains("cluster_state:ok")
                .then_some(())
        });
    }
    let urls: Vec<String> = addrs.iter().map(|a| format!("\"redis://{a}\"")).collect();
    let urls = format!("index.redis_urls=[{}]", urls.join(","));
    let (da, db) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let with = |node: &str, dir: &Path| {
        let mut s = sets(&nodes[0], node, dir);
        s[0] = urls.clone();
        s.push("index.cluster=true".into());
        s
    };
    let a = start(&with("node-a", da.path()));
    let b = start(&with("node-b", db.path()));
    let (ca, cb) = (a.admin(), b.admin());
    let nsa = ca.open_namespace(&test_namespace("cluster")).expect("ns a");
    let nsb = cb.open_namespace(&test_namespace("cluster")).expect("ns b");
    // 64 blocks: their keys hash to slots on every cluster node.
    put(&ca, &nsa, 0..64);
    let want = (64, true, vec![("node-a".to_string(), 64, false)]);
    wait_for(
        "b to see a's blocks through the cluster",
        Duration::from_secs(20),
        || (where_nodes(&cb, &nsb, 64) == want).then_some(()),
    );
    // The node set, two leases and node-a's holdings, wherever their slots put them.
    let total: usize = nodes
        .iter()
        .map(|r| r.cli(&["DBSIZE"]).trim().parse::<usize>().unwrap_or(0))
        .sum();
    assert_eq!(total, 4, "keys across the cluster");
    ca.delete(&nsa.id, &[key(5)]).expect("delete");
    wait_for(
        "the delete to reach the cluster",
        Duration::from_secs(20),
        || (where_nodes(&cb, &nsb, 64).0 == 5).then_some(()),
    );
}
