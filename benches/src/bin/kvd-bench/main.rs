//! `kvd-bench`: whole-system benchmarks of kvd, reported as ratios to a same-run reference.
//!
//! `kvd-bench dram` puts and gets N distinct blocks per size through a running daemon (or one it
//! starts itself with `--spawn`), verifies every byte read back, and prints throughput and
//! latency next to single-thread memcpy of the same blocks measured in the same run. It also
//! times batch lookups of a 1024-key chain.
//!
//! `kvd-bench disk` writes blocks to the disk tier (a drain of DRAM, timed until every block is
//! on disk) and reads them back in random order with `--qd` GETs in flight (each a disk read
//! into DRAM, checksum-verified, then compared byte for byte by the bench), next to `fio`
//! (io_uring, O_DIRECT, same block size, queue depth and directory) run in the same process.
//! Rounds alternate which side goes first, each phase starts on a settled disk (sync + pause),
//! and the figures are medians over rounds with the ratio the median of per-round ratios:
//! virtual disks swing by 2–4× between minutes, and pairing neighbours cancels most of it.
//! Both sides do IO from the same kind of memory (`--huge-pages`): with 4 KiB pages a large
//! IO becomes several device requests, as many as the pages' physical layout makes it, which
//! on request-bound devices changes throughput more than anything either side does.
//!
//! `kvd-bench index` starts a private redis-server and measures kvd's publishing to the
//! cluster index (blocks/s, against the same fields written one command per round trip) and
//! the latency of cluster lookups of a key chain through kvd.
//!
//! `kvd-bench footprint` is a diagnostic for the read ratio: fio reads into its `--qd`
//! buffers again and again, a cache into a different DRAM slot per block. It runs fio's
//! random reads beside a bare io_uring loop doing the same reads into `qd` reused buffers and
//! into one buffer per block, so the machine's cost of a large destination footprint (on
//! virtual disks whose host copies into guest memory, up to ~15%) is measured apart from
//! kvd's own.
//!
//! `kvd-bench s3` uploads blocks through kvd's S3 tier and reads them back with lookups on a
//! fresh node, beside the AWS SDK's client doing the same transfers (see `s3.rs`).
//!
//! `kvd-bench gpu` has kvd copy an engine's KV pages itself (daemon-driven transfers, CUDA
//! IPC or the host stand-in) and compares with the same copies made in this process, and a
//! many-page gather with one contiguous copy (see `gpu.rs`).

mod gpu;
mod s3;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use kvd_benches::{fill, percentile_us, Record};
use kvd_client::{BlockKey, Client, NamespaceDesc, NamespaceId, Options, PutOutcome};

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
    /// Disk tier: sequential write and random read throughput vs fio on the same filesystem.
    Disk(DiskArgs),
    /// Diagnostic: the same random reads into fio's few reused buffers vs a cache's many
    /// distinct ones, to tell the machine's memory-footprint cost from the cache's own.
    Footprint(FootprintArgs),
    /// Cluster index: kvd's batched publishing to Redis vs one command per round trip, and
    /// cluster lookup latency of a key chain.
    Index(IndexArgs),
    /// Peer fetch: node B's lookup pulling blocks from node A over the data port (two
    /// private daemons and a private redis-server) vs a plain TCP copy of the same bytes.
    Peer(PeerArgs),
    /// GPU tier: kvd's daemon-driven D2H/H2D copies of an engine's KV pages vs the same copies
    /// made by this process through the same backend, and a paged gather vs one contiguous copy.
    Gpu(gpu::GpuArgs),
    /// S3 tier: upload (a drain packed into segments) and ranged-read (lookups on a node
    /// with empty DRAM) throughput through kvd vs the AWS SDK's client doing the same
    /// transfers against the same server; starts a private s3s-fs unless `--endpoint`.
    S3(s3::S3Args),
}

