//! Daemon configuration: one struct, layered file → environment → command line, validated once.
//!
//! Every key has a default (`serde(default)`), unknown keys are errors, and [`Config::validate`]
//! checks ranges and relations with messages that name the key, so a typo fails at start rather
//! than at 3 a.m. Environment overrides are `KVD_<SECTION>_<KEY>` (e.g. `KVD_DRAM_ARENA_BYTES`;
//! other `KVD_*` variables such as `KVD_SOCKET` are left to the tools that read them);
//! command-line overrides are `--set section.key=value`. Values are TOML literals, with bare
//! strings accepted. Sizes take integers or strings with units (`"64 MiB"`, `"1G"`).
//! Secrets ([`secret`]) never print, in errors of any source included.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use crate::disk::admission::AdmissionPolicy;

pub mod secret;
pub use secret::{Secret, SecretUrl};

/// A size in bytes, written as an integer or a string with a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `"64MiB"`, `"64 MiB"`, `"1G"`, `"512k"`, `"4096"`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size (try \"64 MiB\")"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            "t" | "tb" | "tib" => 1 << 40,
            other => return Err(format!("unknown size unit {other:?} in {s:?}")),
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} overflows"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// Control socket and peer checks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Path of the Unix control socket.
    pub socket_path: PathBuf,
    /// Permission bits of the socket file.
    pub socket_mode: u32,
    /// Peer uids allowed to connect (besides the daemon's own uid, and root when
    /// `root_is_admin`).
    pub allowed_uids: Vec<u32>,
    /// Peer gids allowed to connect.
    pub allowed_gids: Vec<u32>,
    /// Peer uids allowed admin operations (besides the daemon's own uid, and root when
    /// `root_is_admin`).
    pub admin_uids: Vec<u32>,
    /// Whether uid 0 may connect and use admin operations without being listed. Off by
    /// default: root inside an engine container is uid 0 on the node too.
    pub root_is_admin: bool,
    /// Which peers may open which tenants' namespaces (`[[server.tenants]]` with `uids`,
    /// `gids` — the peer's primary gid — and `tenants` patterns: exact, `prefix*` or `*`).
    /// Empty: the empty tenant is shared, any other belongs to the first uid to open it.
    pub tenants: Vec<TenantRule>,
    /// Most concurrent client connections (a connection counts once it has sent its first
    /// frame).
    pub max_clients: u32,
    /// Most namespaces one uid may have bound to arenas at once (0: no cap beyond
    /// `dram.max_namespaces`), so one client cannot take every arena.
    pub max_namespaces_per_uid: u32,
    /// Most namespaces one tenant (the part of its name before any `|`) may have bound to
    /// arenas at once, whichever uids opened them (0: no cap).
    pub max_namespaces_per_tenant: u32,
    /// A new connection must send its first frame (Hello) within this, or it is closed.
    pub handshake_timeout_ms: u32,
    /// A client holding nothing (no namespace open, no KV buffers attached) that sends
    /// nothing for this long is disconnected.
    pub idle_timeout_ms: u32,
    /// Delete whatever sits at `socket_path` at start; by default only a socket of the
    /// daemon's own uid (a dead daemon's) is replaced.
    pub replace_socket: bool,
    /// Largest control frame accepted.
    pub max_frame_bytes: ByteSize,
    /// On SIGTERM, after the last client is closed, DRAM blocks without a disk copy are
    /// written to the disk tier for at most this long (0: not at all). Keep it below the
    /// pod's terminationGracePeriodSeconds.
    pub shutdown_drain_ms: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            socket_path: PathBuf::from("/run/kvd/kvd.sock"),
            socket_mode: 0o660,
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            admin_uids: Vec::new(),
            root_is_admin: false,
            tenants: Vec::new(),
            max_clients: 64,
            max_namespaces_per_uid: 0,
            max_namespaces_per_tenant: 0,
            handshake_timeout_ms: 5000,
            idle_timeout_ms: 300_000,
            replace_socket: false,
            max_frame_bytes: ByteSize(1 << 20),
            shutdown_drain_ms: 20_000,
        }
    }
}

/// One rule of `server.tenants`: peers of these uids or gids may open these tenants.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantRule {
    /// Peer uids.
    pub uids: Vec<u32>,
    /// Peer (primary) gids.
    pub gids: Vec<u32>,
    /// Tenant patterns: an exact name (`""` is the empty tenant), a prefix ending in `*`,
    /// or `*` for any.
    pub tenants: Vec<String>,
}

/// Shared-memory rings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RingConfig {
    /// Entries per submission/completion queue (power of two, 8..=65536).
    pub entries: u32,
    /// How long a ring thread spins for work before sleeping, in microseconds.
    pub spin_us: u64,
    /// Read leases not released within this time are reclaimed.
    pub lease_timeout_ms: u32,
}

impl Default for RingConfig {
    fn default() -> Self {
        Self {
            entries: 256,
            spin_us: 200,
            lease_timeout_ms: 30_000,
        }
    }
}

/// Huge-page policy of the arenas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HugePagesMode {
    /// 4 KiB pages.
    Off,
    /// Transparent huge pages (best effort).
    Transparent,
    /// hugetlbfs pages; fails at start when none are reserved.
    Explicit,
}

/// DRAM tier.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DramConfig {
    /// Size of each namespace's arena.
    pub arena_bytes: ByteSize,
    /// Most namespaces served at once; this many arenas are created at start.
    pub max_namespaces: u32,
    /// Largest block accepted.
    pub max_block_bytes: ByteSize,
    /// Eviction starts when an arena is fuller than this fraction.
    pub high_watermark: f64,
    /// Eviction stops at this fraction.
    pub low_watermark: f64,
    /// Huge pages for the arenas.
    pub huge_pages: HugePagesMode,
    /// Fault every arena page in at start (recommended: faults on the data path cost ~5×).
    pub prefault: bool,
}

impl Default for DramConfig {
    fn default() -> Self {
        Self {
            arena_bytes: ByteSize(1 << 30),
            max_namespaces: 4,
            max_block_bytes: ByteSize(8 << 20),
            high_watermark: 0.95,
            low_watermark: 0.90,
            huge_pages: HugePagesMode::Off,
            prefault: true,
        }
    }
}

/// Which block IO engine the disk tier uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskEngine {
    /// io_uring on a dedicated thread (falls back to psync with a warning where unavailable).
    IoUring,
    /// `pread`/`pwrite` on a few threads.
    Psync,
}

