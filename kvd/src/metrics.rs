//! Prometheus metrics and health endpoints, so an operator's monitoring sees what
//! `kvd-ctl status` shows, and Kubernetes can probe the daemon.
//!
//! `GET /metrics` (Prometheus text format), `GET /healthz` (the process answers) and
//! `GET /readyz` (accepting work; 503 while shutting down), over HTTP/1.1 (hyper) on
//! `metrics.listen`. Counters and gauges are read at scrape time from the same state as
//! `kvd-ctl status` ([`Daemon::stats`]: each namespace's store lock for a moment, atomics
//! elsewhere), so a scrape never waits on IO and the data path pays nothing for it. The only
//! instruments on the request path are three latency histograms (lookup, get, commit), each
//! an `Instant` and a few atomic adds per operation.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use kvd_proto::frame::{ClientInfo, StatsReport};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;

use crate::daemon::Daemon;

/// Operations whose latency is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A control-plane lookup (with any peer fetch it triggered).
    Lookup,
    /// A GET answered from DRAM.
    Get,
    /// A GET that read the block from the disk tier first.
    GetDisk,
    /// A PUT's commit.
    Commit,
    /// A daemon-driven save of engine pages (device to DRAM), the whole batch.
    GpuSave,
    /// A daemon-driven load into engine pages (DRAM to device), the whole batch.
    GpuLoad,
}

const OPS: [(Op, &str); 6] = [
    (Op::Lookup, "lookup"),
    (Op::Get, "get"),
    (Op::GetDisk, "get_disk"),
    (Op::Commit, "commit"),
    (Op::GpuSave, "gpu_save"),
    (Op::GpuLoad, "gpu_load"),
];

type OpLabels = Vec<(&'static str, &'static str)>;

/// The latency histograms, shared by every thread that serves requests.
#[derive(Debug)]
pub struct OpLatency {
    family: Family<OpLabels, Histogram>,
    each: [Histogram; OPS.len()],
}

impl Default for OpLatency {
    fn default() -> Self {
        let family = Family::<OpLabels, Histogram>::new_with_constructor(|| {
            // 1 µs … ~1 s.
            Histogram::new(exponential_buckets(1e-6, 2.0, 21))
        });
        let each = OPS.map(|(_, name)| family.get_or_create(&vec![("op", name)]).clone());
        OpLatency { family, each }
    }
}

impl OpLatency {
    /// Records one operation that took `d`.
    #[inline]
    pub fn observe(&self, op: Op, d: Duration) {
        self.each[op as usize].observe(d.as_secs_f64());
    }

    /// Records one operation started at `t`.
    #[inline]
    pub fn since(&self, op: Op, t: Instant) {
        self.observe(op, t.elapsed());
    }
}

/// Encodes everything `kvd-ctl status` knows, at scrape time.
#[derive(Debug)]
struct StatsCollector {
    daemon: Weak<Daemon>,
}

/// One gauge or counter value with its labels.
type Sample<'a, V = u64> = (Vec<(&'static str, Cow<'a, str>)>, V);

fn family<V: EncodeGaugeValue + EncodeCounterValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    kind: MetricType,
    samples: &[Sample<'_, V>],
) -> Result<(), std::fmt::Error> {
    if samples.is_empty() {
        return Ok(());
    }
    let mut m = encoder.encode_descriptor(name, help, unit, kind)?;
    for (labels, v) in samples {
        if labels.is_empty() {
            // One unlabelled sample: `name value`, not `name{} value`.
            return match kind {
                MetricType::Counter => m.encode_counter::<Vec<(String, String)>, V, f64>(v, None),
                _ => m.encode_gauge(v),
            };
        }
        let mut f = m.encode_family(labels)?;
        match kind {
            MetricType::Counter => f.encode_counter::<Vec<(String, String)>, V, f64>(v, None)?,
            _ => f.encode_gauge(v)?,
        }
    }
    Ok(())
}

