//! `kvd-bench`: whole-system benchmarks of kvd, reported as ratios to a same-run reference.
//!
//! `kvd-bench dram` puts and gets N distinct blocks per size through a running daemon (or one it
//! starts itself with `--spawn`), verifies every byte read back, and prints throughput and
//! latency next to single-thread memcpy of the same blocks measured in the same run. It also
//! times batch lookups of a 1024-key chain.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use kvd_benches::{fill, percentile_us, Record};
use kvd_client::{BlockKey, Client, NamespaceDesc, Options, PutOutcome};

/// Benchmarks for kvd; every figure comes with a same-run reference and a ratio.
#[derive(Debug, Parser)]
#[command(name = "kvd-bench", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// DRAM tier: put/get throughput and latency vs memcpy, and batch lookup latency.
    Dram(DramArgs),
}

#[derive(Debug, clap::Args)]
struct DramArgs {
    /// Daemon socket ($KVD_SOCKET); ignored with --spawn.
    #[arg(short, long, env = "KVD_SOCKET", default_value = kvd_client::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Start a private kvd (found next to this binary, or $KVD_BIN) sized for the run.
    #[arg(long)]
    spawn: bool,
    /// Block sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "64KiB,1MiB,4MiB")]
    sizes: Vec<String>,
    /// Bytes moved per size and round (N = total / size blocks).
    #[arg(long, default_value = "256MiB")]
    total: String,
    /// Rounds per size; throughput is the best round, latencies pool all rounds.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Lookup batches to time.
    #[arg(long, default_value_t = 2000)]
    lookups: u32,
    /// Print one JSON object per line.
    #[arg(long)]
    json: bool,
    /// Leave the last round's blocks stored (for demos and `kvd-ctl ls`).
    #[arg(long)]
    keep_blocks: bool,
}

fn parse_size(s: &str) -> anyhow::Result<usize> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, u) = t.split_at(split);
    let n: usize = n.parse().with_context(|| format!("{s:?} is not a size"))?;
    let m = match u.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        other => bail!("unknown unit {other:?} in {s:?}"),
    };
    Ok(n * m)
}

struct Spawned {
    child: Child,
    _dir: tempfile_dir::Dir,
}

mod tempfile_dir {
    //! A private temporary directory removed on drop (no extra dependency for one use).
    use std::path::{Path, PathBuf};

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new() -> std::io::Result<Self> {
            let p = std::env::temp_dir().join(format!("kvd-bench-{}", std::process::id()));
            std::fs::create_dir_all(&p)?;
            Ok(Dir(p))
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc_kill(self.child.id()) };
        let _ = self.child.wait();
    }
}

/// SIGTERM so the daemon shuts down cleanly.
///
/// # Safety
/// `pid` must be a child of this process that has not been reaped.
unsafe fn libc_kill(pid: u32) {
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    // SAFETY: forwarded contract; SIGTERM is 15 on Linux.
    unsafe {
        kill(pid as i32, 15);
    }
}

fn spawn_daemon(arena: usize, max_block: usize) -> anyhow::Result<(Spawned, PathBuf)> {
    let dir = tempfile_dir::Dir::new().context("creating a temporary directory")?;
    let socket = dir.path().join("kvd.sock");
    let bin = match std::env::var_os("KVD_BIN") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()?
            .parent()
            .context("binary has no directory")?
            .join("kvd"),
    };
    let child = Command::new(&bin)
        .arg("--socket")
        .arg(&socket)
        .args(["--set", &format!("dram.arena_bytes={arena}")])
        .args(["--set", &format!("dram.max_block_bytes={max_block}")])
        .args([
            "--set",
            "dram.max_namespaces=1",
            "--set",
            "dram.high_watermark=1.0",
        ])
        .args(["--set", "dram.low_watermark=1.0", "--set", "log.level=warn"])
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} (set KVD_BIN to the kvd binary)", bin.display()))?;
    let s = Spawned { child, _dir: dir };
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        if Client::connect(&socket).is_ok() {
            return Ok((s, socket));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("the spawned kvd did not become ready within 60 s")
}

fn key(size: usize, i: usize) -> BlockKey {
    let mut k = [0u8; 32];
    // Index first, so `kvd-ctl ls` short keys tell the blocks apart.
    k[..8].copy_from_slice(&(i as u64).to_be_bytes());
    k[8..16].copy_from_slice(&(size as u64).to_le_bytes());
    BlockKey(k)
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn emit(json: bool, r: &Record) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
    } else if r.op == "nop" {
        println!(
            "{:<5} {:<6} ring round trip     p50 {:>8.1} µs  p99 {:>8.1} µs",
            r.tier, r.op, r.p50_us, r.p99_us
        );
    } else if r.op == "lookup" {
        println!(
            "{:<5} {:<6} batch {:>5} keys   p50 {:>8.1} µs  p99 {:>8.1} µs",
            r.tier,
            r.op,
            r.size_bytes / 32,
            r.p50_us,
            r.p99_us
        );
    } else {
        println!(
            "{:<5} {:<6} {:>8} KiB  {:>6.2} GB/s  p50 {:>8.1} µs  p99 {:>8.1} µs  memcpy {:>6.2} GB/s  ratio {:>5.2}",
            r.tier,
            r.op,
            r.size_bytes / 1024,
            r.gbps.unwrap_or(0.0),
            r.p50_us,
            r.p99_us,
            r.memcpy_gbps.unwrap_or(0.0),
            r.ratio.unwrap_or(0.0)
        );
    }
    Ok(())
}