/// How the disk tier picks a region to reclaim when it is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReclaimPolicy {
    /// Oldest region first.
    Fifo,
    /// Region whose blocks were read least recently first.
    Lru,
}

/// Disk (NVMe) tier: a log of region files plus a RocksDB catalog under `path`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiskConfig {
    /// Total bytes of region files; 0 disables the disk tier.
    pub capacity_bytes: ByteSize,
    /// Directory holding `regions/` and `catalog/`.
    pub path: PathBuf,
    /// Size of one region file (the unit of reclaim).
    pub region_bytes: ByteSize,
    /// IO engine.
    pub engine: DiskEngine,
    /// Bypass the page cache (O_DIRECT); turned off with a warning where unsupported (tmpfs).
    pub direct_io: bool,
    /// Most IOs in flight.
    pub io_depth: u32,
    /// Reserve the region files' space at start (fallocate).
    pub preallocate: bool,
    /// Which region to reclaim when full.
    pub reclaim: ReclaimPolicy,
    /// Which demoted blocks are written.
    pub admission: crate::disk::admission::AdmissionPolicy,
    /// Sightings needed with `admission = "frequency"`.
    pub admission_min_frequency: u8,
    /// Demotion starts when a namespace's arena is fuller than this fraction.
    pub demote_watermark: f64,
    /// The catalog's write-ahead log is synced with the batch that records written blocks
    /// at most this often (0: with every batch, the default). Region data is always written
    /// durably (`O_DSYNC`) before the catalog names it; a power failure within this window
    /// loses at most the last catalog batches (those blocks become misses, never wrong).
    pub catalog_sync_ms: u32,
    /// Most space one tenant's blocks (the base of its name: all its salts together) may
    /// take on this node's disk tier (0: no cap beyond `capacity_bytes`). A tenant at its cap
    /// loses its own least recently used blocks to its new ones, never another tenant's.
    pub max_bytes_per_tenant: ByteSize,
}

impl Default for DiskConfig {
    fn default() -> Self {
        Self {
            capacity_bytes: ByteSize(0),
            path: PathBuf::from("/var/lib/kvd"),
            region_bytes: ByteSize(256 << 20),
            engine: DiskEngine::IoUring,
            direct_io: true,
            io_depth: 32,
            preallocate: true,
            reclaim: ReclaimPolicy::Fifo,
            admission: crate::disk::admission::AdmissionPolicy::Frequency,
            admission_min_frequency: 2,
            demote_watermark: 0.7,
            catalog_sync_ms: 0,
            max_bytes_per_tenant: ByteSize(0),
        }
    }
}

/// Cluster index: where this node publishes what it holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IndexConfig {
    /// Redis or Valkey URLs (`redis://[:password@]host:port[/db]`, `rediss://` for TLS);
    /// empty: no cluster index, kvd answers from its local index only. Several URLs, or
    /// `cluster = true`, mean a Redis Cluster whose seed nodes these are. One URL may be
    /// given as a plain string.
    #[serde(deserialize_with = "one_or_many")]
    pub redis_urls: Vec<SecretUrl>,
    /// Talk Redis Cluster protocol (slot routing) even with one seed URL.
    pub cluster: bool,
    /// This node's name in the index; empty: the host name.
    pub node_id: String,
    /// Prefix of every Redis key kvd writes.
    pub key_prefix: String,
    /// A node whose heartbeat is older than this stops counting in lookups.
    pub lease_ttl_ms: u32,
    /// How often changes are collected and sent (one pipelined batch per round trip).
    pub publish_interval_ms: u32,
    /// Most commands in one pipeline.
    pub batch_commands: u32,
    /// Most changes a tier keeps between two publishing rounds (of the index or the KV
    /// events); beyond it the node republishes everything it holds.
    pub journal_changes: u32,
    /// Timeout of one Redis connection attempt or pipeline.
    pub timeout_ms: u32,
}

/// A list of strings, or one string as a list of one (handy in `--set` and environment
/// variables).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<SecretUrl>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(SecretUrl),
        Many(Vec<SecretUrl>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            redis_urls: Vec::new(),
            cluster: false,
            node_id: String::new(),
            key_prefix: "kvd".into(),
            lease_ttl_ms: 10_000,
            publish_interval_ms: 20,
            batch_commands: 4096,
            journal_changes: 1 << 17,
            timeout_ms: 2000,
        }
    }
}

impl IndexConfig {
    /// Whether a cluster index is configured.
    pub fn enabled(&self) -> bool {
        !self.redis_urls.is_empty()
    }
}

/// How KV events are laid out on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventForm {
    /// Events as msgpack maps with a `type` field (vLLM ≥ 0.28, llm-d).
    Map,
    /// Events as positional arrays, the type name first (vLLM before 0.28).
    Array,
}

/// vLLM-format KV events over ZMQ, for prefix-cache-aware routers (llm-d).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// ZMQ endpoint of the PUB socket; empty: no events. Like vLLM, an endpoint with `*`
    /// (`tcp://*:5557`) or an `ipc://` one is bound, any other (`tcp://router:5557`) is
    /// connected to (a subscriber that binds, as llm-d's does).
    pub endpoint: String,
    /// ZMQ endpoint bound by a ROUTER socket that replays recent batches to a subscriber
    /// that missed some (it sends the first sequence number it wants); empty: none.
    pub replay_endpoint: String,
    /// Pod part of the topic `kv@<pod>@<model>`: in Kubernetes, the vLLM pod's `ip:port`
    /// the router scores (downward API); empty: this host's name.
    pub pod: String,
    /// Map (default) or array events.
    pub form: EventForm,
    /// `medium` of blocks in DRAM.
    pub medium_dram: String,
    /// `medium` of blocks on the disk tier.
    pub medium_disk: String,
    /// `medium` of blocks in the object store.
    pub medium_s3: String,
    /// `medium` of blocks in GPU memory.
    pub medium_gpu: String,
    /// Data-parallel rank put in every batch.
    pub dp_rank: u32,
    /// How often recorded changes are turned into a batch of events.
    pub publish_interval_ms: u32,
    /// Batches kept for replay.
    pub replay_batches: u32,
    /// Blocks whose tokens and parent (sent by the engine) are remembered for their events;
    /// the oldest are forgotten first. About `32 + 4 × block_tokens` bytes each.
    pub lineage_blocks: u32,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            replay_endpoint: String::new(),
            pod: String::new(),
            form: EventForm::Map,
            medium_dram: "CPU".into(),
            medium_disk: "DISK".into(),
            medium_s3: "OBJECT_STORE".into(),
            medium_gpu: "GPU".into(),
            dp_rank: 0,
            publish_interval_ms: 20,
            replay_batches: 10_000,
            lineage_blocks: 1 << 17,
        }
    }
}