fn tier_label(t: kvd_proto::Tier) -> Vec<(&'static str, Cow<'static, str>)> {
    vec![("tier", Cow::Borrowed(t.name()))]
}

fn encode_stats(s: &StatsReport, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    use MetricType::{Counter, Gauge};
    let bytes = Some(&Unit::Bytes);
    let per_tier = |f: &dyn Fn(&kvd_proto::frame::TierStats) -> u64| -> Vec<Sample<'static>> {
        s.tiers.iter().map(|t| (tier_label(t.tier), f(t))).collect()
    };
    family(
        encoder,
        "kvd_tier_capacity",
        "Capacity of each tier.",
        bytes,
        Gauge,
        &per_tier(&|t| t.capacity_bytes),
    )?;
    family(
        encoder,
        "kvd_tier_used",
        "Bytes held in each tier.",
        bytes,
        Gauge,
        &per_tier(&|t| t.used_bytes),
    )?;
    family(
        encoder,
        "kvd_tier_blocks",
        "Blocks held in each tier.",
        None,
        Gauge,
        &per_tier(&|t| t.blocks),
    )?;
    family(
        encoder,
        "kvd_hits",
        "Reads served by each tier.",
        None,
        Counter,
        &per_tier(&|t| t.hits),
    )?;
    family(
        encoder,
        "kvd_misses",
        "Reads each tier could not serve.",
        None,
        Counter,
        &per_tier(&|t| t.misses),
    )?;
    family(
        encoder,
        "kvd_evictions",
        "Blocks evicted from each tier.",
        None,
        Counter,
        &per_tier(&|t| t.evictions),
    )?;
    family(
        encoder,
        "kvd_tier_in",
        "Bytes written into each tier (DRAM: stores, promotions, peer fetches; disk: writes).",
        bytes,
        Counter,
        &per_tier(&|t| t.bytes_in),
    )?;
    family(
        encoder,
        "kvd_tier_out",
        "Bytes read out of each tier (DRAM: read leases handed out; disk: verified reads).",
        bytes,
        Counter,
        &per_tier(&|t| t.bytes_out),
    )?;
    family(
        encoder,
        "kvd_uptime_seconds",
        "Seconds since the daemon started.",
        None,
        Gauge,
        &[(vec![], s.uptime_ms as f64 / 1e3)],
    )?;

    let ns_samples = |f: &dyn Fn(&kvd_proto::frame::NamespaceStats) -> u64| -> Vec<Sample<'_>> {
        s.namespaces
            .iter()
            .map(|n| {
                (
                    vec![
                        ("namespace", Cow::Owned(n.ns.to_hex())),
                        ("model", Cow::Borrowed(n.desc.model.as_str())),
                    ],
                    f(n),
                )
            })
            .collect()
    };
    family(
        encoder,
        "kvd_namespace_used",
        "DRAM bytes held per namespace.",
        bytes,
        Gauge,
        &ns_samples(&|n| n.used_bytes),
    )?;
    family(
        encoder,
        "kvd_namespace_blocks",
        "DRAM blocks per namespace.",
        None,
        Gauge,
        &ns_samples(&|n| n.blocks),
    )?;
    family(
        encoder,
        "kvd_namespace_pinned",
        "Pinned blocks per namespace.",
        None,
        Gauge,
        &ns_samples(&|n| n.pinned),
    )?;
    family(
        encoder,
        "kvd_namespace_leases",
        "Read leases held per namespace.",
        None,
        Gauge,
        &ns_samples(&|n| n.leases),
    )?;
    family(
        encoder,
        "kvd_namespace_reserved",
        "PUT reservations open per namespace.",
        None,
        Gauge,
        &ns_samples(&|n| n.reserved),
    )?;
    family(
        encoder,
        "kvd_namespace_full_rejections",
        "PUTs refused because DRAM was full of pinned or leased blocks.",
        None,
        Counter,
        &ns_samples(&|n| n.full_rejections),
    )?;

    let clients: Vec<Sample<'_>> = s
        .clients
        .iter()
        .map(|c| {
            (
                vec![
                    ("client", Cow::Owned(c.id.to_string())),
                    ("name", Cow::Borrowed(c.name.as_str())),
                ],
                c.ops,
            )
        })
        .collect();
    family(
        encoder,
        "kvd_client_ops",
        "Operations served per connected client.",
        None,
        Counter,
        &clients,
    )?;
    let depth = |f: &dyn Fn(&ClientInfo) -> u32| -> Vec<Sample<'_>> {
        s.clients
            .iter()
            .map(|c| {
                (
                    vec![("client", Cow::Owned(c.id.to_string()))],
                    u64::from(f(c)),
                )
            })
            .collect()
    };
    family(
        encoder,
        "kvd_ring_submission_queue_depth",
        "Descriptors waiting in a client's submission ring (submitted, not yet taken by kvd).",
        None,
        Gauge,
        &depth(&|c| c.sq_depth),
    )?;
    family(
        encoder,
        "kvd_ring_completion_queue_depth",
        "Completions waiting in a client's completion ring (not yet reaped by the client).",
        None,
        Gauge,
        &depth(&|c| c.cq_depth),
    )?;
    family(
        encoder,
        "kvd_clients",
        "Connected clients.",
        None,
        Gauge,
        &[(vec![], s.clients.len() as u64)],
    )?;

    if let Some(d) = &s.disk {
        let one = |v: u64| vec![(vec![], v)];
        family(
            encoder,
            "kvd_disk_read",
            "Bytes read from the disk tier.",
            bytes,
            Counter,
            &one(d.read_bytes),
        )?;
        family(
            encoder,
            "kvd_disk_written",
            "Bytes written to the disk tier.",
            bytes,
            Counter,
            &one(d.write_bytes),
        )?;
        family(
            encoder,
            "kvd_disk_admission_rejections",
            "Blocks not written to disk by the admission policy.",
            None,
            Counter,
            &one(d.admission_rejections),
        )?;
        family(
            encoder,
            "kvd_disk_reclaimed_blocks",
            "Blocks dropped by region reclaim.",
            None,
            Counter,
            &one(d.reclaimed_blocks),
        )?;
        family(
            encoder,
            "kvd_disk_quota_evictions",
            "Blocks dropped to keep a tenant within disk.max_bytes_per_tenant.",
            None,
            Counter,
            &one(d.quota_evictions),
        )?;
        family(
            encoder,
            "kvd_checksum_failures",
            "Blocks read from a lower tier that failed their checksum (served as misses).",
            None,
            Counter,
            &[(tier_label(kvd_proto::Tier::Disk), d.checksum_failures)],
        )?;
        family(
            encoder,
            "kvd_disk_io_errors",
            "Disk IO errors.",
            None,
            Counter,
            &one(d.io_errors),
        )?;
        family(
            encoder,
            "kvd_disk_free_regions",
            "Free disk regions.",
            None,
            Gauge,
            &one(u64::from(d.free_regions)),
        )?;
        family(
            encoder,
            "kvd_disk_drain_pending",
            "Blocks queued by a drain, not yet on disk.",
            None,
            Gauge,
            &one(d.drain_pending),
        )?;
        family(
            encoder,
            "kvd_disk_warm_pending",
            "Blocks queued by a warm (kvd-ctl warm), not yet read into DRAM.",
            None,
            Gauge,
            &one(d.warm_pending),
        )?;
        family(
            encoder,
            "kvd_disk_warmed_blocks",
            "Blocks read from disk into DRAM by warms.",
            None,
            Counter,
            &one(d.warmed),
        )?;
        family(
            encoder,
            "kvd_degraded",
            "1 while a tier is degraded (see kvd-ctl status for why).",
            None,
            Gauge,
            &[(
                tier_label(kvd_proto::Tier::Disk),
                f64::from(u8::from(!d.degraded.is_empty())),
            )],
        )?;
    }
    if let Some(x) = &s.index {
        let one = |v: u64| vec![(vec![], v)];
        family(
            encoder,
            "kvd_index_connected",
            "1 while the cluster index (Redis) answers.",
            None,
            Gauge,
            &one(u64::from(x.connected)),
        )?;
        family(
            encoder,
            "kvd_index_published",
            "Residency changes published to the cluster index.",
            None,
            Counter,
            &one(x.published),
        )?;
        family(
            encoder,
            "kvd_index_republishes",
            "Full republishes under a new epoch.",
            None,
            Counter,
            &one(x.republishes),
        )?;
        family(
            encoder,
            "kvd_index_outages",
            "Times the cluster index became unreachable.",
            None,
            Counter,
            &one(x.outages),
        )?;
    }
    if let Some(x) = &s.events {
        let one = |v: u64| vec![(vec![], v)];
        family(
            encoder,
            "kvd_events_batches",
            "KV event batches published.",
            None,
            Counter,
            &one(x.batches),
        )?;
        family(
            encoder,
            "kvd_events",
            "KV events published.",
            None,
            Counter,
            &one(x.events),
        )?;
        family(
            encoder,
            "kvd_events_unannounced",
            "Stored blocks not announced for want of their tokens.",
            None,
            Counter,
            &one(x.skipped),
        )?;
        family(
            encoder,
            "kvd_events_resyncs",
            "Times the event stream was cleared and re-announced.",
            None,
            Counter,
            &one(x.resyncs),
        )?;
    }
    if let Some(x) = &s.peer {
        let one = |v: u64| vec![(vec![], v)];
        family(
            encoder,
            "kvd_peer_served",
            "Bytes sent to peers.",
            bytes,
            Counter,
            &one(x.served_bytes),
        )?;
        family(
            encoder,
            "kvd_peer_fetched",
            "Bytes fetched from peers.",
            bytes,
            Counter,
            &one(x.fetched_bytes),
        )?;
        family(
            encoder,
            "kvd_peer_fetch_failures",
            "Peer fetches that failed.",
            None,
            Counter,
            &one(x.fetch_failures),
        )?;
        family(
            encoder,
            "kvd_peer_checksum_failures",
            "Blocks from peers that failed their checksum (dropped).",
            None,
            Counter,
            &one(x.checksum_failures),
        )?;
        family(
            encoder,
            "kvd_peer_bad_requests",
            "Peer connections dropped for a malformed request.",
            None,
            Counter,
            &one(x.bad_requests),
        )?;
    }
    if let Some(x) = &s.s3 {
        encode_s3(x, encoder, bytes)?;
    }
    Ok(())
}

