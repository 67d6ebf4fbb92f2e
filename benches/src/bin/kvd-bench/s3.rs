//! `kvd-bench s3`: the S3 tier's upload and ranged-read throughput through kvd, beside a plain
//! AWS SDK client doing the same transfers against the same server in the same run.
//!
//! Per size and round, kvd (spawned, DRAM only plus the S3 tier) is given every block, then a
//! drain uploads them all, packed into segments (`--segment-bytes`), timed until the last
//! segment is in the bucket; the reference PUTs objects of the segment size, as many bytes,
//! with the same concurrency. Then a fresh kvd (empty DRAM, the bucket listed at start)
//! answers lookups of `--batch` keys at a time, each reading the blocks it lacks with ranged
//! GETs into DRAM (checksums verified); the reference issues ranged GETs of exactly the same
//! byte ranges of the same segment objects, the same number at once, batch by batch. Every
//! block kvd read is then compared byte for byte (untimed). Rounds alternate which side goes
//! first; medians are reported, with the median of the per-round ratios.
//!
//! Without `--endpoint` the bench starts a private s3s-fs on 127.0.0.1 (`--s3s-fs`, installed
//! by `scripts/s3-servers.sh`), so nothing leaves the machine.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use futures_util::StreamExt;
use kvd_benches::{fill, Record};
use kvd_client::{Client, NamespaceDesc};
use kvd_proto::segment;

use super::{admin_client, emit, gbps, key, median, parse_sizes, spawn_daemon_with};

#[derive(Debug, clap::Args)]
pub struct S3Args {
    /// S3 endpoint; empty: start a private s3s-fs on 127.0.0.1.
    #[arg(long, default_value = "")]
    endpoint: String,
    /// s3s-fs binary for the private server.
    #[arg(long, default_value = "~/.cache/kvd/tools/bin/s3s-fs")]
    s3s_fs: String,
    /// Bucket (created in the private server; must exist on `--endpoint`).
    #[arg(long, default_value = "kvd-bench")]
    bucket: String,
    /// Access key (private server: its own; else also AWS_ACCESS_KEY_ID).
    #[arg(long, env = "AWS_ACCESS_KEY_ID", default_value = "kvdbenchaccess")]
    access_key: String,
    /// Secret key (private server: its own; else also AWS_SECRET_ACCESS_KEY).
    #[arg(
        long,
        env = "AWS_SECRET_ACCESS_KEY",
        default_value = "kvdbenchsecret0123456789",
        hide_env_values = true
    )]
    secret_key: String,
    /// Block sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "64KiB,1MiB,4MiB")]
    sizes: Vec<String>,
    /// Bytes moved per size, direction and round. kvd packs a segment before its first
    /// upload starts (the reference's objects exist already): on a small total that ramp
    /// (~50–100 ms here) weighs in the ratio; a drain moves gigabytes.
    #[arg(long, default_value = "1GiB")]
    total: String,
    /// kvd's segment size (`s3.segment_bytes`), and the reference's object size.
    #[arg(long, default_value = "32MiB")]
    segment_bytes: String,
    /// Uploads in flight at once, both sides (`s3.upload_concurrency`).
    #[arg(long, default_value_t = 4)]
    upload_concurrency: u32,
    /// Ranged GETs in flight at once, both sides (`s3.read_concurrency`).
    #[arg(long, default_value_t = 8)]
    read_concurrency: u32,
    /// Keys per lookup (a prompt's blocks), and per reference batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Measured rounds per size.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