impl EventsConfig {
    /// Whether KV events are published.
    pub fn enabled(&self) -> bool {
        !self.endpoint.is_empty()
    }
}

/// Peer fetch: blocks served to, and fetched from, other kvd nodes over TCP.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeerConfig {
    /// Address the data port listens on (`0.0.0.0:7071` in a pod, `127.0.0.1:N` in tests);
    /// empty: this node neither serves nor fetches blocks.
    pub listen: String,
    /// `host:port` other nodes dial, published in this node's lease in the cluster index;
    /// empty: the listen address (which must then name a host, not `0.0.0.0`).
    pub advertise: String,
    /// A lookup that misses locally fetches the blocks the cluster index says a peer holds.
    pub fetch_on_lookup: bool,
    /// Most blocks fetched at once by one lookup (one connection each).
    pub fetch_concurrency: u32,
    /// Most peer connections served at once; more wait to be accepted.
    pub max_connections: u32,
    /// Most connections served at once from one address (a node keeps up to 16 idle ones
    /// for reuse, plus `fetch_concurrency`).
    pub max_connections_per_peer: u32,
    /// Timeout of a connection attempt, and of each block's transfer.
    pub timeout_ms: u32,
    /// `"mutual"`: every data connection is TLS with a certificate of `tls_ca` on both
    /// ends, and a dialed node must prove the name the cluster index gives it. `"off"`:
    /// plaintext, for a network nobody else can reach (kvd warns at start).
    pub tls: PeerTlsMode,
    /// This node's certificate chain (PEM), issued to `index.node_id` for server and client
    /// auth; re-read when it changes.
    pub tls_cert: PathBuf,
    /// Its private key (PEM).
    pub tls_key: PathBuf,
    /// The cluster's CA certificate(s) (PEM).
    pub tls_ca: PathBuf,
}

/// Whether the peer data port is authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerTlsMode {
    /// Mutual TLS.
    Mutual,
    /// Plaintext, unauthenticated.
    Off,
}

impl Default for PeerConfig {
    fn default() -> Self {
        Self {
            listen: String::new(),
            advertise: String::new(),
            fetch_on_lookup: true,
            fetch_concurrency: 4,
            max_connections: 64,
            max_connections_per_peer: 24,
            timeout_ms: 5000,
            tls: PeerTlsMode::Mutual,
            tls_cert: PathBuf::from("/etc/kvd/tls/tls.crt"),
            tls_key: PathBuf::from("/etc/kvd/tls/tls.key"),
            tls_ca: PathBuf::from("/etc/kvd/tls/ca.crt"),
        }
    }
}

impl PeerConfig {
    /// Whether the data port is on.
    pub fn enabled(&self) -> bool {
        !self.listen.is_empty()
    }
}

/// Prometheus metrics and health endpoints.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the HTTP endpoint (`/metrics`, `/healthz`, `/readyz`), e.g. `127.0.0.1:9464`
    /// or the pod's `0.0.0.0:9464`; empty: none.
    pub listen: String,
}

/// Which GPU driver kvd uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GpuBackendKind {
    /// No GPU work.
    Off,
    /// NVIDIA, through the CUDA driver (kvd built with the `cuda` feature).
    Cuda,
    /// Host memory standing in for a device: exercises the GPU paths without one (tests).
    Host,
}

/// GPU data movement.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GpuConfig {
    /// Driver.
    pub backend: GpuBackendKind,
    /// Device ordinal.
    pub device: u32,
    /// Pin (page-lock and map for DMA) every DRAM arena at start.
    pub pin_arenas: bool,
    /// Size of one pinning call (rounded to whole allocator chunks).
    pub pin_chunk_bytes: ByteSize,
    /// Threads pinning at once.
    pub pin_threads: u32,
    /// Device memory for the T0 block pool (0: none).
    pub pool_bytes: ByteSize,
    /// Threads computing the checksums of blocks a daemon-driven save stored.
    pub seal_threads: u32,
    /// How batches of page copies are issued on CUDA: `auto` (kvd's copy kernel for batches
    /// of small pages, one driver copy per page for large ones), `memcpy`, `batch`
    /// (`cuMemcpyBatchAsync`) or `kernel`. The host backend ignores it.
    pub copy_method: kvd_gpu::method::CopyMethod,
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self {
            backend: GpuBackendKind::Off,
            device: 0,
            pin_arenas: true,
            pin_chunk_bytes: ByteSize(1 << 30),
            pin_threads: 8,
            pool_bytes: ByteSize(0),
            seal_threads: 8,
            copy_method: kvd_gpu::method::CopyMethod::Auto,
        }
    }
}

/// When blocks go to S3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum S3WriteMode {
    /// Blocks the admission filter lets in are packed into segments in the background and a
    /// segment is uploaded when full or `s3.flush_interval_ms` after its first block.
    WriteBehind,
    /// Every block is uploaded (no admission filter), and a segment is uploaded as soon as no
    /// more blocks wait, so other nodes see blocks within one upload of their commit. The
    /// engine's PUT still never waits for S3.
    WriteThrough,
}