fn encode_s3(
    x: &kvd_proto::frame::S3Report,
    encoder: &mut DescriptorEncoder,
    bytes: Option<&Unit>,
) -> Result<(), std::fmt::Error> {
    use MetricType::{Counter, Gauge};
    let one = |v: u64| vec![(vec![], v)];
    for (name, help, unit, kind, v) in [
        (
            "kvd_s3_degraded",
            "1 while the S3 circuit breaker is open or probing (S3 is skipped).",
            None,
            Gauge,
            u64::from(x.degraded),
        ),
        (
            "kvd_s3_segments",
            "Segments in the S3 index.",
            None,
            Gauge,
            x.segments,
        ),
        (
            "kvd_s3_uploading",
            "Segments being uploaded.",
            None,
            Gauge,
            x.uploading,
        ),
        (
            "kvd_s3_uploaded",
            "Bytes of segments uploaded.",
            bytes,
            Counter,
            x.uploaded_bytes,
        ),
        (
            "kvd_s3_upload_failures",
            "Segment uploads that failed after retries (blocks queued again).",
            None,
            Counter,
            x.upload_failures,
        ),
        (
            "kvd_s3_read",
            "Bytes of blocks read from S3 into DRAM.",
            bytes,
            Counter,
            x.read_bytes,
        ),
        (
            "kvd_s3_read_failures",
            "Block reads from S3 that failed.",
            None,
            Counter,
            x.read_failures,
        ),
        (
            "kvd_s3_checksum_failures",
            "Blocks that did not match their checksum (never served).",
            None,
            Counter,
            x.corrupt,
        ),
        (
            "kvd_s3_requests",
            "S3 requests sent (each attempt).",
            None,
            Counter,
            x.requests,
        ),
        (
            "kvd_s3_retries",
            "S3 request attempts retried.",
            None,
            Counter,
            x.retries,
        ),
        (
            "kvd_s3_failures",
            "S3 requests that failed after their retries.",
            None,
            Counter,
            x.failures,
        ),
        (
            "kvd_s3_short_circuited",
            "S3 requests skipped while the circuit breaker was open.",
            None,
            Counter,
            x.short_circuited,
        ),
        (
            "kvd_s3_breaker_opened",
            "Times the S3 circuit breaker opened.",
            None,
            Counter,
            x.breaker_opened,
        ),
        (
            "kvd_s3_deleted_segments",
            "Segments this node deleted (age, budget, no live block).",
            None,
            Counter,
            x.deleted_segments,
        ),
    ] {
        family(encoder, name, help, unit, kind, &one(v))?;
    }
    Ok(())
}