#[derive(Debug, clap::Args)]
struct PeerArgs {
    /// Block sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1MiB,4MiB")]
    sizes: Vec<String>,
    /// Bytes fetched per size and round.
    #[arg(long, default_value = "256MiB")]
    total: String,
    /// Measured rounds per size (after a warm-up round that also checks every byte);
    /// medians are reported, with the median of the per-round ratios.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Blocks node B fetches at once (peer.fetch_concurrency), and connections of the TCP
    /// reference.
    #[arg(long, default_value_t = 4)]
    concurrency: u32,
    /// redis-server binary started on a free 127.0.0.1 port for the run.
    #[arg(long, default_value = "redis-server")]
    redis_server: PathBuf,
    /// Mutual TLS on the data port (peer.tls = "mutual", certificates made for the run). The
    /// reference is then the same bytes over rustls connection pairs doing mutual TLS with
    /// the same certificates; the plain TCP copy is reported beside it (TLS's own cost).
    #[arg(long)]
    tls: bool,
    /// Print one JSON object per line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct IndexArgs {
    /// Blocks to publish (4 KiB each).
    #[arg(long, default_value_t = 50_000)]
    blocks: usize,
    /// Keys per cluster lookup.
    #[arg(long, default_value_t = 256)]
    chain: usize,
    /// Cluster lookups to time.
    #[arg(long, default_value_t = 500)]
    lookups: usize,
    /// redis-server binary started on a free 127.0.0.1 port for the run.
    #[arg(long, default_value = "redis-server")]
    redis_server: PathBuf,
    /// Print one JSON object per line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct FootprintArgs {
    /// Directory on the filesystem to measure (a fresh subdirectory, removed afterwards).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Block size.
    #[arg(long, default_value = "1MiB")]
    size: String,
    /// File size and bytes read per measurement (N = total / size blocks, each read once).
    #[arg(long, default_value = "1GiB")]
    total: String,
    /// Reads in flight.
    #[arg(long, default_value_t = 32)]
    qd: u32,
    /// Measured rounds (after a warm-up round); medians are reported.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Memory the reads land in (as for `disk`).
    #[arg(long, value_enum, default_value_t = Pages::Auto)]
    huge_pages: Pages,
    /// Print one JSON object per line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct DiskArgs {
    /// Directory on the filesystem to measure (region files, catalog and fio's file go in a
    /// fresh subdirectory, removed afterwards).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Block sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1MiB,4MiB")]
    sizes: Vec<String>,
    /// Bytes written and read per size and round.
    #[arg(long, default_value = "1GiB")]
    total: String,
    /// IOs in flight (kvd's disk.io_depth and GETs per batch; fio's iodepth).
    #[arg(long, default_value_t = 32)]
    qd: u32,
    /// Measured rounds per size (after a warm-up round); medians are reported, with the
    /// median of the per-round kvd/fio ratios.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// kvd's disk IO engine (io_uring or psync).
    #[arg(long, default_value = "io_uring")]
    engine: String,
    /// GETs per batch of each reader connection (default: qd). kvd never has more
    /// than qd (disk.io_depth) disk IOs in flight, the device queue depth fio runs with; deeper
    /// client batches keep that queue full, as an engine loading a long prompt's blocks does.
    #[arg(long)]
    batch: Option<usize>,
    /// Reader connections (each a client thread and a daemon ring thread).
    #[arg(long, default_value_t = 4)]
    readers: usize,
    /// Skip fio (no ratio is reported).
    #[arg(long)]
    no_fio: bool,
    /// Memory both sides do IO from: kvd's arena (dram.huge_pages) and fio's buffers
    /// (--iomem). `explicit`: hugetlb pages (reserve them in /proc/sys/vm/nr_hugepages), so a
    /// 4 MiB IO is one device request; `off`: 4 KiB pages, which the block layer splits into
    /// requests of at most max_segments pages; `auto`: explicit where enough huge pages are
    /// free.
    #[arg(long, value_enum, default_value_t = Pages::Auto)]
    huge_pages: Pages,
    /// Print one JSON object per line.
    #[arg(long)]
    json: bool,
}

/// Page kind for `kvd-bench disk --huge-pages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Pages {
    /// Explicit huge pages where enough are free, 4 KiB pages otherwise.
    Auto,
    /// 4 KiB pages (kvd dram.huge_pages=off, fio --iomem=shm).
    Off,
    /// Hugetlb pages (kvd dram.huge_pages=explicit, fio --iomem=shmhuge).
    Explicit,
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
    n.checked_mul(m)
        .with_context(|| format!("{s:?} is too large"))
}

