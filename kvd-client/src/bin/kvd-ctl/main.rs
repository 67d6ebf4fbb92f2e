//! `kvd-ctl`: inspect and operate a running kvd.
//!
//! Every command prints a human table by default and one JSON document with `--json`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use kvd_client::json::{block_json, status_json};
use kvd_client::{BlockInfo, BlockKey, Client, NamespaceId, Options, StatsReport};
use serde_json::{json, Value};

mod top;

/// Inspect and operate the kvd KV-cache daemon on this node.
///
/// Connects to the daemon's control socket (--socket, $KVD_SOCKET, default /run/kvd/kvd.sock)
/// as an admin client (your uid must be the daemon's, root, or in server.admin_uids).
/// Keys are 64 hex digits; namespaces are 32 hex digits (see `kvd-ctl status`).
#[derive(Debug, Parser)]
#[command(name = "kvd-ctl", version, about, long_about)]
struct Cli {
    /// Control socket of the daemon.
    #[arg(short, long, env = "KVD_SOCKET", default_value = kvd_client::DEFAULT_SOCKET, global = true)]
    socket: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Tiers (capacity, used, blocks, hit rate), namespaces and connected clients.
    Status,
    /// List stored blocks, optionally of one namespace.
    Ls {
        /// Only this namespace (32 hex digits).
        #[arg(long)]
        ns: Option<String>,
        /// Stop after this many blocks.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show every stored copy of a key: namespace, tier, size, checksum, pins, readers, age.
    Inspect {
        /// Block key (64 hex digits).
        key: String,
    },
    /// Longest stored prefix of a chain of keys (first block first).
    Lookup {
        /// Namespace (32 hex digits).
        #[arg(long)]
        ns: String,
        /// Keys in chain order.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Which nodes of the cluster hold a chain of keys (first block first), and in which
    /// tier: the cluster index (Redis/Valkey, `[index]` in the daemon's config) with this
    /// daemon's own view folded in. Without an index, only this node is shown.
    Where {
        /// Namespace (32 hex digits).
        #[arg(long)]
        ns: String,
        /// Keys in chain order (one key: where that block is).
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Pin blocks so eviction never takes them.
    Pin {
        /// Namespace (32 hex digits).
        #[arg(long)]
        ns: String,
        /// Keys to pin.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Drop one pin from each block.
    Unpin {
        /// Namespace (32 hex digits).
        #[arg(long)]
        ns: String,
        /// Keys to unpin.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Evict unpinned blocks: the given keys, or with --all every evictable block.
    Evict {
        /// Only this namespace.
        #[arg(long)]
        ns: Option<String>,
        /// Evict every unpinned block not being read.
        #[arg(long, conflicts_with = "keys")]
        all: bool,
        /// Keys to evict.
        keys: Vec<String>,
    },
    /// Live view of tiers, hit rates, throughput, namespaces and clients (q to quit).
    Top {
        /// Refresh interval in milliseconds.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Print one frame as text (two samples an interval apart) and exit.
        #[arg(long)]
        once: bool,
    },
    /// Copy every DRAM block that has no disk copy yet to the disk tier, and upload every one
    /// without an S3 copy to S3 (e.g. before a node is drained or scaled to zero), with a
    /// progress bar; returns when all are written. Needs a disk or S3 tier.
    Drain {
        /// Only this namespace (hex id, as `kvd-ctl status` shows it).
        #[arg(long, visible_alias = "namespace")]
        ns: Option<String>,
        /// Give up after this many seconds (the copy goes on in the daemon).
        #[arg(long, default_value_t = 3600)]
        timeout_s: u64,
    },
    /// Read blocks held only on disk, then blocks held only in S3 (the bucket is listed first,
    /// so blocks other nodes uploaded count), back into DRAM, most recent first, as many as fit
    /// below each namespace's eviction low watermark (it never evicts to make room), with a
    /// progress bar; e.g. after a restart or a scale from zero, before traffic returns. Only
    /// namespaces an engine has opened can be warmed. Needs a disk or S3 tier.
    Warm {
        /// Only this namespace (hex id, as `kvd-ctl status` shows it).
        #[arg(long, visible_alias = "namespace")]
        ns: Option<String>,
        /// Give up after this many seconds (the reads go on in the daemon).
        #[arg(long, default_value_t = 3600)]
        timeout_s: u64,
    },
}

/// Blocks fetched per listing request.
const LIST_PAGE: usize = 1000;

fn parse_ns(s: &str) -> anyhow::Result<NamespaceId> {
    NamespaceId::from_hex(s).with_context(|| {
        format!("{s:?} is not a namespace id (32 hex digits; see `kvd-ctl status`)")
    })
}

fn parse_keys(v: &[String]) -> anyhow::Result<Vec<BlockKey>> {
    v.iter()
        .map(|k| BlockKey::from_hex(k).map_err(anyhow::Error::from))
        .collect()
}

fn human_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn rate(h: u64, m: u64) -> String {
    if h + m == 0 {
        "-".into()
    } else {
        format!("{:.1}%", 100.0 * h as f64 / (h + m) as f64)
    }
}

fn print_blocks(blocks: &[BlockInfo]) {
    println!(
        "{:<10} {:<14} {:<5} {:>10} {:<16} {:>4} {:>4} {:>6} {:>9}",
        "NAMESPACE", "KEY", "TIER", "SIZE", "CHECKSUM", "PINS", "RDRS", "HITS", "AGE"
    );
    for b in blocks {
        println!(
            "{:<10} {:<14} {:<5} {:>10} {:016x} {:>4} {:>4} {:>6} {:>8.1}s",
            b.ns.short(),
            b.key.short(),
            b.tier.name(),
            human_bytes(b.len),
            b.checksum,
            b.pins,
            b.readers,
            b.hits,
            b.age_ms as f64 / 1000.0
        );
    }
}

fn print_status(s: &StatsReport) {
    println!(
        "kvd {}  up {:.0}s",
        s.daemon_version,
        s.uptime_ms as f64 / 1000.0
    );
    println!();
    println!(
        "{:<5} {:>11} {:>11} {:>6} {:>10} {:>9} {:>9}",
        "TIER", "CAPACITY", "USED", "USE%", "BLOCKS", "HIT RATE", "EVICTED"
    );
    for t in &s.tiers {
        let pct = if t.capacity_bytes == 0 {
            0.0
        } else {
            100.0 * t.used_bytes as f64 / t.capacity_bytes as f64
        };
        println!(
            "{:<5} {:>11} {:>11} {:>5.1}% {:>10} {:>9} {:>9}",
            t.tier.name(),
            human_bytes(t.capacity_bytes),
            human_bytes(t.used_bytes),
            pct,
            t.blocks,
            rate(t.hits, t.misses),
            t.evictions
        );
    }
    if let Some(d) = &s.disk {
        println!();
        println!(
            "disk  {} ({}{})  regions {} ({} free)  blocks {}",
            d.path,
            d.engine,
            if d.direct_io {
                ", O_DIRECT"
            } else {
                ", page cache"
            },
            d.regions,
            d.free_regions,
            d.blocks
        );
        println!(
            "      read {}/s  write {}/s  (total read {}, written {})",
            human_bytes(d.read_bytes_per_s),
            human_bytes(d.write_bytes_per_s),
            human_bytes(d.read_bytes),
            human_bytes(d.write_bytes)
        );
        println!(
            "      admission rejections {}  reclaims {} ({} blocks)  tenant quota evictions {}  \
             checksum failures {}  IO errors {}",
            d.admission_rejections,
            d.reclaims,
            d.reclaimed_blocks,
            d.quota_evictions,
            d.checksum_failures,
            d.io_errors
        );
        if d.drain_pending > 0 {
            println!("      drain: {} blocks still to write", d.drain_pending);
        }
        if d.warm_pending > 0 || d.warmed > 0 {
            println!(
                "      warm: {} blocks read into DRAM since start, {} still to read",
                d.warmed, d.warm_pending
            );
        }
        if !d.degraded.is_empty() {
            println!("      DEGRADED: {}", d.degraded);
        }
    }
    match &s.index {
        None => {
            println!();
            println!("index none configured (local index only)");
        }
        Some(x) => {
            println!();
            println!(
                "index {}  node {}  {}  epoch {}",
                x.endpoint,
                x.node,
                if x.connected {
                    "connected"
                } else {
                    "UNREACHABLE (serving from the local index)"
                },
                x.epoch
            );
            println!(
                "      published {} changes  republished {} times  outages {}",
                x.published, x.republishes, x.outages
            );
            if !x.last_error.is_empty() {
                println!("      last error: {}", x.last_error);
            }
        }
    }
    if let Some(x) = &s.peer {
        println!(
            "peer   {}  served {} blocks ({})  fetched {} blocks ({})  failed {}",
            x.advertise,
            x.served_blocks,
            human_bytes(x.served_bytes),
            x.fetched_blocks,
            human_bytes(x.fetched_bytes),
            x.fetch_failures
        );
        if x.checksum_failures > 0 || x.bad_requests > 0 {
            println!(
                "      {} fetched blocks failed their checksum (dropped)  {} bad requests refused",
                x.checksum_failures, x.bad_requests
            );
        }
        if !x.last_error.is_empty() {
            println!("      last error: {}", x.last_error);
        }
    }
    if let Some(x) = &s.gpu {
        println!(
            "gpu    {}  pinned {} in {} ms  attached {}  saved {} blocks ({})  loaded {} blocks ({})",
            x.backend,
            human_bytes(x.pinned_bytes),
            x.pin_ms,
            x.attachments,
            x.saved_blocks,
            human_bytes(x.d2h_bytes),
            x.loaded_blocks,
            human_bytes(x.h2d_bytes),
        );
        if x.copy_errors > 0 || !x.last_error.is_empty() {
            println!(
                "      {} failed transfers  last error: {}",
                x.copy_errors, x.last_error
            );
        }
    }
    if let Some(x) = &s.s3 {
        print_s3(x);
    }
    if let Some(x) = &s.events {
        println!(
            "events {}  topic {}<model>  {} form{}",
            x.endpoint,
            x.topic_prefix,
            x.form,
            if x.replay_endpoint.is_empty() {
                String::new()
            } else {
                format!("  replay {}", x.replay_endpoint)
            }
        );
        println!(
            "      {} batches  {} events  next seq {}  resyncs {}  lineage of {} blocks",
            x.batches, x.events, x.next_seq, x.resyncs, x.lineage_blocks
        );
        if x.skipped > 0 {
            println!(
                "      {} stored blocks not announced: the engine sent no tokens for them",
                x.skipped
            );
        }
        if !x.last_error.is_empty() {
            println!("      last error: {}", x.last_error);
        }
    }
    println!();
    println!(
        "{:<32} {:<20} {:<16} {:>7} {:>8} {:>10} {:>7} {:>10} {:>6} {:>6} {:>9}",
        "NAMESPACE",
        "MODEL",
        "TENANT",
        "OWNER",
        "TP",
        "USED",
        "BLOCKS",
        "ON DISK",
        "PINNED",
        "LEASES",
        "HIT RATE"
    );
    for n in &s.namespaces {
        // The tenant's base only: a salt digest stays off terminals and logs.
        let tenant = n.desc.tenant.split('|').next().unwrap_or("");
        println!(
            "{:<32} {:<20} {:<16} {:>7} {:>8} {:>10} {:>7} {:>10} {:>6} {:>6} {:>9}",
            n.ns.to_hex(),
            n.desc.model.chars().take(20).collect::<String>(),
            if tenant.is_empty() {
                "-".to_string()
            } else {
                tenant.chars().take(16).collect()
            },
            n.owner_uid,
            format!("{}/{}", n.desc.tp_rank, n.desc.tp_size),
            human_bytes(n.used_bytes),
            n.blocks,
            human_bytes(n.disk_bytes),
            n.pinned,
            n.leases,
            rate(n.hits, n.misses)
        );
    }
    println!();
    println!(
        "{:<6} {:<24} {:>8} {:>6} {:>6} {:>10} {:>9}",
        "CLIENT", "NAME", "PID", "UID", "ADMIN", "RING OPS", "SQ/CQ"
    );
    for c in &s.clients {
        println!(
            "{:<6} {:<24} {:>8} {:>6} {:>6} {:>10} {:>9}",
            c.id,
            c.name.chars().take(24).collect::<String>(),
            c.pid,
            c.uid,
            if c.admin { "yes" } else { "no" },
            c.ops,
            format!("{}/{}", c.sq_depth, c.cq_depth)
        );
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let client = Client::connect_with(
        &cli.socket,
        Options {
            name: "kvd-ctl".into(),
            admin: true,
            ..Options::default()
        },
    )?;
    match &cli.cmd {
        Cmd::Status => {
            let s = client.stats()?;
            if cli.json {
                println!("{}", status_json(&s));
            } else {
                print_status(&s);
            }
        }
        Cmd::Ls { ns, limit } => {
            let ns = ns.as_deref().map(parse_ns).transpose()?;
            let mut all = Vec::new();
            let mut after = None;
            let mut truncated = false;
            loop {
                let want = (*limit - all.len()).min(LIST_PAGE);
                let (page, more) = client.list(ns, after, want as u32)?;
                after = page.last().map(|b| (b.ns, b.key));
                all.extend(page);
                if !more {
                    break;
                }
                if all.len() >= *limit {
                    truncated = true;
                    break;
                }
            }
            if cli.json {
                println!(
                    "{}",
                    json!({"blocks": all.iter().map(block_json).collect::<Vec<_>>(), "truncated": truncated})
                );
            } else {
                print_blocks(&all);
                if truncated {
                    println!("(more blocks; raise --limit)");
                }
            }
        }
        Cmd::Inspect { key } => {
            let key = BlockKey::from_hex(key)?;
            let copies = client.inspect(&key)?;
            if cli.json {
                println!(
                    "{}",
                    json!({"key": key.to_hex(), "copies": copies.iter().map(block_json).collect::<Vec<_>>()})
                );
            } else if copies.is_empty() {
                println!("{key}: not stored in any tier");
            } else {
                print_blocks(&copies);
            }
        }
        Cmd::Lookup { ns, keys } => {
            let ns = parse_ns(ns)?;
            let keys = parse_keys(keys)?;
            let r = client.lookup(&ns, &keys)?;
            if cli.json {
                println!(
                    "{}",
                    json!({"prefix_len": r.prefix_len, "requested": keys.len(),
                           "tiers": kvd_client::Tier::ALL.iter().map(|t| (t.name().to_string(), json!(r.tiers.get(*t)))).collect::<serde_json::Map<_, _>>()})
                );
            } else {
                println!("{} of {} leading blocks stored", r.prefix_len, keys.len());
                for t in kvd_client::Tier::ALL {
                    if r.tiers.get(t) > 0 {
                        println!("  {:<5} {}", t.name(), r.tiers.get(t));
                    }
                }
            }
        }
        Cmd::Where { ns, keys } => {
            let ns = parse_ns(ns)?;
            let keys = parse_keys(keys)?;
            let r = client.cluster_lookup(&ns, &keys)?;
            let tiers = |t: &kvd_client::TierCounts| {
                kvd_client::Tier::ALL
                    .iter()
                    .filter(|x| t.get(**x) > 0)
                    .map(|x| (x.name().to_string(), json!(t.get(*x))))
                    .collect::<serde_json::Map<_, _>>()
            };
            if cli.json {
                let nodes: Vec<_> = r
                    .nodes
                    .iter()
                    .map(|n| {
                        json!({"node": n.node, "prefix_len": n.prefix_len,
                                    "tiers": tiers(&n.tiers), "local": n.local})
                    })
                    .collect();
                println!(
                    "{}",
                    json!({"prefix_len": r.prefix_len, "requested": keys.len(),
                           "cluster": r.cluster, "nodes": nodes})
                );
            } else {
                println!(
                    "{} of {} leading blocks held {}",
                    r.prefix_len,
                    keys.len(),
                    if r.cluster {
                        "in the cluster"
                    } else {
                        "on this node (no cluster index configured or reachable)"
                    }
                );
                for n in &r.nodes {
                    let t: Vec<String> = tiers(&n.tiers)
                        .iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect();
                    println!(
                        "  {:<24} {:>6} blocks  ({}){}",
                        n.node,
                        n.prefix_len,
                        t.join(", "),
                        if n.local { "  this node" } else { "" }
                    );
                }
            }
        }
        Cmd::Pin { ns, keys } | Cmd::Unpin { ns, keys } => {
            let pin = matches!(cli.cmd, Cmd::Pin { .. });
            let ns = parse_ns(ns)?;
            let keys = parse_keys(keys)?;
            let n = if pin {
                client.pin(&ns, &keys)?
            } else {
                client.unpin(&ns, &keys)?
            };
            let verb = if pin { "pinned" } else { "unpinned" };
            if cli.json {
                println!("{}", json!({verb: n, "requested": keys.len()}));
            } else {
                println!("{verb} {n} of {} blocks", keys.len());
            }
        }
        Cmd::Evict { ns, all, keys } => {
            let ns = ns.as_deref().map(parse_ns).transpose()?;
            let keys = parse_keys(keys)?;
            if keys.is_empty() && !all {
                bail!("name keys to evict, or pass --all to evict every unpinned block");
            }
            let n = client.evict(ns, &keys)?;
            if cli.json {
                println!("{}", json!({"evicted": n}));
            } else {
                println!("evicted {n} blocks");
            }
        }
        Cmd::Top { interval_ms, once } => {
            let interval = std::time::Duration::from_millis((*interval_ms).clamp(100, 60_000));
            top::run(&client, interval, *once)?;
        }
        Cmd::Drain { ns, timeout_s } => {
            let ns = ns.as_deref().map(parse_ns).transpose()?;
            follow(&client, Job::Drain, ns, *timeout_s, cli.json)?;
        }
        Cmd::Warm { ns, timeout_s } => {
            let ns = ns.as_deref().map(parse_ns).transpose()?;
            follow(&client, Job::Warm, ns, *timeout_s, cli.json)?;
        }
    }
    Ok(())
}

fn print_s3(x: &kvd_proto::frame::S3Report) {
    println!(
        "s3     {} bucket {}  {}  {} segments ({})  {} blocks",
        x.endpoint,
        x.bucket,
        if x.degraded {
            "DEGRADED (circuit breaker open: S3 skipped, DRAM and disk serve)"
        } else if !x.scanned {
            "not listed yet"
        } else {
            "ok"
        },
        x.segments,
        human_bytes(x.bytes),
        x.blocks
    );
    println!(
        "      uploaded {} segments ({}, {} blocks)  uploading {}  read {} blocks ({})  warmed {}",
        x.uploaded_segments,
        human_bytes(x.uploaded_bytes),
        x.uploaded_blocks,
        x.uploading,
        x.read_blocks,
        human_bytes(x.read_bytes),
        x.warmed
    );
    println!(
        "      requests {}  retries {}  failed {}  skipped by breaker {} (opened {} times)  deleted segments {}",
        x.requests, x.retries, x.failures, x.short_circuited, x.breaker_opened, x.deleted_segments
    );
    if x.upload_failures > 0 || x.read_failures > 0 || x.corrupt > 0 {
        println!(
            "      failed uploads {}  failed reads {}  checksum failures {} (never served)",
            x.upload_failures, x.read_failures, x.corrupt
        );
    }
    if x.drain_pending > 0 || x.warm_pending > 0 {
        println!(
            "      drain: {} blocks still to upload  warm: {} still to read",
            x.drain_pending, x.warm_pending
        );
    }
    if !x.last_error.is_empty() {
        println!("      last error: {}", x.last_error);
    }
}

/// A background job of the daemon that kvd-ctl follows to the end.
#[derive(Clone, Copy)]
enum Job {
    Drain,
    Warm,
}

impl Job {
    fn start(self, client: &Client, ns: Option<NamespaceId>) -> kvd_client::Result<u32> {
        match self {
            Job::Drain => client.drain(ns),
            Job::Warm => client.warm(ns),
        }
    }
    /// Blocks the job still has to do, from the disk and S3 tiers' reports.
    fn pending(self, s: &kvd_proto::frame::StatsReport) -> u64 {
        let disk = s.disk.as_ref().map_or(0, |d| match self {
            Job::Drain => d.drain_pending,
            Job::Warm => d.warm_pending,
        });
        let s3 = s.s3.as_ref().map_or(0, |x| match self {
            Job::Drain => x.drain_pending,
            Job::Warm => x.warm_pending,
        });
        disk + s3
    }
    /// Why the job cannot finish, if a tier it needs is degraded.
    fn degraded(s: &kvd_proto::frame::StatsReport) -> String {
        let mut why = Vec::new();
        if let Some(d) = s.disk.as_ref().filter(|d| !d.degraded.is_empty()) {
            why.push(format!("the disk tier is degraded: {}", d.degraded));
        }
        if let Some(x) = s.s3.as_ref().filter(|x| x.degraded) {
            why.push(format!(
                "the S3 tier is degraded (circuit breaker open): {}",
                x.last_error
            ));
        }
        why.join("; ")
    }
    fn name(self) -> &'static str {
        match self {
            Job::Drain => "drain",
            Job::Warm => "warm",
        }
    }
    fn doing(self) -> &'static str {
        match self {
            Job::Drain => "draining",
            Job::Warm => "warming DRAM",
        }
    }
    fn done(self) -> (&'static str, &'static str) {
        match self {
            Job::Drain => ("drained", "to disk/S3"),
            Job::Warm => ("warmed", "into DRAM from disk/S3"),
        }
    }
}

/// Starts a drain or a warm and follows it, with a progress bar, until no block is left.
fn follow(
    client: &Client,
    job: Job,
    ns: Option<NamespaceId>,
    timeout_s: u64,
    json_out: bool,
) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    let total = u64::from(job.start(client, ns)?);
    let bar = if json_out || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(total)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{} {{bar:40}} {{pos}}/{{len}} blocks  {{per_sec}}  eta {{eta}}",
            job.doing()
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let (done_word, place) = job.done();
    let mut last_report = std::time::Instant::now();
    loop {
        let s = client.stats()?;
        if s.disk.is_none() && s.s3.is_none() {
            bail!("the daemon reports no disk or S3 tier");
        }
        let left = job.pending(&s);
        let degraded = Job::degraded(&s);
        let total_now = total.max(left);
        bar.set_length(total_now);
        bar.set_position(total_now - left);
        if !json_out && bar.is_hidden() && last_report.elapsed().as_secs() >= 2 {
            eprintln!("{}: {left} of {total_now} blocks left", job.name());
            last_report = std::time::Instant::now();
        }
        if left == 0 {
            bar.finish_and_clear();
            let secs = start.elapsed().as_secs_f64();
            if json_out {
                let d = if degraded.is_empty() {
                    Value::Null
                } else {
                    json!(degraded)
                };
                println!(
                    "{}",
                    json!({done_word: total, "seconds": secs, "degraded": d})
                );
            } else {
                println!("{done_word} {total} blocks {place} in {secs:.1} s");
                if !degraded.is_empty() {
                    println!("warning: {degraded}");
                }
            }
            return Ok(());
        }
        if start.elapsed().as_secs() >= timeout_s {
            bar.abandon();
            bail!(
                "{} not finished after {timeout_s} s ({left} blocks left; it goes on in kvd)",
                job.name()
            );
        }
        if !degraded.is_empty() && left > 0 && start.elapsed().as_secs() >= 10 {
            bar.abandon();
            bail!("{degraded}; {left} blocks could not be {done_word}");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