/// The S3 tier (T3): segment objects in an S3-compatible bucket, shared between nodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// Bucket; empty: no S3 tier.
    pub bucket: String,
    /// Endpoint URL (`http://127.0.0.1:9000` for an S3-compatible server); empty: AWS's
    /// endpoint for `region`.
    pub endpoint: String,
    /// Region (signing region for S3-compatible servers).
    pub region: String,
    /// Key prefix of every object kvd writes (`kvd/prod`); segments go under
    /// `<prefix>/segments/<namespace>/`.
    pub prefix: String,
    /// Path-style requests (`endpoint/bucket/key`), as most S3-compatible servers want.
    pub path_style: bool,
    /// Static access key id; empty: the standard AWS chain (environment variables
    /// `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, the shared profile, IRSA web identity).
    pub access_key_id: String,
    /// Static secret key (with `access_key_id`); never logged or shown.
    pub secret_access_key: Secret,
    /// File holding the static secret key instead (a mounted Kubernetes Secret).
    pub secret_access_key_file: PathBuf,
    /// Target size of one segment object.
    pub segment_bytes: ByteSize,
    /// Part size of multipart uploads; a segment larger than one part is uploaded in parts.
    pub part_bytes: ByteSize,
    /// Uploads (segments, or parts of one) in flight at once.
    pub upload_concurrency: u32,
    /// Ranged GETs in flight at once for one lookup or warm.
    pub read_concurrency: u32,
    /// A segment is uploaded at most this long after its first block (write-behind).
    pub flush_interval_ms: u32,
    /// When blocks are uploaded.
    pub write_mode: S3WriteMode,
    /// Admission to S3 in write-behind mode (the same filter as the disk tier's).
    pub admission: AdmissionPolicy,
    /// Sightings (puts, reads) before a block is admitted, with `admission = "frequency"`.
    pub admission_min_frequency: u8,
    /// Retries of a failed request (with jittered exponential backoff) before giving up.
    pub retries: u32,
    /// First backoff; doubles with each retry up to `retry_max_ms`.
    pub retry_base_ms: u32,
    /// Longest backoff.
    pub retry_max_ms: u32,
    /// Timeout of a connection attempt.
    pub connect_timeout_ms: u32,
    /// Timeout of one request attempt (a part upload or a ranged GET), body included.
    pub request_timeout_ms: u32,
    /// Consecutive failed requests that open the circuit breaker: then reads are misses and
    /// uploads wait, without asking S3, for `breaker_open_ms`, then one request probes.
    pub breaker_failures: u32,
    /// How long the breaker stays open before a probe.
    pub breaker_open_ms: u32,
    /// The most a lookup waits for blocks read from S3 (beyond: the blocks read so far).
    pub lookup_timeout_ms: u32,
    /// Segments this node wrote are deleted once older than this (0: kept).
    pub max_age_secs: u64,
    /// Total bytes of the segments this node wrote; the oldest go beyond it (0: no budget).
    pub capacity_bytes: ByteSize,
    /// Most bytes of the segments this node wrote for one tenant (the base of its name);
    /// the tenant's oldest go beyond it, checked with each reclaim pass (about once a second;
    /// 0: no cap). Counts the namespaces uploaded since this daemon started.
    pub max_bytes_per_tenant: ByteSize,
    /// How often the bucket is listed for segments other nodes wrote (0: at start and on
    /// `kvd-ctl warm` only).
    pub rescan_interval_ms: u32,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            bucket: String::new(),
            endpoint: String::new(),
            region: "us-east-1".into(),
            prefix: "kvd".into(),
            path_style: false,
            access_key_id: String::new(),
            secret_access_key: Secret::default(),
            secret_access_key_file: PathBuf::new(),
            segment_bytes: ByteSize(32 << 20),
            part_bytes: ByteSize(8 << 20),
            upload_concurrency: 4,
            read_concurrency: 8,
            flush_interval_ms: 5000,
            write_mode: S3WriteMode::WriteBehind,
            admission: AdmissionPolicy::Frequency,
            admission_min_frequency: 2,
            retries: 3,
            retry_base_ms: 100,
            retry_max_ms: 2000,
            connect_timeout_ms: 2000,
            request_timeout_ms: 30_000,
            breaker_failures: 5,
            breaker_open_ms: 10_000,
            lookup_timeout_ms: 2000,
            max_age_secs: 0,
            capacity_bytes: ByteSize(0),
            max_bytes_per_tenant: ByteSize(0),
            rescan_interval_ms: 60_000,
        }
    }
}

impl S3Config {
    /// Whether the S3 tier is on.
    pub fn enabled(&self) -> bool {
        !self.bucket.is_empty()
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `kvd=debug`.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// The whole daemon configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Control socket.
    pub server: ServerConfig,
    /// Shared-memory rings.
    pub ring: RingConfig,
    /// DRAM tier.
    pub dram: DramConfig,
    /// Disk tier.
    pub disk: DiskConfig,
    /// Cluster index.
    pub index: IndexConfig,
    /// KV events.
    pub events: EventsConfig,
    /// Peer fetch.
    pub peer: PeerConfig,
    /// Metrics and health endpoints.
    pub metrics: MetricsConfig,
    /// GPU data movement.
    pub gpu: GpuConfig,
    /// S3 tier.
    pub s3: S3Config,
    /// Logging.
    pub log: LogConfig,
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The merged configuration does not parse into the schema.
    #[error("invalid configuration{origin}: {message}")]
    Parse {
        /// Where the bad text came from.
        origin: String,
        /// Parser message (names the key).
        message: String,
    },
    /// An override names no key.
    #[error(
        "unknown configuration key `{key}` (from {origin}); keys look like `dram.arena_bytes`"
    )]
    UnknownKey {
        /// Key path.
        key: String,
        /// Where it came from.
        origin: String,
    },
    /// A value is out of range.
    #[error("invalid value for `{key}`: {why}")]
    Invalid {
        /// Key path.
        key: &'static str,
        /// What is wrong.
        why: String,
    },
}

const SECTIONS: [&str; 11] = [
    "server", "ring", "dram", "disk", "index", "events", "peer", "metrics", "gpu", "s3", "log",
];

fn parse_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

fn set_key(
    root: &mut toml::Table,
    section: &str,
    key: &str,
    raw: &str,
    origin: &str,
) -> Result<(), ConfigError> {
    let default = toml::Table::try_from(Config::default())
        .ok()
        .and_then(|t| t.get(section)?.as_table()?.get(key).cloned());
    let Some(default) = default.filter(|_| SECTIONS.contains(&section)) else {
        return Err(ConfigError::UnknownKey {
            key: format!("{section}.{key}"),
            origin: origin.into(),
        });
    };
    let entry = root
        .entry(section.to_owned())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(t) = entry else {
        return Err(ConfigError::Parse {
            origin: format!(" ({origin})"),
            message: format!("`{section}` must be a table"),
        });
    };
    // A string key takes the text as it is (a secret or a node name of digits stays text).
    let value = if default.is_str() {
        toml::Value::String(raw.to_owned())
    } else {
        parse_value(raw)
    };
    t.insert(key.to_owned(), value);
    Ok(())
}

/// A parse error of `text` (the file's own, or the merged layers'): the key and the parser's
/// message, never the offending line; `origin_of` says where a key's value came from.
fn parse_error(
    e: &toml::de::Error,
    text: &str,
    origin_of: impl Fn(&str, usize) -> String,
) -> ConfigError {
    let (key, message) = secret::describe(e, text);
    let line = e.span().map_or(0, |s| secret::line_of(text, s.start));
    let message = match &key {
        Some(k) => format!("`{k}`: {message}"),
        None => message,
    };
    ConfigError::Parse {
        origin: origin_of(key.as_deref().unwrap_or(""), line),
        message,
    }
}