impl Collector for StatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(daemon) = self.daemon.upgrade() else {
            return Ok(());
        };
        encode_stats(&daemon.stats(), &mut encoder)?;
        if let Some(g) = &daemon.gpu {
            family(
                &mut encoder,
                "kvd_gpu_pinned",
                "DRAM pinned for GPU DMA at start (gpu.pin_arenas).",
                Some(&Unit::Bytes),
                MetricType::Gauge,
                &[(vec![], g.pinned_bytes)],
            )?;
            family(
                &mut encoder,
                "kvd_gpu_pin",
                "Wall time pinning the DRAM arenas took at start.",
                Some(&Unit::Seconds),
                MetricType::Gauge,
                &[(vec![], g.pin_time.as_secs_f64())],
            )?;
            let r = g.report();
            family(
                &mut encoder,
                "kvd_gpu_attachments",
                "Engine KV buffers mapped into kvd for daemon-driven transfers.",
                None,
                MetricType::Gauge,
                &[(vec![], r.attachments)],
            )?;
            let dir = |d: &'static str| vec![("direction", Cow::Borrowed(d))];
            family(
                &mut encoder,
                "kvd_gpu_blocks",
                "Blocks moved by daemon-driven transfers (save: device to DRAM, load: DRAM to device).",
                None,
                MetricType::Counter,
                &[(dir("save"), r.saved_blocks), (dir("load"), r.loaded_blocks)],
            )?;
            family(
                &mut encoder,
                "kvd_gpu_copy",
                "Bytes copied by daemon-driven transfers.",
                Some(&Unit::Bytes),
                MetricType::Counter,
                &[(dir("d2h"), r.d2h_bytes), (dir("h2d"), r.h2d_bytes)],
            )?;
            family(
                &mut encoder,
                "kvd_gpu_copy_errors",
                "Daemon-driven transfers or mappings the driver refused.",
                None,
                MetricType::Counter,
                &[(vec![], r.copy_errors)],
            )?;
        }
        Ok(())
    }
}