/// A record with latencies only (no throughput or memcpy reference), from sorted samples.
fn latency_record(op: &'static str, size_bytes: u64, sorted_ns: &[u64]) -> Record {
    Record {
        tier: "dram",
        op,
        size_bytes,
        gbps: None,
        p50_us: percentile_us(sorted_ns, 50.0),
        p99_us: percentile_us(sorted_ns, 99.0),
        memcpy_gbps: None,
        ratio: None,
        ops: sorted_ns.len() as u64,
    }
}

fn dram(a: DramArgs) -> anyhow::Result<()> {
    let sizes = a
        .sizes
        .iter()
        .map(|s| parse_size(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let total = parse_size(&a.total)?;
    let max = sizes.iter().copied().max().unwrap_or(1 << 20);
    let (_daemon, socket) = if a.spawn {
        // Room for one full round of the largest footprint plus allocator slack.
        let arena = total + total / 2 + 4 * max + (8 << 20);
        let (d, s) = spawn_daemon(arena, max)?;
        (Some(d), s)
    } else {
        (None, a.socket.clone())
    };
    let client = Client::connect_with(
        &socket,
        Options {
            name: "kvd-bench".into(),
            ..Options::default()
        },
    )?;
    let desc = NamespaceDesc::new("kvd-bench", "bytes", "opaque", 16);
    let ns = client.open_namespace(&desc)?;
    if !a.json {
        println!(
            "kvd-bench dram: {} per size and round, {} rounds, every byte verified",
            a.total, a.rounds
        );
    }
    for &size in &sizes {
        let n = (total / size).max(8);
        let mut src: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                let mut b = vec![0u8; size];
                fill(&mut b, (size * 1_000_003 + i) as u64);
                b
            })
            .collect();
        let mut dst: Vec<Vec<u8>> = (0..n).map(|_| vec![1u8; size]).collect();
        let keys: Vec<BlockKey> = (0..n).map(|i| key(size, i)).collect();
        let (mut best_put, mut best_get, mut best_cpy) = (0f64, 0f64, 0f64);
        let (mut put_lat, mut get_lat) = (Vec::new(), Vec::new());
        for round in 0..a.rounds {
            // memcpy reference: same sources, distinct pre-faulted destinations.
            let t = Instant::now();
            for (s, d) in src.iter().zip(dst.iter_mut()) {
                d.copy_from_slice(s);
            }
            best_cpy = best_cpy.max(gbps(n * size, t.elapsed()));
            std::hint::black_box(&dst);
            for d in dst.iter_mut() {
                d.fill(0);
            }
            let t = Instant::now();
            for (k, s) in keys.iter().zip(&src) {
                let t0 = Instant::now();
                let o = client.put(&ns, k, s)?;
                put_lat.push(t0.elapsed().as_nanos() as u64);
                if o != PutOutcome::Stored {
                    bail!("block {k:?} was already stored: the daemon is not empty");
                }
            }
            best_put = best_put.max(gbps(n * size, t.elapsed()));
            let t = Instant::now();
            for (k, d) in keys.iter().zip(dst.iter_mut()) {
                let t0 = Instant::now();
                let lease = client
                    .get(&ns, k)?
                    .with_context(|| format!("block {k:?} missing"))?;
                d.copy_from_slice(&lease);
                drop(lease);
                get_lat.push(t0.elapsed().as_nanos() as u64);
            }
            best_get = best_get.max(gbps(n * size, t.elapsed()));
            for (i, (s, d)) in src.iter().zip(&dst).enumerate() {
                if s != d {
                    bail!("size {size} block {i}: bytes read back differ from bytes written");
                }
            }
            if a.keep_blocks && round + 1 == a.rounds {
                break;
            }
            client.delete(&ns.id, &keys)?;
            // Change the sources so the next round cannot be served by a stale cache line.
            for (i, s) in src.iter_mut().enumerate() {
                s[0] = s[0].wrapping_add(i as u8 | 1);
            }
        }
        put_lat.sort_unstable();
        get_lat.sort_unstable();
        for (op, best, lat) in [("put", best_put, &put_lat), ("get", best_get, &get_lat)] {
            emit(
                a.json,
                &Record {
                    tier: "dram",
                    op,
                    size_bytes: size as u64,
                    gbps: Some(best),
                    p50_us: percentile_us(lat, 50.0),
                    p99_us: percentile_us(lat, 99.0),
                    memcpy_gbps: Some(best_cpy),
                    ratio: Some(best / best_cpy),
                    ops: lat.len() as u64,
                },
            )?;
        }
    }
    // Ring round trip with no data: the per-operation overhead of the data plane.
    let mut lat = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        let t0 = Instant::now();
        client.nop()?;
        lat.push(t0.elapsed().as_nanos() as u64);
    }
    lat.sort_unstable();
    emit(a.json, &latency_record("nop", 0, &lat))?;
    // Batch lookup of a 1024-key chain that is fully stored.
    let chain: Vec<BlockKey> = (0..1024).map(|i| key(4096, i)).collect();
    let small = vec![0x42u8; 4096];
    let items: Vec<(BlockKey, &[u8])> = chain.iter().map(|k| (*k, &small[..])).collect();
    client.put_many(&ns, &items)?;
    let mut lat = Vec::with_capacity(a.lookups as usize);
    for _ in 0..a.lookups {
        let t0 = Instant::now();
        let r = client.lookup(&ns.id, &chain)?;
        lat.push(t0.elapsed().as_nanos() as u64);
        if r.prefix_len != 1024 {
            bail!("lookup found {} of 1024 stored keys", r.prefix_len);
        }
    }
    lat.sort_unstable();
    client.delete(&ns.id, &chain)?;
    emit(a.json, &latency_record("lookup", 1024 * 32, &lat))?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Dram(a) => dram(a),
    }
}