/// A private s3s-fs, killed on drop.
struct Server {
    child: Child,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_server(a: &S3Args) -> anyhow::Result<(Server, String)> {
    let bin = match a.s3s_fs.strip_prefix("~/") {
        Some(rest) => PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(rest),
        None => PathBuf::from(&a.s3s_fs),
    };
    if !bin.exists() {
        bail!(
            "{} not found: run scripts/s3-servers.sh, or pass --s3s-fs or --endpoint",
            bin.display()
        );
    }
    let port = super::free_port()?;
    let dir = std::env::temp_dir().join(format!("kvd-bench-s3-{}", std::process::id()));
    std::fs::create_dir_all(dir.join(&a.bucket)).context("creating the server's directory")?;
    let child = Command::new(&bin)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", &a.access_key, "--secret-key", &a.secret_key])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let server = Server { child, dir };
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t.elapsed() > Duration::from_secs(20) {
            bail!("s3s-fs did not listen within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((server, format!("http://127.0.0.1:{port}")))
}

/// The reference: the AWS SDK's client, configured as kvd configures its own.
fn sdk_client(a: &S3Args, endpoint: &str) -> aws_sdk_s3::Client {
    use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(Credentials::new(
            &a.access_key,
            &a.secret_key,
            None,
            None,
            "kvd-bench",
        ))
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

struct Ctx<'a> {
    a: &'a S3Args,
    endpoint: String,
    sdk: aws_sdk_s3::Client,
    rt: tokio::runtime::Runtime,
    segment: usize,
}

impl Ctx<'_> {
    fn kvd_sets(&self, prefix: &str) -> Vec<String> {
        let a = self.a;
        vec![
            format!("s3.bucket={}", a.bucket),
            format!("s3.endpoint={}", self.endpoint),
            "s3.path_style=true".into(),
            format!("s3.access_key_id={}", a.access_key),
            format!("s3.secret_access_key={}", a.secret_key),
            format!("s3.prefix={prefix}"),
            format!("s3.segment_bytes={}", self.segment),
            // Single PUTs of whole segments, like the reference.
            format!(
                "s3.part_bytes={}",
                (2 * self.segment).clamp(5 << 20, 1 << 30)
            ),
            format!("s3.upload_concurrency={}", a.upload_concurrency),
            format!("s3.read_concurrency={}", a.read_concurrency),
            // Puts alone are not admitted (seen once): only the timed drain uploads.
            "s3.admission=frequency".into(),
            "s3.admission_min_frequency=2".into(),
            "s3.flush_interval_ms=3600000".into(),
            "s3.lookup_timeout_ms=600000".into(),
            "s3.request_timeout_ms=600000".into(),
            "s3.rescan_interval_ms=0".into(),
        ]
    }

    /// kvd: put every block, then time the drain until every block is in the bucket.
    fn kvd_upload(&self, c: &Client, size: usize, n: usize) -> anyhow::Result<Duration> {
        let ns = c.open_namespace(&NamespaceDesc::new("s3-bench", "bfloat16", "LBHNC", 16))?;
        let mut buf = vec![0u8; size];
        for i in 0..n {
            fill(&mut buf, i as u64);
            c.put(&ns, &key(size, i), &buf)?;
        }
        // The daemon checksums each block shortly after its commit (DRAM-tier work, done
        // whether or not S3 is configured): let it finish before the upload is timed.
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        c.drain(None)?;
        loop {
            let r = c.stats()?.s3.context("kvd reports no S3 tier")?;
            if r.uploaded_blocks >= n as u64 && r.uploading == 0 {
                return Ok(t.elapsed());
            }
            if r.upload_failures > 0 || r.degraded {
                bail!("kvd's uploads failed: {}", r.last_error);
            }
            if t.elapsed() > Duration::from_secs(1800) {
                bail!("kvd's drain did not finish in 30 minutes");
            }
            // Often enough for a fine end time, rarely enough not to take CPU from the upload.
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Reference: as many bytes in objects of the segment size, `upload_concurrency` at once.
    fn sdk_upload(&self, prefix: &str, bytes: usize) -> anyhow::Result<Duration> {
        let mut body = vec![0u8; self.segment];
        fill(&mut body, 7);
        let body = bytes::Bytes::from(body);
        let objects = bytes.div_ceil(self.segment);
        let conc = self.a.upload_concurrency as usize;
        let t = Instant::now();
        let results: Vec<anyhow::Result<()>> = self.rt.block_on(
            futures_util::stream::iter((0..objects).map(|i| {
                let (sdk, body, bucket) = (self.sdk.clone(), body.clone(), self.a.bucket.clone());
                let key = format!("{prefix}/ref/{i:08}");
                async move {
                    sdk.put_object()
                        .bucket(bucket)
                        .key(key)
                        .content_length(body.len() as i64)
                        .body(ByteStream::from(body))
                        .send()
                        .await
                        .map(|_| ())
                        .map_err(sdk_error)
                }
            }))
            .buffer_unordered(conc)
            .collect(),
        );
        let took = t.elapsed();
        for r in results {
            r.context("reference PUT")?;
        }
        Ok(took)
    }

    /// kvd: lookups of `batch` keys on a node with empty DRAM; every block then verified.
    fn kvd_read(&self, c: &Client, size: usize, n: usize) -> anyhow::Result<Duration> {
        let ns = c.open_namespace(&NamespaceDesc::new("s3-bench", "bfloat16", "LBHNC", 16))?;
        let keys: Vec<_> = (0..n).map(|i| key(size, i)).collect();
        let t = Instant::now();
        for chunk in keys.chunks(self.a.batch) {
            let l = c.lookup(&ns.id, chunk)?;
            if l.prefix_len as usize != chunk.len() {
                bail!(
                    "kvd found {} of {} blocks in S3: {:?}",
                    l.prefix_len,
                    chunk.len(),
                    c.stats()?.s3
                );
            }
        }
        let took = t.elapsed();
        let mut want = vec![0u8; size];
        for (i, k) in keys.iter().enumerate() {
            fill(&mut want, i as u64);
            let lease = c.get(&ns, k)?.context("a block read from S3 is gone")?;
            if lease[..] != want[..] {
                bail!("block {i} of {size} bytes read back from S3 with wrong bytes");
            }
        }
        Ok(took)
    }

    /// Every object under `prefix` (key, size), all pages of the listing.
    async fn list(&self, prefix: &str) -> anyhow::Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let page = self
                .sdk
                .list_objects_v2()
                .bucket(&self.a.bucket)
                .prefix(prefix)
                .set_continuation_token(token)
                .send()
                .await
                .map_err(sdk_error)?;
            for o in page.contents() {
                if let (Some(k), Some(len)) = (o.key(), o.size()) {
                    out.push((k.to_owned(), len as u64));
                }
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => return Ok(out),
            }
        }
    }

    /// The (object, offset, len) of every block kvd wrote under `prefix`, in key order.
    fn ranges(
        &self,
        prefix: &str,
        size: usize,
        n: usize,
    ) -> anyhow::Result<Vec<(String, u64, u64)>> {
        let mut by_key = std::collections::HashMap::new();
        self.rt.block_on(async {
            for (name, len) in self.list(&format!("{prefix}/segments/")).await? {
                let obj = self
                    .sdk
                    .get_object()
                    .bucket(&self.a.bucket)
                    .key(&name)
                    .send()
                    .await
                    .map_err(sdk_error)?
                    .body
                    .collect()
                    .await?
                    .into_bytes();
                if obj.len() as u64 != len {
                    bail!("segment {name}: {} bytes, listed as {len}", obj.len());
                }
                let (_, entries) = segment::decode(&obj)?;
                for e in entries {
                    by_key.insert(e.key, (name.clone(), e.offset, e.len));
                }
            }
            Ok::<(), anyhow::Error>(())
        })?;
        (0..n)
            .map(|i| {
                by_key
                    .remove(&key(size, i))
                    .with_context(|| format!("block {i} is in no segment"))
            })
            .collect()
    }

    /// Deletes everything a round wrote under `prefix` (a run moves gigabytes per size).
    fn cleanup(&self, prefix: &str) -> anyhow::Result<()> {
        self.rt.block_on(async {
            for (k, _) in self.list(&format!("{prefix}/")).await? {
                self.sdk
                    .delete_object()
                    .bucket(&self.a.bucket)
                    .key(k)
                    .send()
                    .await
                    .map_err(sdk_error)?;
            }
            Ok(())
        })
    }

    /// Reference: ranged GETs of the same ranges, batch by batch, `read_concurrency` at once.
    fn sdk_read(&self, ranges: &[(String, u64, u64)]) -> anyhow::Result<Duration> {
        let conc = self.a.read_concurrency as usize;
        let t = Instant::now();
        for chunk in ranges.chunks(self.a.batch) {
            let results: Vec<anyhow::Result<()>> = self.rt.block_on(
                futures_util::stream::iter(chunk.iter().map(|(name, off, len)| {
                    let sdk = self.sdk.clone();
                    let bucket = self.a.bucket.clone();
                    let (name, off, len) = (name.clone(), *off, *len);
                    async move {
                        let body = sdk
                            .get_object()
                            .bucket(bucket)
                            .key(name)
                            .range(format!("bytes={off}-{}", off + len - 1))
                            .send()
                            .await
                            .map_err(sdk_error)?
                            .body
                            .collect()
                            .await?
                            .into_bytes();
                        if body.len() as u64 != len {
                            bail!("ranged GET returned {} bytes, asked {len}", body.len());
                        }
                        Ok(())
                    }
                }))
                .buffer_unordered(conc)
                .collect(),
            );
            for r in results {
                r.context("reference ranged GET")?;
            }
        }
        Ok(t.elapsed())
    }
}

/// An SDK error with its causes (the SDK's own `Display` says only "service error").
fn sdk_error<E: std::error::Error>(e: E) -> anyhow::Error {
    anyhow::anyhow!("{}", aws_sdk_s3::error::DisplayErrorContext(e))
}

fn record(op: &'static str, size: usize, kvd: f64, sdk: f64, ratio: f64, ops: u64) -> Record {
    Record {
        tier: "s3",
        op,
        size_bytes: size as u64,
        gbps: Some(kvd),
        p50_us: f64::NAN,
        p99_us: f64::NAN,
        memcpy_gbps: None,
        fio_gbps: None,
        sdk_gbps: Some(sdk),
        queue_depth: None,
        ratio: Some(ratio),
        ops,
    }
}

pub fn run(a: S3Args) -> anyhow::Result<()> {
    let (sizes, total, max) = parse_sizes(&a.sizes, &a.total)?;
    let segment = super::parse_size(&a.segment_bytes)?;
    if segment < max {
        bail!("--segment-bytes must be at least the largest block size");
    }
    let (_server, endpoint) = if a.endpoint.is_empty() {
        let (s, e) = start_server(&a)?;
        (Some(s), e)
    } else {
        (None, a.endpoint.clone())
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let ctx = Ctx {
        sdk: sdk_client(&a, &endpoint),
        a: &a,
        endpoint,
        rt,
        segment,
    };
    let arena = (total * 2).next_multiple_of(64 << 20).max(256 << 20);
    let run_id = std::process::id();
    for &size in &sizes {
        let n = (total / size).max(1);
        let bytes = n * size;
        let (mut up, mut rd) = (Vec::new(), Vec::new());
        for round in 0..a.rounds {
            let prefix = format!("bench-{run_id}-{size}-{round}");
            let sets = ctx.kvd_sets(&prefix);
            let kvd_first = round % 2 == 0;
            // Uploads.
            let (daemon, socket) = spawn_daemon_with(arena, max, &sets)?;
            let c = admin_client(&socket)?;
            let sdk_up = if kvd_first {
                None
            } else {
                Some(ctx.sdk_upload(&prefix, bytes)?)
            };
            let kvd_up = ctx.kvd_upload(&c, size, n)?;
            let sdk_up = match sdk_up {
                Some(d) => d,
                None => ctx.sdk_upload(&prefix, bytes)?,
            };
            drop(c);
            drop(daemon);
            // Reads, by a fresh node that lists the bucket at start.
            let ranges = ctx.ranges(&prefix, size, n)?;
            let (daemon, socket) = spawn_daemon_with(arena, max, &sets)?;
            let c = admin_client(&socket)?;
            let t = Instant::now();
            while !c.stats()?.s3.is_some_and(|s| s.scanned) {
                if t.elapsed() > Duration::from_secs(60) {
                    bail!("kvd did not list the bucket within 60 s");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let sdk_rd = if kvd_first {
                None
            } else {
                Some(ctx.sdk_read(&ranges)?)
            };
            let kvd_rd = ctx.kvd_read(&c, size, n)?;
            let sdk_rd = match sdk_rd {
                Some(d) => d,
                None => ctx.sdk_read(&ranges)?,
            };
            drop(c);
            drop(daemon);
            ctx.cleanup(&prefix)
                .context("deleting the round's objects")?;
            up.push((gbps(bytes, kvd_up), gbps(bytes, sdk_up)));
            rd.push((gbps(bytes, kvd_rd), gbps(bytes, sdk_rd)));
        }
        for (op, v) in [("upload", &up), ("read", &rd)] {
            let kvd = median(v.iter().map(|x| x.0).collect());
            let sdk = median(v.iter().map(|x| x.1).collect());
            let ratio = median(v.iter().map(|x| x.0 / x.1).collect());
            emit(a.json, &record(op, size, kvd, sdk, ratio, n as u64))?;
        }
    }
    Ok(())
}