/// Block sizes, bytes per size and round, and the largest size.
fn parse_sizes(sizes: &[String], total: &str) -> anyhow::Result<(Vec<usize>, usize, usize)> {
    let sizes = sizes
        .iter()
        .map(|s| parse_size(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let max = sizes.iter().copied().max().unwrap_or(1 << 20);
    Ok((sizes, parse_size(total)?, max))
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
        /// A fresh directory for one spawned daemon (several may run at once).
        pub fn new() -> std::io::Result<Self> {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Dir::with_suffix(&format!("daemon{n}"))
        }
        pub fn with_suffix(s: &str) -> std::io::Result<Self> {
            let p = std::env::temp_dir().join(format!("kvd-bench-{}-{s}", std::process::id()));
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

/// The bench's admin connection to a daemon it spawned.
fn admin_client(socket: &std::path::Path) -> anyhow::Result<Client> {
    Ok(Client::connect_with(
        socket,
        Options {
            name: "kvd-bench".into(),
            admin: true,
            ..Options::default()
        },
    )?)
}

fn spawn_daemon(arena: usize, max_block: usize) -> anyhow::Result<(Spawned, PathBuf)> {
    spawn_daemon_with(arena, max_block, &[])
}

fn spawn_daemon_with(
    arena: usize,
    max_block: usize,
    sets: &[String],
) -> anyhow::Result<(Spawned, PathBuf)> {
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
        .args(sets.iter().flat_map(|s| ["--set", s.as_str()]))
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} (set KVD_BIN to the kvd binary)", bin.display()))?;
    let mut s = Spawned { child, _dir: dir };
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        if Client::connect(&socket).is_ok() {
            return Ok((s, socket));
        }
        if let Some(status) = s.child.try_wait()? {
            bail!("the spawned kvd exited ({status}) before it was ready; its error is above");
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
    } else if r.tier == "s3" {
        println!(
            "{:<5} {:<6} {:>8} KiB  {:>6.3} GB/s  AWS SDK client {:>6.3} GB/s  ratio {:>5.2}  ({} blocks)",
            r.tier,
            r.op,
            r.size_bytes / 1024,
            r.gbps.unwrap_or(0.0),
            r.sdk_gbps.unwrap_or(f64::NAN),
            r.ratio.unwrap_or(f64::NAN),
            r.ops
        );
    } else if r.tier == "disk" {
        println!(
            "{:<5} {:<6} {:>8} KiB  QD {:>3}  {:>6.2} GB/s  fio {:>6.2} GB/s  ratio {:>5.2}  (batch p50 {:.0} µs p99 {:.0} µs)",
            r.tier,
            r.op,
            r.size_bytes / 1024,
            r.queue_depth.unwrap_or(0),
            r.gbps.unwrap_or(0.0),
            r.fio_gbps.unwrap_or(f64::NAN),
            r.ratio.unwrap_or(f64::NAN),
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
        fio_gbps: None,
        sdk_gbps: None,
        queue_depth: None,
        ratio: None,
        ops: sorted_ns.len() as u64,
    }
}

fn dram(a: DramArgs) -> anyhow::Result<()> {
    let (sizes, total, max) = parse_sizes(&a.sizes, &a.total)?;
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
                    fio_gbps: None,
                    sdk_gbps: None,
                    queue_depth: None,
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

/// Reads `order` (indices into `keys`) through `readers`, reader r taking every r-th block in
/// batches of `batch`; with `src`, verifies every byte against it. Returns per-batch latencies
/// (ns), one entry per block.
fn read_all(
    readers: &[(Client, kvd_client::Namespace)],
    order: &[usize],
    keys: &[BlockKey],
    src: Option<&[Vec<u8>]>,
    batch: usize,
) -> anyhow::Result<Vec<u64>> {
    std::thread::scope(|sc| {
        let handles: Vec<_> = readers
            .iter()
            .enumerate()
            .map(|(r, (client, ns))| {
                sc.spawn(move || -> anyhow::Result<Vec<u64>> {
                    let mine: Vec<usize> = order
                        .iter()
                        .copied()
                        .skip(r)
                        .step_by(readers.len())
                        .collect();
                    let mut lat = Vec::with_capacity(mine.len());
                    for chunk in mine.chunks(batch) {
                        let ks: Vec<BlockKey> = chunk.iter().map(|&i| keys[i]).collect();
                        let t0 = Instant::now();
                        let leases = client.get_many(ns, &ks)?;
                        let dt = t0.elapsed().as_nanos() as u64;
                        lat.extend(std::iter::repeat_n(dt, chunk.len()));
                        for (&i, l) in chunk.iter().zip(&leases) {
                            let l = l.as_ref().with_context(|| format!("block {i} missing"))?;
                            if src.is_some_and(|s| l[..] != s[i][..]) {
                                bail!("block {i}: bytes read back differ from bytes written");
                            }
                        }
                    }
                    Ok(lat)
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            all.extend(
                h.join()
                    .map_err(|_| anyhow::anyhow!("a reader thread panicked"))??,
            );
        }
        Ok(all)
    })
}

/// Writes the data area of every region file in `dir` once (all but each file's last 4 KiB,
/// its header, which the daemon writes when it starts the region). `fallocate` leaves
/// unwritten extents, and the first durable write into one also commits the extent's
/// conversion to the filesystem journal; a disk tier in steady state, like fio's file after
/// its first round, overwrites written space. The daemon has written nothing yet. Returns the
/// MiB written.
fn lay_out_regions(dir: &Path, region: usize) -> anyhow::Result<u64> {
    use std::io::Write;
    let chunk = vec![0u8; 4 << 20];
    let mut written = 0u64;
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = e?.path();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut left = region.saturating_sub(4096);
        while left > 0 {
            let n = left.min(chunk.len());
            f.write_all(&chunk[..n])
                .with_context(|| format!("writing {}", path.display()))?;
            left -= n;
            written += n as u64;
        }
        f.sync_all()
            .with_context(|| format!("syncing {}", path.display()))?;
    }
    Ok(written >> 20)
}

/// Lets the disk finish earlier writes (sync, then a pause) before a measured phase, so that
/// no phase pays for the previous one's write-back — for kvd and fio alike.
fn settle() {
    let _ = Command::new("sync").status();
    std::thread::sleep(Duration::from_millis(500));
}

/// Runs fio once and returns its throughput in GB/s.
fn fio(
    file: &std::path::Path,
    rw: &str,
    size: usize,
    total: usize,
    qd: u32,
    huge: bool,
) -> anyhow::Result<f64> {
    let out = Command::new("fio")
        .args([
            "--name=kvd-bench",
            &format!("--filename={}", file.display()),
            &format!("--rw={rw}"),
            &format!("--bs={size}"),
            &format!("--size={total}"),
            &format!("--iodepth={qd}"),
            "--ioengine=io_uring",
            "--direct=1",
            // kvd writes its region files with O_DSYNC (durable before cataloged): fio too.
            "--sync=dsync",
            if huge {
                "--iomem=shmhuge"
            } else {
                "--iomem=shm"
            },
            "--output-format=json",
        ])
        .output()
        .context("running fio (install it, e.g. apt-get install fio, or pass --no-fio)")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing fio's JSON output")?;
    let dir = if rw.contains("read") { "read" } else { "write" };
    let bw = v["jobs"][0][dir]["bw_bytes"]
        .as_f64()
        .context("fio's JSON has no bw_bytes")?;
    Ok(bw / 1e9)
}

/// Fisher–Yates shuffle driven by a xorshift state (reproducible orders, no RNG crate).
fn shuffle(order: &mut [usize], x: &mut u64) {
    for i in (1..order.len()).rev() {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        order.swap(i, (*x % (i as u64 + 1)) as usize);
    }
}

/// Median of the finite values (NaN when there are none).
fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Removes a benchmark's scratch directory when the run ends, however it ends.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn disk(a: DiskArgs) -> anyhow::Result<()> {
    let (sizes, total, max) = parse_sizes(&a.sizes, &a.total)?;
    let work = a.dir.join(format!("kvd-bench-disk-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let _cleanup = Cleanup(work.clone());
    // Room for one round plus two regions; rounds reuse regions (reclaim), as a disk tier
    // does in steady state, and every region file is written once before measuring (see
    // lay_out_regions), as fio overwrites, after its warm-up round, the file it wrote.
    // Regions have the default size (disk.region_bytes): smaller ones mean more files, which
    // costs ext4 ~20% on its own.
    let region = (256usize << 20).max(4 * max);
    // A region's last 4 KiB is its header, so it holds one block fewer than region / size.
    let regions_needed = sizes
        .iter()
        .map(|&size| {
            let per_region = (region - 4096) / size.div_ceil(4096).saturating_mul(4096);
            (total / size).max(8).div_ceil(per_region.max(1))
        })
        .max()
        .unwrap_or(1);
    let capacity = (regions_needed + 2) * region;
    let mut sets = vec![
        format!("disk.path={}", work.join("kvd").display()),
        format!("disk.capacity_bytes={capacity}"),
        format!("disk.region_bytes={region}"),
        format!("disk.io_depth={}", a.qd),
        format!("disk.engine={}", a.engine),
        "disk.admission=always".into(),
        "disk.demote_watermark=1.0".into(),
        "ring.entries=1024".into(),
    ];
    let arena = total + total / 2 + 4 * max + (8 << 20);
    let (free_huge, huge_page) = kvd_shm::map::free_huge_pages();
    // kvd's arena (rounded up to whole huge pages) and fio's buffers (qd blocks), with slack.
    let huge_need = (arena as u64).div_ceil(huge_page.max(1)) * huge_page
        + u64::from(a.qd) * max as u64
        + (64 << 20);
    let huge = match a.huge_pages {
        Pages::Explicit => true,
        Pages::Off => false,
        Pages::Auto => huge_page > 0 && free_huge >= huge_need,
    };
    let arena = if huge {
        let page = huge_page.max(2 << 20) as usize;
        arena.div_ceil(page) * page
    } else {
        arena
    };
    sets.push(format!(
        "dram.huge_pages={}",
        if huge { "explicit" } else { "off" }
    ));
    let (_daemon, socket) = spawn_daemon_with(arena, max, &sets)?;
    let client = admin_client(&socket)?;
    let ns = client.open_namespace(&NamespaceDesc::new("kvd-bench", "bytes", "opaque", 16))?;
    let st = client
        .stats()?
        .disk
        .context("the spawned kvd has no disk tier")?;
    let laid = lay_out_regions(&work.join("kvd").join("regions"), region)?;
    if !a.json {
        println!(
            "kvd-bench disk: {} per size and round, QD {}, {} rounds after a warm-up round, kvd engine {} ({}), in {}",
            a.total,
            a.qd,
            a.rounds,
            st.engine,
            if st.direct_io { "O_DIRECT" } else { "page cache" },
            a.dir.display()
        );
        if huge {
            println!("  IO memory: huge pages (kvd dram.huge_pages=explicit, fio --iomem=shmhuge)");
        } else {
            println!(
                "  IO memory: 4 KiB pages (kvd dram.huge_pages=off, fio --iomem=shm){}",
                if a.huge_pages == Pages::Auto {
                    format!(
                        "; about {} MiB of free huge pages would let each block be one device request",
                        huge_need >> 20
                    )
                } else {
                    String::new()
                }
            );
        }
        println!(
            "  region files laid out ({laid} MiB written once before measuring, as fio's file is \
             by its warm-up round: a first write into preallocated space also converts its extents)"
        );
    }
    let fio_file = work.join("fio.dat");
    // Reads come from several connections, each with batches of GETs, so that while one
    // batch finishes its last reads the others keep the disk busy; kvd's engine holds at most
    // qd of them in flight at the device, as fio's iodepth does.
    let conns = a.readers.clamp(1, 64);
    let per_conn = a.batch.unwrap_or(a.qd as usize).max(1);
    let readers: Vec<(Client, kvd_client::Namespace)> = (0..conns)
        .map(|i| -> anyhow::Result<_> {
            let c = Client::connect_with(
                &socket,
                Options {
                    name: format!("kvd-bench-reader-{i}"),
                    ..Options::default()
                },
            )?;
            let ns = c.open_namespace(&NamespaceDesc::new("kvd-bench", "bytes", "opaque", 16))?;
            Ok((c, ns))
        })
        .collect::<anyhow::Result<_>>()?;
    for &size in &sizes {
        let n = (total / size).max(8);
        let src: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                let mut b = vec![0u8; size];
                fill(&mut b, (size * 7_000_003 + i) as u64);
                b
            })
            .collect();
        let keys: Vec<BlockKey> = (0..n).map(|i| key(size, i)).collect();
        // Per measured round: (kvd write, kvd read, fio write, fio read) in GB/s.
        let mut rounds: Vec<[f64; 4]> = Vec::new();
        let mut read_lat = Vec::new();
        let mut order: Vec<usize> = (0..n).collect();
        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ size as u64;
        for round in 0..=a.rounds {
            let warm = round == 0;
            let mut this = [f64::NAN; 4];
            // Each side reads what it has just written (the host's caches favour recent
            // writes), and the two sides take turns going first.
            let sides = if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for kvd_side in sides {
                if !kvd_side {
                    if !a.no_fio {
                        settle();
                        this[2] = fio(&fio_file, "write", size, n * size, a.qd, huge)?;
                        settle();
                        this[3] = fio(&fio_file, "randread", size, n * size, a.qd, huge)?;
                    }
                    continue;
                }
                // Write: blocks into DRAM, then a drain to disk, timed until all are written.
                client.delete(&ns.id, &keys)?;
                for (k, s) in keys.iter().zip(&src) {
                    if client.put(&ns, k, s)? != PutOutcome::Stored {
                        bail!("block {k:?} was already stored");
                    }
                }
                client.flush()?;
                settle();
                let before = client.stats()?.disk.context("no disk tier")?.writes;
                let t = Instant::now();
                client.drain(Some(ns.id))?;
                loop {
                    let d = client.stats()?.disk.context("no disk tier")?;
                    // Written, and released by the demoter (so the evict below empties DRAM).
                    if d.writes - before >= n as u64 && d.drain_pending == 0 {
                        break;
                    }
                    if !d.degraded.is_empty() {
                        bail!("the disk tier is degraded: {}", d.degraded);
                    }
                    if t.elapsed() > Duration::from_secs(600) {
                        bail!("the drain did not finish within 10 minutes");
                    }
                    std::thread::sleep(Duration::from_micros(500));
                }
                this[0] = gbps(n * size, t.elapsed());
                // Read: DRAM emptied, then random-order GETs, qd in flight, each from disk.
                client.evict(Some(ns.id), &[])?;
                shuffle(&mut order, &mut x);
                settle();
                let before = client.stats()?.disk.context("no disk tier")?.hits;
                let t = Instant::now();
                let lats = read_all(&readers, &order, &keys, None, per_conn)?;
                let busy = t.elapsed();
                if !warm {
                    read_lat.extend(lats);
                }
                // Every byte checked, outside the timing: the reads above promoted the blocks
                // into DRAM, and these are the very bytes the disk returned (checksum-verified
                // by kvd on the way in).
                read_all(&readers, &order, &keys, Some(&src), per_conn)?;
                let hits = client.stats()?.disk.context("no disk tier")?.hits - before;
                if hits != n as u64 {
                    bail!("{hits} of {n} reads were served by the disk tier");
                }
                this[1] = gbps(n * size, busy);
            }
            if !warm {
                rounds.push(this);
            }
        }
        let col = |i: usize| rounds.iter().map(|r| r[i]).collect::<Vec<_>>();
        let ratios = |k: usize, f: usize| rounds.iter().map(|r| r[k] / r[f]).collect::<Vec<_>>();
        if !a.json && !a.no_fio {
            for (i, r) in rounds.iter().enumerate() {
                println!(
                    "  {} KiB round {}: write kvd {:.2} fio {:.2} ({:.2}x)   read kvd {:.2} fio {:.2} ({:.2}x)",
                    size / 1024,
                    i + 1,
                    r[0],
                    r[2],
                    r[0] / r[2],
                    r[1],
                    r[3],
                    r[1] / r[3]
                );
            }
        }
        let (best_w, best_r, fio_w, fio_r) = (
            median(col(0)),
            median(col(1)),
            median(col(2)),
            median(col(3)),
        );
        let (ratio_w, ratio_r) = (median(ratios(0, 2)), median(ratios(1, 3)));
        std::fs::remove_file(&fio_file).ok();
        read_lat.sort_unstable();
        let fio_ref = |v: f64| (!a.no_fio).then_some(v);
        for (op, best, fio_best, ratio, lat) in [
            ("write", best_w, fio_w, ratio_w, Vec::new()),
            ("read", best_r, fio_r, ratio_r, read_lat),
        ] {
            emit(
                a.json,
                &Record {
                    tier: "disk",
                    op,
                    size_bytes: size as u64,
                    gbps: Some(best),
                    p50_us: percentile_us(&lat, 50.0),
                    p99_us: percentile_us(&lat, 99.0),
                    memcpy_gbps: None,
                    fio_gbps: fio_ref(fio_best),
                    sdk_gbps: None,
                    queue_depth: Some(a.qd),
                    ratio: fio_ref(ratio),
                    ops: n as u64 * u64::from(a.rounds),
                },
            )?;
        }
        client.delete(&ns.id, &keys)?;
    }
    Ok(())
}

/// `kvd-bench footprint`: fio's random reads next to a bare io_uring loop doing the same
/// reads into `qd` reused buffers (fio's footprint) and into one buffer per block (a cache's),
/// rounds rotating which goes first.
fn footprint(a: FootprintArgs) -> anyhow::Result<()> {
    let size = parse_size(&a.size)?;
    let total = parse_size(&a.total)?;
    let n = total / size.max(1);
    if !(1..=4096).contains(&a.qd) {
        bail!("--qd must be between 1 and 4096");
    }
    if size == 0 || size % 4096 != 0 || n < 2 * a.qd as usize {
        bail!("--size must be a multiple of 4 KiB and --total at least 2 × qd blocks");
    }
    let work = a
        .dir
        .join(format!("kvd-bench-footprint-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let _cleanup = Cleanup(work.clone());
    let len = n * size;
    let (free_huge, huge_page) = kvd_shm::map::free_huge_pages();
    let huge = match a.huge_pages {
        Pages::Explicit => true,
        Pages::Off => false,
        // This process's buffers plus fio's (qd blocks), with slack.
        Pages::Auto => {
            huge_page > 0 && free_huge >= (len + a.qd as usize * size) as u64 + (64 << 20)
        }
    };
    let pages = if huge {
        kvd_shm::map::HugePages::Explicit
    } else {
        kvd_shm::map::HugePages::Off
    };
    let fd = kvd_shm::map::create_memfd("kvd-bench-footprint", len as u64, pages)
        .context("allocating the read buffers")?;
    let map = kvd_shm::Mapping::map_fd(&fd, len, true, true).context("mapping the buffers")?;
    // SAFETY: the mapping is `len` bytes of private-to-this-process memory, alive for the
    // rest of this function, and nothing else refers to it.
    let mem = unsafe { std::slice::from_raw_parts_mut(map.as_ptr(), len) };
    let file = work.join("fio.dat");
    fio(&file, "write", size, len, a.qd, huge)?;
    let f = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&file)
            .with_context(|| format!("opening {} with O_DIRECT", file.display()))?
    };
    if !a.json {
        println!(
            "kvd-bench footprint: {} random reads of {} at QD {}, {} rounds after a warm-up, in {}, {}",
            n,
            a.size,
            a.qd,
            a.rounds,
            a.dir.display(),
            if huge { "huge pages" } else { "4 KiB pages" }
        );
        println!(
            "  fio and `reused` read into {} buffers ({} MiB); `distinct` reads each block into its own ({} MiB)",
            a.qd,
            (a.qd as usize * size) >> 20,
            len >> 20
        );
    }
    let mut order: Vec<usize> = (0..n).collect();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    // Per round: fio, reused, distinct (GB/s).
    let mut rounds: Vec<[f64; 3]> = Vec::new();
    for round in 0..=a.rounds {
        shuffle(&mut order, &mut x);
        let mut this = [0.0; 3];
        for k in 0..3 {
            let which = (k + round as usize) % 3;
            settle();
            this[which] = match which {
                0 => fio(&file, "randread", size, len, a.qd, huge)?,
                w => {
                    let slots = if w == 1 { a.qd as usize } else { n };
                    let d = kvd_benches::uring::random_reads(&f, size, &order, a.qd, mem, slots)
                        .context("io_uring reads (is io_uring allowed here?)")?;
                    gbps(len, d)
                }
            };
        }
        if round > 0 {
            if !a.json {
                println!(
                    "  round {round}: fio {:.2}  reused {:.2}  distinct {:.2} GB/s   reused/fio {:.2}  distinct/reused {:.2}",
                    this[0],
                    this[1],
                    this[2],
                    this[1] / this[0],
                    this[2] / this[1]
                );
            }
            rounds.push(this);
        }
    }
    let med = |f: &dyn Fn(&[f64; 3]) -> f64| median(rounds.iter().map(f).collect());
    for (op, col) in [("read-reused-buffers", 1), ("read-distinct-buffers", 2)] {
        emit(
            a.json,
            &Record {
                tier: "disk",
                op,
                size_bytes: size as u64,
                gbps: Some(med(&|r| r[col])),
                p50_us: 0.0,
                p99_us: 0.0,
                memcpy_gbps: None,
                fio_gbps: Some(med(&|r| r[0])),
                sdk_gbps: None,
                queue_depth: Some(a.qd),
                ratio: Some(med(&|r| r[col] / r[0])),
                ops: n as u64 * u64::from(a.rounds),
            },
        )?;
    }
    if !a.json {
        println!(
            "footprint factor (distinct / reused, median of rounds): {:.2}",
            med(&|r| r[2] / r[1])
        );
    }
    Ok(())
}

/// A private redis-server on a free loopback port, stopped on drop.
struct RedisServer {
    child: Child,
    port: u16,
    _dir: tempfile_dir::Dir,
}

impl RedisServer {
    fn start(bin: &std::path::Path, port: u16) -> anyhow::Result<RedisServer> {
        let dir =
            tempfile_dir::Dir::with_suffix("redis").context("creating a temporary directory")?;
        let child = Command::new(bin)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!("starting {} (apt-get install redis-server)", bin.display())
            })?;
        let r = RedisServer {
            child,
            port,
            _dir: dir,
        };
        let t = Instant::now();
        while r.connect().is_err() {
            if t.elapsed() > Duration::from_secs(10) {
                bail!("redis-server on port {port} did not answer within 10 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(r)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn connect(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The epoch in the bench node's lease, once it exists.
fn bench_epoch(c: &mut redis::Connection) -> anyhow::Result<Option<u64>> {
    let e: Option<String> = redis::cmd("HGET")
        .arg("kvd:node:bench")
        .arg("epoch")
        .query(c)?;
    Ok(e.and_then(|e| e.parse().ok()))
}

/// Blocks the bench node has published in `ns` (fields of its current holdings hash), and
/// whether it is in the node set.
fn published(c: &mut redis::Connection, ns: &NamespaceId) -> anyhow::Result<(usize, bool)> {
    let Some(epoch) = bench_epoch(c)? else {
        return Ok((0, false));
    };
    let n: usize = redis::cmd("HLEN")
        .arg(format!("kvd:res:bench:{epoch}:{}", ns.to_hex()))
        .query(c)?;
    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg("kvd:nodes")
        .arg("bench")
        .query(c)?;
    let member = score.is_some();
    Ok((n, member))
}

/// `kvd-bench index`: N blocks are put while the index's Redis is down, then Redis comes up
/// and kvd publishes them all (its republish path: the same pipelined batches as live
/// changes); the rate is N over the time from the node's lease appearing to the last block
/// appearing. The reference writes the same fields into the same hash with one command per
/// block and round trip, from this process to the same server. Then cluster lookups of a
/// `--chain`-key chain through kvd, p50/p99.
fn index(a: IndexArgs) -> anyhow::Result<()> {
    let n = a.blocks.max(1);
    let port = free_port()?;
    let block = vec![0x5Au8; 4096];
    let arena = n * 4096 + (64 << 20);
    let sets = vec![
        format!("index.redis_urls=redis://127.0.0.1:{port}"),
        "index.node_id=bench".into(),
        "index.timeout_ms=200".into(),
    ];
    let (_daemon, socket) = spawn_daemon_with(arena, 1 << 20, &sets)?;
    let client = admin_client(&socket)?;
    let ns = client.open_namespace(&NamespaceDesc::new(
        "kvd-bench-index",
        "bytes",
        "opaque",
        16,
    ))?;
    let keys: Vec<BlockKey> = (0..n).map(|i| key(4096, i)).collect();
    for chunk in keys.chunks(256) {
        let items: Vec<(BlockKey, &[u8])> = chunk.iter().map(|k| (*k, &block[..])).collect();
        client.put_many(&ns, &items)?;
    }
    if !a.json {
        println!("kvd-bench index: {n} blocks, Redis on 127.0.0.1:{port}");
    }
    // kvd publishes everything once Redis answers.
    let redis = RedisServer::start(&a.redis_server, port)?;
    let mut c = redis.connect()?;
    let wait_start = Instant::now();
    let mut first = None;
    loop {
        if first.is_none() && bench_epoch(&mut c)?.is_some() {
            first = Some(Instant::now());
        }
        let (k, _) = published(&mut c, &ns.id)?;
        if k >= n {
            break;
        }
        if wait_start.elapsed() > Duration::from_secs(300) {
            bail!("kvd published {k} of {n} blocks within 5 minutes");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let batched = n as f64 / first.map_or(wait_start, |f| f).elapsed().as_secs_f64();
    // Reference: the same fields into a hash of the same shape, one command per block.
    let field = |k: &BlockKey| format!("{}|dram", k.to_hex());
    let t = Instant::now();
    for k in &keys {
        redis::cmd("HSET")
            .arg("ref:res:bench")
            .arg(field(k))
            .arg("1")
            .query::<()>(&mut c)?;
    }
    let naive = n as f64 / t.elapsed().as_secs_f64();
    let ratio = batched / naive;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"tier": "index", "op": "publish", "blocks": n,
                "blocks_per_s": batched, "naive_blocks_per_s": naive, "ratio": ratio})
        );
    } else {
        println!(
            "index publish     {n:>8} blocks   kvd {batched:>10.0} blocks/s   one per round trip {naive:>9.0} blocks/s   ratio {ratio:>6.1}"
        );
    }
    // Lookups go through kvd: its index reader asks Redis for the chain.
    let chain = &keys[..a.chain.clamp(1, n)];
    let t = Instant::now();
    while !published(&mut c, &ns.id)?.1 {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("the node did not join the node set within 30 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut lat = Vec::with_capacity(a.lookups);
    for _ in 0..a.lookups.max(1) {
        let t = Instant::now();
        let r = client.cluster_lookup(&ns.id, chain)?;
        lat.push(t.elapsed().as_nanos() as u64);
        if r.prefix_len as usize != chain.len() || !r.cluster {
            bail!("a lookup saw {} of {} blocks", r.prefix_len, chain.len());
        }
    }
    lat.sort_unstable();
    let (p50, p99) = (percentile_us(&lat, 50.0), percentile_us(&lat, 99.0));
    if a.json {
        println!(
            "{}",
            serde_json::json!({"tier": "index", "op": "cluster_lookup", "chain": chain.len(),
                "p50_us": p50, "p99_us": p99, "ops": lat.len()})
        );
    } else {
        println!(
            "index lookup      chain {:>5} keys   p50 {p50:>8.1} µs   p99 {p99:>8.1} µs",
            chain.len()
        );
    }
    Ok(())
}

/// Socket buffer kvd's data connections ask for (kvd/src/peer/mod.rs), given to the reference.
const PEER_SOCKET_BUFFER: u32 = 4 << 20;

/// The references of one round: the best plain TCP copy (the kernel's autotuned socket
/// buffers and kvd's) and, with `tls`, the copy over mutual TLS pairs (same two buffer
/// settings, the better counts). Every copied byte is checked.
fn peer_references(
    src: &[u8],
    dst: &mut [u8],
    size: usize,
    conc: usize,
    tls: Option<&kvd_benches::tcp::Transport>,
) -> anyhow::Result<(f64, Option<f64>)> {
    let mut best = |t: &kvd_benches::tcp::Transport| -> anyhow::Result<f64> {
        let mut g = 0f64;
        for buffers in [None, Some(PEER_SOCKET_BUFFER)] {
            dst.fill(0);
            let took = kvd_benches::tcp::copy(src, dst, size, conc, buffers, t)?;
            if dst != src {
                bail!("the reference copied wrong bytes");
            }
            g = g.max(gbps(src.len(), took));
        }
        Ok(g)
    };
    let tcp = best(&kvd_benches::tcp::Transport::Tcp)?;
    let tls = tls.map(&mut best).transpose()?;
    Ok((tcp, tls))
}

/// Certificates for two bench nodes under one CA made for the run: each node's `--set`
/// arguments, and the reference's transport (A receives, B sends, as in a fetch).
fn peer_tls(dir: &Path) -> anyhow::Result<([Vec<String>; 2], kvd_benches::tcp::Transport)> {
    use kvd_tests::pki::{Ca, Validity};
    let ca = Ca::new("kvd-bench");
    let a = ca.node(dir, "a", "bench-a", Validity::Current);
    let b = ca.node(dir, "b", "bench-b", Validity::Current);
    let t = kvd_benches::tcp::Transport::mutual_tls(
        &a.ca,
        (&a.cert, &a.key),
        (&b.cert, &b.key),
        "bench-a",
    )?;
    Ok(([a.sets(), b.sets()], t))
}

/// `kvd-bench peer`: node A holds `--total` bytes of blocks; each round node B's DRAM is
/// emptied and one lookup of the whole chain on B fetches them all from A (index query, data
/// port, checksum verification, commit into B's arena). The reference copies the same bytes
/// between two buffers over the same number of loopback TCP connections, in the same run,
/// with the kernel's autotuned socket buffers and with kvd's, and the faster counts; with
/// `--tls`, over rustls pairs doing mutual TLS with the same certificates.
fn peer(a: PeerArgs) -> anyhow::Result<()> {
    let (sizes, total, max) = parse_sizes(&a.sizes, &a.total)?;
    let conc = a.concurrency.clamp(1, 256);
    let port = free_port()?;
    let _redis = RedisServer::start(&a.redis_server, port)?;
    let arena = total + 2 * max + (64 << 20);
    let pki = tempfile_dir::Dir::with_suffix("pki").context("a directory for certificates")?;
    let (tls_sets, transport) = if a.tls {
        let (sets, t) = peer_tls(pki.path())?;
        (sets, Some(t))
    } else {
        let off = vec!["peer.tls=off".to_string()];
        ([off.clone(), off], None)
    };
    let node = |name: &str, peer_port: u16, tls: &[String]| {
        let mut v = vec![
            format!("index.redis_urls=redis://127.0.0.1:{port}"),
            format!("index.node_id={name}"),
            "index.timeout_ms=1000".to_string(),
            format!("peer.listen=127.0.0.1:{peer_port}"),
            format!("peer.fetch_concurrency={conc}"),
            "peer.timeout_ms=30000".to_string(),
        ];
        v.extend_from_slice(tls);
        v
    };
    let (_a, sock_a) = spawn_daemon_with(arena, max, &node("bench-a", free_port()?, &tls_sets[0]))?;
    let (_b, sock_b) = spawn_daemon_with(arena, max, &node("bench-b", free_port()?, &tls_sets[1]))?;
    let (ca, cb) = (admin_client(&sock_a)?, admin_client(&sock_b)?);
    let desc = NamespaceDesc::new("kvd-bench-peer", "bytes", "opaque", 16);
    let (nsa, nsb) = (ca.open_namespace(&desc)?, cb.open_namespace(&desc)?);
    if !a.json {
        println!(
            "kvd-bench peer: {} per size and round, {conc} at a time, Redis on 127.0.0.1:{port}, {}",
            a.total,
            if a.tls { "mutual TLS" } else { "plaintext (peer.tls = off)" }
        );
    }
    for &size in &sizes {
        let n = (total / size).max(1);
        let mut src = vec![0u8; n * size];
        for (i, b) in src.chunks_mut(size).enumerate() {
            fill(b, (size * 1_000_003 + i) as u64);
        }
        let keys: Vec<BlockKey> = (0..n).map(|i| key(size, i)).collect();
        for (ks, bs) in keys.chunks(16).zip(src.chunks(16 * size)) {
            let items: Vec<(BlockKey, &[u8])> = ks.iter().copied().zip(bs.chunks(size)).collect();
            ca.put_many(&nsa, &items)?;
        }
        let t = Instant::now();
        loop {
            let r = cb.cluster_lookup(&nsb.id, &keys)?;
            if r.cluster && r.prefix_len as usize == n {
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("node A's {n} blocks did not appear in the index within 60 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut dst = vec![1u8; src.len()];
        let (mut kvd_g, mut tcp_g, mut tls_g, mut ratios) = (vec![], vec![], vec![], vec![]);
        for round in 0..=a.rounds {
            cb.evict(Some(nsb.id), &[])?;
            cb.flush()?;
            let t = Instant::now();
            let l = cb.lookup(&nsb.id, &keys)?;
            let kvd = gbps(src.len(), t.elapsed());
            if l.prefix_len as usize != n {
                bail!("node B fetched {} of {n} blocks", l.prefix_len);
            }
            if round == 0 {
                for (k, want) in keys.iter().zip(src.chunks(size)) {
                    let lease = cb.get(&nsb, k)?.context("a fetched block is not held")?;
                    if &lease[..] != want {
                        bail!("a block fetched from node A differs from what was put");
                    }
                }
            }
            let (tcp, tls) =
                peer_references(&src, &mut dst, size, conc as usize, transport.as_ref())?;
            if round > 0 {
                kvd_g.push(kvd);
                tcp_g.push(tcp);
                tls_g.extend(tls);
                ratios.push(kvd / tls.unwrap_or(tcp));
            }
        }
        let (kvd, tcp, ratio) = (median(kvd_g), median(tcp_g), median(ratios));
        let tls = (!tls_g.is_empty()).then(|| median(tls_g));
        if a.json {
            println!(
                "{}",
                serde_json::json!({"tier": "peer", "op": "fetch", "size_bytes": size,
                    "blocks": n, "concurrency": conc, "tls": a.tls, "gbps": kvd,
                    "tcp_gbps": tcp, "tls_gbps": tls, "ratio": ratio, "rounds": a.rounds})
            );
        } else if let Some(tls) = tls {
            println!(
                "peer  fetch  {:>8} KiB  x{n:<5} kvd/mTLS {kvd:>6.2} GB/s  rustls mTLS {tls:>6.2} GB/s  ratio {ratio:>5.2}  (plain TCP {tcp:>6.2} GB/s)",
                size / 1024
            );
        } else {
            println!(
                "peer  fetch  {:>8} KiB  x{n:<5} kvd {kvd:>6.2} GB/s  plain TCP {tcp:>6.2} GB/s  ratio {ratio:>5.2}",
                size / 1024
            );
        }
        ca.delete(&nsa.id, &keys)?;
        cb.delete(&nsb.id, &keys)?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Peer(a) => peer(a),
        Cmd::Dram(a) => dram(a),
        Cmd::Disk(a) => disk(a),
        Cmd::Footprint(a) => footprint(a),
        Cmd::Index(a) => index(a),
        Cmd::Gpu(a) => gpu::run(a),
        Cmd::S3(a) => s3::run(a),
    }
}