/// Reads and checks the file's own text; its table.
fn load_file(p: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
        path: p.to_owned(),
        source,
    })?;
    let origin = |_: &str, line: usize| format!(" in {}, line {line}", p.display());
    // Parse against the schema first so errors point at the file's own lines.
    toml::from_str::<Config>(&text).map_err(|e| parse_error(&e, &text, origin))?;
    toml::from_str::<toml::Table>(&text).map_err(|e| parse_error(&e, &text, origin))
}

impl Config {
    /// Loads `file` (if any), applies `KVD_*` variables from `env` and `--set` overrides, then
    /// validates. No error names a value of a secret key ([`secret::SECRET_KEYS`]).
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        sets: &[String],
    ) -> Result<Config, ConfigError> {
        let mut root = match file {
            Some(p) => load_file(p)?,
            None => toml::Table::new(),
        };
        // Where each overridden key's value came from, for errors in the merged text.
        let mut origins: Vec<(String, String)> = Vec::new();
        for (k, v) in env {
            let Some(rest) = k.strip_prefix("KVD_") else {
                continue;
            };
            let lower = rest.to_ascii_lowercase();
            let (section, key) = lower.split_once('_').unwrap_or((lower.as_str(), ""));
            // Only KVD_<SECTION>_<KEY> are configuration; other KVD_* variables (KVD_CONFIG,
            // KVD_SOCKET for kvd-ctl, ...) belong to other tools.
            if !SECTIONS.contains(&section) {
                continue;
            }
            let origin = format!("environment variable {k}");
            set_key(&mut root, section, key, &v, &origin)?;
            origins.push((format!("{section}.{key}"), origin));
        }
        for s in sets {
            let (path, value) = s.split_once('=').ok_or_else(|| ConfigError::Parse {
                origin: " (--set)".into(),
                message: "a --set argument without `=`: want `section.key=value`".into(),
            })?;
            let path = path.trim();
            let (section, key) = path.split_once('.').unwrap_or((path, ""));
            let origin = format!("--set {path}");
            set_key(&mut root, section, key, value.trim(), &origin)?;
            origins.push((path.to_owned(), origin));
        }
        let text = toml::to_string(&root).map_err(|e| ConfigError::Parse {
            origin: String::new(),
            message: e.to_string(),
        })?;
        let origin = |key: &str, _: usize| {
            origins
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map_or(String::new(), |(_, o)| format!(" ({o})"))
        };
        let cfg: Config = toml::from_str(&text).map_err(|e| parse_error(&e, &text, origin))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Whether residency changes are published anywhere (cluster index or KV events), so
    /// the tiers must journal them.
    pub fn publishes_residency(&self) -> bool {
        self.index.enabled() || self.events.enabled()
    }

    fn validate_s3(&self) -> Result<(), ConfigError> {
        let bad = |key, why: String| Err(ConfigError::Invalid { key, why });
        let s = &self.s3;
        if !s.enabled() {
            return Ok(());
        }
        // The bucket naming rules every S3 implementation accepts.
        let b = &s.bucket;
        if !(3..=63).contains(&b.len())
            || !b
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
        {
            return bad(
                "s3.bucket",
                format!("{b:?} is not a bucket name (3 to 63 of a-z, 0-9, '-' and '.')"),
            );
        }
        if !(s.endpoint.is_empty()
            || s.endpoint.starts_with("http://")
            || s.endpoint.starts_with("https://"))
        {
            return bad(
                "s3.endpoint",
                format!("{:?} is not an http:// or https:// URL", s.endpoint),
            );
        }
        if s.region.is_empty() {
            return bad("s3.region", "must not be empty".into());
        }
        if s.prefix.len() > 256 || s.prefix.starts_with('/') || s.prefix.contains("//") {
            return bad(
                "s3.prefix",
                "must be at most 256 bytes, not start with '/' nor contain \"//\"".into(),
            );
        }
        if !s.access_key_id.is_empty()
            && s.secret_access_key.is_empty()
            && s.secret_access_key_file.as_os_str().is_empty()
        {
            return bad(
                "s3.access_key_id",
                "needs s3.secret_access_key or s3.secret_access_key_file".into(),
            );
        }
        if s.access_key_id.is_empty()
            && !(s.secret_access_key.is_empty() && s.secret_access_key_file.as_os_str().is_empty())
        {
            return bad(
                "s3.secret_access_key",
                "is set without s3.access_key_id".into(),
            );
        }
        // 5 MiB is S3's smallest multipart part; 5 GiB its largest single PUT.
        if !(5 << 20..=1 << 30).contains(&s.part_bytes.0) {
            return bad("s3.part_bytes", "must be between 5 MiB and 1 GiB".into());
        }
        if !(1 << 20..=4 << 30).contains(&s.segment_bytes.0) {
            return bad("s3.segment_bytes", "must be between 1 MiB and 4 GiB".into());
        }
        if s.segment_bytes.0 < self.dram.max_block_bytes.0 {
            return bad(
                "s3.segment_bytes",
                "must be at least dram.max_block_bytes (a segment holds whole blocks)".into(),
            );
        }
        if !(1..=256).contains(&s.upload_concurrency) {
            return bad("s3.upload_concurrency", "must be between 1 and 256".into());
        }
        if !(1..=256).contains(&s.read_concurrency) {
            return bad("s3.read_concurrency", "must be between 1 and 256".into());
        }
        if !(10..=3_600_000).contains(&s.flush_interval_ms) {
            return bad("s3.flush_interval_ms", "must be in 10..=3600000".into());
        }
        if s.retries > 20 {
            return bad("s3.retries", "must be at most 20".into());
        }
        if s.retry_base_ms == 0 || s.retry_base_ms > s.retry_max_ms {
            return bad(
                "s3.retry_base_ms",
                "must be at least 1 and at most s3.retry_max_ms".into(),
            );
        }
        if !(10..=600_000).contains(&s.connect_timeout_ms) {
            return bad("s3.connect_timeout_ms", "must be in 10..=600000".into());
        }
        if !(100..=3_600_000).contains(&s.request_timeout_ms) {
            return bad("s3.request_timeout_ms", "must be in 100..=3600000".into());
        }
        if s.breaker_failures == 0 {
            return bad("s3.breaker_failures", "must be at least 1".into());
        }
        if !(100..=3_600_000).contains(&s.breaker_open_ms) {
            return bad("s3.breaker_open_ms", "must be in 100..=3600000".into());
        }
        if !(10..=600_000).contains(&s.lookup_timeout_ms) {
            return bad("s3.lookup_timeout_ms", "must be in 10..=600000".into());
        }
        if s.capacity_bytes.0 > 0 && s.capacity_bytes.0 < s.segment_bytes.0 {
            return bad(
                "s3.capacity_bytes",
                "must be 0 (no budget) or at least s3.segment_bytes".into(),
            );
        }
        if s.max_bytes_per_tenant.0 > 0 && s.max_bytes_per_tenant.0 < s.segment_bytes.0 {
            return bad(
                "s3.max_bytes_per_tenant",
                "must be 0 (no cap) or at least s3.segment_bytes".into(),
            );
        }
        if s.rescan_interval_ms > 0 && s.rescan_interval_ms < 1000 {
            return bad("s3.rescan_interval_ms", "must be 0 or at least 1000".into());
        }
        Ok(())
    }

    /// Checks ranges and relations between keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, why: String| Err(ConfigError::Invalid { key, why });
        let g = &self.gpu;
        if g.backend == GpuBackendKind::Cuda && !cfg!(feature = "cuda") {
            return bad(
                "gpu.backend",
                "\"cuda\" needs a kvd built with the `cuda` feature (cargo build --features \
                 cuda; no CUDA toolkit is needed to build)"
                    .into(),
            );
        }
        if !(1..=256).contains(&g.pin_threads) {
            return bad("gpu.pin_threads", "must be between 1 and 256".into());
        }
        if g.pin_chunk_bytes.0 < 1 << 20 {
            return bad("gpu.pin_chunk_bytes", "must be at least 1 MiB".into());
        }
        if !(1..=64).contains(&g.seal_threads) {
            return bad("gpu.seal_threads", "must be between 1 and 64".into());
        }
        if g.pool_bytes.0 > 0 && g.backend == GpuBackendKind::Off {
            return bad(
                "gpu.pool_bytes",
                "a GPU block pool needs a GPU backend (gpu.backend = \"cuda\", or \"host\" in tests)"
                    .into(),
            );
        }
        self.validate_s3()?;
        let x = &self.index;
        if let Some(u) = x.redis_urls.iter().find(|u| {
            let u = u.expose();
            !(u.starts_with("redis://") || u.starts_with("rediss://"))
        }) {
            // Only the scheme and host are echoed: a URL may carry a password.
            let shown = u.expose().split('@').next_back().unwrap_or_default();
            return bad(
                "index.redis_urls",
                format!("{shown:?} is not a redis:// or rediss:// URL"),
            );
        }
        if x.key_prefix.is_empty() || x.key_prefix.len() > 64 {
            return bad("index.key_prefix", "must be 1 to 64 bytes".into());
        }
        if x.node_id.len() > 128 || x.node_id.contains(['|', ' ']) {
            return bad(
                "index.node_id",
                "must be at most 128 bytes, without '|' or spaces".into(),
            );
        }
        if x.lease_ttl_ms < 1000 {
            return bad("index.lease_ttl_ms", "must be at least 1000".into());
        }
        if x.publish_interval_ms == 0 || x.publish_interval_ms > x.lease_ttl_ms / 4 {
            return bad(
                "index.publish_interval_ms",
                "must be in 1..=index.lease_ttl_ms/4 (heartbeats ride on publishing rounds)".into(),
            );
        }
        if !(16..=1 << 20).contains(&x.batch_commands) {
            return bad("index.batch_commands", "must be in 16..=1048576".into());
        }
        if !(1024..=1 << 24).contains(&x.journal_changes) {
            return bad("index.journal_changes", "must be in 1024..=16777216".into());
        }
        if !(100..=60_000).contains(&x.timeout_ms) {
            return bad("index.timeout_ms", "must be in 100..=60000".into());
        }
        let e = &self.events;
        for (key, v) in [
            ("events.endpoint", &e.endpoint),
            ("events.replay_endpoint", &e.replay_endpoint),
        ] {
            if !(v.is_empty() || v.starts_with("tcp://") || v.starts_with("ipc://")) {
                return bad(key, format!("{v:?} is not a tcp:// or ipc:// ZMQ endpoint"));
            }
        }
        if !e.replay_endpoint.is_empty() && e.endpoint.is_empty() {
            return bad(
                "events.replay_endpoint",
                "needs events.endpoint (replay of what is never published)".into(),
            );
        }
        if e.pod.len() > 256 || e.pod.contains('@') {
            return bad(
                "events.pod",
                "must be at most 256 bytes, without '@'".into(),
            );
        }
        for (key, v) in [
            ("events.medium_dram", &e.medium_dram),
            ("events.medium_disk", &e.medium_disk),
            ("events.medium_s3", &e.medium_s3),
            ("events.medium_gpu", &e.medium_gpu),
        ] {
            if v.is_empty() || v.len() > 64 {
                return bad(key, "must be 1 to 64 bytes".into());
            }
        }
        if !(1..=60_000).contains(&e.publish_interval_ms) {
            return bad("events.publish_interval_ms", "must be in 1..=60000".into());
        }
        if !(1..=1 << 20).contains(&e.replay_batches) {
            return bad("events.replay_batches", "must be in 1..=1048576".into());
        }
        if !(1024..=1 << 26).contains(&e.lineage_blocks) {
            return bad("events.lineage_blocks", "must be in 1024..=67108864".into());
        }
        let p = &self.peer;
        if p.enabled() && p.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad(
                "peer.listen",
                format!("{:?} is not an ip:port address", p.listen),
            );
        }
        if p.enabled() {
            let shown = if p.advertise.is_empty() {
                &p.listen
            } else {
                &p.advertise
            };
            let unspecified = shown
                .parse::<std::net::SocketAddr>()
                .is_ok_and(|a| a.ip().is_unspecified() || a.port() == 0);
            if unspecified || !shown.contains(':') {
                return bad(
                    "peer.advertise",
                    format!("{shown:?} is not an address other nodes can dial (host:port); set peer.advertise"),
                );
            }
        }
        let m = &self.metrics.listen;
        if !m.is_empty() && m.parse::<std::net::SocketAddr>().is_err() {
            return bad("metrics.listen", format!("{m:?} is not an ip:port address"));
        }
        if !(1..=256).contains(&p.fetch_concurrency) {
            return bad("peer.fetch_concurrency", "must be in 1..=256".into());
        }
        if !(1..=65_536).contains(&p.max_connections) {
            return bad("peer.max_connections", "must be in 1..=65536".into());
        }
        if p.max_connections_per_peer == 0 || p.max_connections_per_peer > p.max_connections {
            return bad(
                "peer.max_connections_per_peer",
                "must be in 1..=peer.max_connections".into(),
            );
        }
        if !(100..=600_000).contains(&p.timeout_ms) {
            return bad("peer.timeout_ms", "must be in 100..=600000".into());
        }
        if self.server.socket_path.as_os_str().is_empty() {
            return bad("server.socket_path", "must not be empty".into());
        }
        if self.server.socket_path.as_os_str().len() > 100 {
            return bad(
                "server.socket_path",
                "longer than 100 bytes (Unix socket paths are limited to 108)".into(),
            );
        }
        if self.server.socket_mode > 0o777 {
            return bad(
                "server.socket_mode",
                format!("{:o} is not a permission mode", self.server.socket_mode),
            );
        }
        if self.server.max_clients == 0 || self.server.max_clients > 4096 {
            return bad("server.max_clients", "must be in 1..=4096".into());
        }
        if !(100..=60_000).contains(&self.server.handshake_timeout_ms) {
            return bad(
                "server.handshake_timeout_ms",
                "must be in 100..=60000".into(),
            );
        }
        if self.server.idle_timeout_ms < 1000 {
            return bad("server.idle_timeout_ms", "must be at least 1000".into());
        }
        let f = self.server.max_frame_bytes.0;
        if !(64 << 10..=kvd_proto::frame::MAX_FRAME_BYTES as u64).contains(&f) {
            return bad(
                "server.max_frame_bytes",
                format!(
                    "must be between 64 KiB and {} bytes",
                    kvd_proto::frame::MAX_FRAME_BYTES
                ),
            );
        }
        if kvd_proto::ring::RingLayout::new(self.ring.entries).is_err() {
            return bad("ring.entries", "must be a power of two in 8..=65536".into());
        }
        if self.ring.spin_us > 100_000 {
            return bad("ring.spin_us", "must be at most 100000 (0.1 s)".into());
        }
        if self.ring.lease_timeout_ms < 100 {
            return bad("ring.lease_timeout_ms", "must be at least 100".into());
        }
        let d = &self.dram;
        if d.max_block_bytes.0 < 4096 || d.max_block_bytes.0 > 1 << 30 {
            return bad(
                "dram.max_block_bytes",
                "must be between 4 KiB and 1 GiB".into(),
            );
        }
        if d.arena_bytes.0 < d.max_block_bytes.0.saturating_mul(2) + 4096 {
            return bad(
                "dram.arena_bytes",
                format!(
                    "must hold at least two blocks of dram.max_block_bytes ({}) plus a 4 KiB header",
                    d.max_block_bytes.0
                ),
            );
        }
        if d.max_namespaces == 0 || d.max_namespaces > 1024 {
            return bad("dram.max_namespaces", "must be in 1..=1024".into());
        }
        if !(d.high_watermark > 0.0 && d.high_watermark <= 1.0) {
            return bad("dram.high_watermark", "must be in (0, 1]".into());
        }
        if !(d.low_watermark > 0.0 && d.low_watermark <= d.high_watermark) {
            return bad(
                "dram.low_watermark",
                "must be in (0, dram.high_watermark]".into(),
            );
        }
        let k = &self.disk;
        if k.capacity_bytes.0 > 0 {
            if k.path.as_os_str().is_empty() {
                return bad("disk.path", "must not be empty".into());
            }
            let min_region = d.max_block_bytes.0.saturating_mul(2) + 4096;
            if k.region_bytes.0 < min_region || k.region_bytes.0 % 4096 != 0 {
                return bad(
                    "disk.region_bytes",
                    format!(
                        "must be a multiple of 4 KiB holding two blocks of dram.max_block_bytes \
                         plus a 4 KiB header (at least {min_region})"
                    ),
                );
            }
            if k.capacity_bytes.0 / k.region_bytes.0 < 2 {
                return bad(
                    "disk.capacity_bytes",
                    format!(
                        "must hold at least two regions of disk.region_bytes ({})",
                        k.region_bytes.0
                    ),
                );
            }
            if k.capacity_bytes.0 / k.region_bytes.0 > 1 << 20 {
                return bad(
                    "disk.capacity_bytes",
                    "more than 2^20 regions; raise disk.region_bytes".into(),
                );
            }
        }
        let t = k.max_bytes_per_tenant.0;
        if t > 0 && t < d.max_block_bytes.0 {
            return bad(
                "disk.max_bytes_per_tenant",
                format!(
                    "must be 0 (no cap) or at least dram.max_block_bytes ({})",
                    d.max_block_bytes.0
                ),
            );
        }
        if k.io_depth == 0 || k.io_depth > 4096 {
            return bad("disk.io_depth", "must be in 1..=4096".into());
        }
        if k.admission_min_frequency == 0 {
            return bad("disk.admission_min_frequency", "must be at least 1".into());
        }
        if !(k.demote_watermark >= 0.0 && k.demote_watermark <= 1.0) {
            return bad("disk.demote_watermark", "must be in [0, 1]".into());
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return bad(
                "log.level",
                format!("{:?} is not a tracing filter", self.log.level),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)], sets: &[&str]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kvd.toml");
        std::fs::write(&p, text).unwrap();
        Config::load(
            Some(&p),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
            &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(ByteSize::parse("64 MiB").unwrap().0, 64 << 20);
        assert_eq!(ByteSize::parse("1G").unwrap().0, 1 << 30);
        assert_eq!(ByteSize::parse("4096").unwrap().0, 4096);
        assert!(ByteSize::parse("12 parsecs").is_err());
        assert!(ByteSize::parse("MiB").is_err());
        assert!(ByteSize::parse("99999999999 TiB").is_err());
    }

    #[test]
    fn layers_apply_in_order() {
        let c = load(
            "[dram]\narena_bytes = \"64 MiB\"\nmax_block_bytes = \"4 MiB\"\n",
            &[
                ("KVD_DRAM_ARENA_BYTES", "128MiB"),
                ("KVD_RING_SPIN_US", "5"),
                ("HOME", "/x"),
            ],
            &["dram.arena_bytes=256 MiB", "server.socket_path=/tmp/k.sock"],
        )
        .unwrap();
        assert_eq!(c.dram.arena_bytes.0, 256 << 20);
        assert_eq!(c.dram.max_block_bytes.0, 4 << 20);
        assert_eq!(c.ring.spin_us, 5);
        assert_eq!(c.server.socket_path, PathBuf::from("/tmp/k.sock"));
    }

    #[test]
    fn index_urls_take_one_or_many_and_bad_ones_never_echo_the_password() {
        let c = load(
            "",
            &[("KVD_INDEX_REDIS_URLS", "redis://10.0.0.1:6379")],
            &[],
        )
        .unwrap();
        assert_eq!(
            c.index.redis_urls,
            [SecretUrl::new("redis://10.0.0.1:6379")]
        );
        assert!(c.index.enabled());
        let c = load(
            "[index]\nredis_urls = [\"redis://a:1\", \"redis://b:2\"]\n",
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(c.index.redis_urls.len(), 2);
        assert!(!load("", &[], &[]).unwrap().index.enabled());
        let e = load("", &[], &["index.redis_urls=http://:hunter2@h:1"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("index.redis_urls") && !e.contains("hunter2"),
            "{e}"
        );
        let e = load("", &[], &["index.node_id=a|b"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("index.node_id"), "{e}");
        let e = load("", &[], &["index.publish_interval_ms=5000"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("index.publish_interval_ms"), "{e}");
    }

    /// Each secret through each source, with a value of the wrong type (the parser's message
    /// used to quote the offending line) and with a right one (`Debug` of the whole config).
    #[test]
    fn secrets_never_appear_in_errors_or_debug_output() {
        let secret = "271828182845";
        let url = format!("redis://:{secret}@h:1");
        type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<String>);
        let wrong: [Case; 6] = [
            ("[s3]\nsecret_access_key = 271828182845\n", vec![], vec![]),
            ("[index]\nredis_urls = [271828182845]\n", vec![], vec![]),
            ("", vec![("KVD_INDEX_REDIS_URLS", "[271828182845]")], vec![]),
            (
                "",
                vec![("KVD_INDEX_REDIS_URLS", "http://:271828182845@h:1")],
                vec![],
            ),
            (
                "",
                vec![("KVD_S3_BUCKET", "bkt")],
                vec![format!("s3.secret_access_key={secret}")],
            ),
            ("", vec![], vec![format!("s3.secret_acess_key={secret}")]),
        ];
        for (file, env, sets) in wrong {
            let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
            let e = load(file, &env, &sets).unwrap_err().to_string();
            assert!(!e.contains(secret), "{e}");
            assert!(
                e.contains("secret_access_key")
                    || e.contains("redis_urls")
                    || e.contains("secret_acess_key"),
                "names the key: {e}"
            );
        }
        // A secret of digits stays text from every source.
        let c = load(
            "",
            &[("KVD_S3_SECRET_ACCESS_KEY", secret)],
            &[&format!("index.redis_urls={url}")],
        )
        .unwrap();
        assert_eq!(c.s3.secret_access_key.expose(), secret);
        assert_eq!(c.index.redis_urls[0].expose(), url);
        let shown = format!("{c:?} {}", toml::to_string(&c).unwrap());
        assert!(!shown.contains(secret), "{shown}");
        assert!(shown.contains("redis://h:1"), "{shown}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = load("[dram]\narena_byte = 1\n", &[], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("arena_byte"), "{e}");
        let e = load("", &[("KVD_DRAM_NOPE", "1")], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("KVD_DRAM_NOPE"), "{e}");
        let e = load("", &[], &["nosection.x=1"]).unwrap_err().to_string();
        assert!(e.contains("nosection.x"), "{e}");
        let e = load("", &[], &["dram.huge_pages=sometimes"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("sometimes"), "{e}");
    }

    #[test]
    fn invalid_values_are_named() {
        for (set, key) in [
            ("ring.entries=100", "ring.entries"),
            ("dram.low_watermark=0.99", "dram.low_watermark"),
            ("dram.arena_bytes=1MiB", "dram.arena_bytes"),
            ("server.max_clients=0", "server.max_clients"),
            ("log.level=[[[", "log.level"),
            ("disk.io_depth=0", "disk.io_depth"),
            ("disk.capacity_bytes=1MiB", "disk.region_bytes"),
            ("disk.admission=sometimes", "sometimes"),
            (
                "disk.max_bytes_per_tenant=1MiB",
                "disk.max_bytes_per_tenant",
            ),
            ("events.endpoint=http://x:1", "events.endpoint"),
            (
                "events.replay_endpoint=tcp://127.0.0.1:9",
                "events.replay_endpoint",
            ),
            ("events.form=columns", "columns"),
            ("events.pod=a@b", "events.pod"),
            ("events.medium_disk=", "events.medium_disk"),
            ("events.lineage_blocks=1", "events.lineage_blocks"),
            ("peer.listen=nowhere", "peer.listen"),
            ("peer.listen=0.0.0.0:7071", "peer.advertise"),
            ("peer.fetch_concurrency=0", "peer.fetch_concurrency"),
            ("metrics.listen=localhost", "metrics.listen"),
            ("gpu.seal_threads=0", "gpu.seal_threads"),
            ("gpu.pool_bytes=1GiB", "gpu.pool_bytes"),
        ] {
            let e = load("", &[], &[set]).unwrap_err().to_string();
            assert!(e.contains(key), "{set}: {e}");
        }
        let s3 = [
            "s3.bucket=kvd-test",
            "s3.endpoint=http://127.0.0.1:9000",
            "s3.max_bytes_per_tenant=1MiB",
        ];
        let e = load("", &[], &s3).unwrap_err().to_string();
        assert!(e.contains("s3.max_bytes_per_tenant"), "{e}");
    }

    #[test]
    fn example_config_is_valid_and_complete() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../config/kvd.toml"))
                .unwrap();
        let c = load(&text, &[], &[]).unwrap();
        // Every key of the schema appears in the example (documented there).
        let full = toml::to_string(&Config::default()).unwrap();
        for line in full.lines() {
            if let Some((k, _)) = line.split_once(" = ") {
                assert!(
                    text.contains(&format!("{k} =")),
                    "config/kvd.toml lacks `{k}`"
                );
            }
        }
        let _ = c;
    }
}