/// The registry behind `/metrics`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// Registers the daemon's state and its latency histograms.
    pub fn new(daemon: &Arc<Daemon>) -> Metrics {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(StatsCollector {
            daemon: Arc::downgrade(daemon),
        }));
        registry.register_with_unit(
            "kvd_op_duration",
            "Time the daemon spent on an operation (lookup incl. peer fetch; get from DRAM; get via the disk tier; a PUT's commit).",
            Unit::Seconds,
            daemon.latency.family.clone(),
        );
        Metrics { registry }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind the metrics endpoint {addr}: {source}")]
pub struct BindError {
    addr: String,
    #[source]
    source: std::io::Error,
}

/// Binds `metrics.listen`.
pub async fn bind(listen: &str) -> Result<TcpListener, BindError> {
    let err = |source| BindError {
        addr: listen.to_owned(),
        source,
    };
    let addr: SocketAddr = listen.parse().map_err(|e| {
        err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{e}"),
        ))
    })?;
    TcpListener::bind(addr).await.map_err(err)
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn route(daemon: &Daemon, metrics: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if daemon.is_shutting_down() => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "shutting down\n".into(),
        ),
        "/readyz" => reply(StatusCode::OK, "text/plain", "ready\n".into()),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

/// Most connections at once in all, and from one address: each is served on its own task,
/// so a probe never waits behind scrapes, and idle ones go within [`HEADER_TIMEOUT`].
const CAPS: crate::accept::Caps = crate::accept::Caps {
    total: 128,
    per_addr: 16,
};
/// A connection must send its request headers within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves the endpoint until `stop` fires.
pub async fn serve(daemon: Arc<Daemon>, listener: TcpListener, stop: Arc<tokio::sync::Notify>) {
    let metrics = Arc::new(Metrics::new(&daemon));
    let adm = crate::accept::Admission::new(CAPS);
    while let Some((stream, _, place)) =
        crate::accept::next("metrics", &listener, &adm, &stop).await
    {
        let (daemon, metrics) = (daemon.clone(), metrics.clone());
        tokio::spawn(async move {
            let _place = place;
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let r = route(&daemon, &metrics, &req);
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .max_buf_size(64 << 10)
                .header_read_timeout(HEADER_TIMEOUT)
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvd_proto::frame::TierStats;
    use kvd_proto::Tier;

    #[test]
    fn stats_become_labelled_families() {
        let s = StatsReport {
            daemon_version: "t".into(),
            uptime_ms: 1500,
            tiers: vec![TierStats {
                tier: Tier::Dram,
                capacity_bytes: 1 << 30,
                used_bytes: 4096,
                blocks: 1,
                hits: 3,
                misses: 2,
                evictions: 0,
                bytes_in: 1 << 20,
                bytes_out: 3 << 20,
            }],
            namespaces: vec![],
            clients: vec![],
            disk: None,
            index: None,
            events: None,
            peer: None,
            gpu: None,
            s3: Some(kvd_proto::frame::S3Report {
                degraded: true,
                uploaded_bytes: 7,
                ..Default::default()
            }),
        };
        let mut reg = Registry::default();
        #[derive(Debug)]
        struct Fixed(StatsReport);
        impl Collector for Fixed {
            fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
                encode_stats(&self.0, &mut e)
            }
        }
        reg.register_collector(Box::new(Fixed(s)));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(
            out.contains("kvd_tier_capacity_bytes{tier=\"dram\"} 1073741824"),
            "{out}"
        );
        assert!(out.contains("kvd_hits_total{tier=\"dram\"} 3"), "{out}");
        assert!(out.contains("kvd_misses_total{tier=\"dram\"} 2"), "{out}");
        assert!(out.contains("kvd_uptime_seconds 1.5"), "{out}");
        assert!(out.contains("kvd_s3_degraded 1"), "{out}");
        assert!(out.contains("kvd_s3_uploaded_bytes_total 7"), "{out}");
        assert!(out.ends_with("# EOF\n"));
    }

    #[test]
    fn latency_histograms_count_each_op() {
        let l = OpLatency::default();
        l.observe(Op::Get, Duration::from_micros(3));
        l.observe(Op::Get, Duration::from_millis(2));
        l.observe(Op::Commit, Duration::from_micros(1));
        let mut reg = Registry::default();
        reg.register_with_unit("kvd_op_duration", "t", Unit::Seconds, l.family.clone());
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(
            out.contains("kvd_op_duration_seconds_count{op=\"get\"} 2"),
            "{out}"
        );
        assert!(
            out.contains("kvd_op_duration_seconds_count{op=\"commit\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("kvd_op_duration_seconds_count{op=\"lookup\"} 0"),
            "{out}"
        );
    }
}
