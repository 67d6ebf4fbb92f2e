//! JSON views of daemon reports, shared by `kvd-ctl --json` and the Python binding so both
//! speak the same field names.

use serde_json::{json, Value};

use crate::{BlockInfo, StatsReport};

/// One block as listed or inspected.
pub fn block_json(b: &BlockInfo) -> Value {
    json!({
        "namespace": b.ns.to_hex(), "key": b.key.to_hex(), "tier": b.tier.name(),
        "len": b.len, "checksum": format!("{:016x}", b.checksum), "pins": b.pins,
        "readers": b.readers, "hits": b.hits, "age_ms": b.age_ms, "idle_ms": b.idle_ms,
    })
}

/// The daemon's statistics report.
pub fn status_json(s: &StatsReport) -> Value {
    json!({
        "daemon_version": s.daemon_version,
        "uptime_ms": s.uptime_ms,
        "tiers": s.tiers.iter().map(|t| json!({
            "tier": t.tier.name(), "capacity_bytes": t.capacity_bytes, "used_bytes": t.used_bytes,
            "blocks": t.blocks, "hits": t.hits, "misses": t.misses, "evictions": t.evictions,
            "bytes_in": t.bytes_in, "bytes_out": t.bytes_out,
            "hit_rate": if t.hits + t.misses == 0 { Value::Null }
                        else { json!(t.hits as f64 / (t.hits + t.misses) as f64) },
        })).collect::<Vec<_>>(),
        "namespaces": s.namespaces.iter().map(|n| json!({
            "id": n.ns.to_hex(), "model": n.desc.model, "dtype": n.desc.dtype,
            "layout": n.desc.layout, "block_tokens": n.desc.block_tokens,
            "tp_rank": n.desc.tp_rank, "tp_size": n.desc.tp_size, "lora": n.desc.lora,
            "tenant": n.desc.tenant, "arena_bytes": n.arena_bytes, "used_bytes": n.used_bytes,
            "blocks": n.blocks, "pinned": n.pinned, "leases": n.leases, "reserved": n.reserved,
            "hits": n.hits, "misses": n.misses, "evictions": n.evictions,
            "full_rejections": n.full_rejections,
        })).collect::<Vec<_>>(),
        "clients": s.clients.iter().map(|c| json!({
            "id": c.id, "name": c.name, "pid": c.pid, "uid": c.uid, "admin": c.admin, "ops": c.ops,
            "sq_depth": c.sq_depth, "cq_depth": c.cq_depth,
        })).collect::<Vec<_>>(),
        "disk": s.disk.as_ref().map(|d| json!({
            "path": d.path, "engine": d.engine, "direct_io": d.direct_io,
            "capacity_bytes": d.capacity_bytes, "used_bytes": d.used_bytes,
            "regions": d.regions, "free_regions": d.free_regions, "blocks": d.blocks,
            "hits": d.hits, "misses": d.misses, "read_bytes": d.read_bytes,
            "write_bytes": d.write_bytes, "read_bytes_per_s": d.read_bytes_per_s,
            "write_bytes_per_s": d.write_bytes_per_s, "writes": d.writes,
            "admission_rejections": d.admission_rejections, "reclaims": d.reclaims,
            "reclaimed_blocks": d.reclaimed_blocks, "checksum_failures": d.checksum_failures,
            "io_errors": d.io_errors, "dropped_at_start": d.dropped_at_start,
            "drain_pending": d.drain_pending,
            "warm_pending": d.warm_pending,
            "warmed": d.warmed,
            "degraded": if d.degraded.is_empty() { Value::Null } else { json!(d.degraded) },
        })),
        "index": s.index.as_ref().map(|x| json!({
            "endpoint": x.endpoint, "node": x.node, "connected": x.connected, "epoch": x.epoch,
            "published": x.published, "republishes": x.republishes, "outages": x.outages,
            "last_error": if x.last_error.is_empty() { Value::Null } else { json!(x.last_error) },
        })),
        "peer": s.peer.as_ref().map(|x| json!({
            "advertise": x.advertise, "served_blocks": x.served_blocks,
            "served_bytes": x.served_bytes, "fetched_blocks": x.fetched_blocks,
            "fetched_bytes": x.fetched_bytes, "fetch_failures": x.fetch_failures,
            "checksum_failures": x.checksum_failures, "bad_requests": x.bad_requests,
            "last_error": if x.last_error.is_empty() { Value::Null } else { json!(x.last_error) },
        })),
        "gpu": s.gpu.as_ref().map(|x| json!({
            "backend": x.backend, "pinned_bytes": x.pinned_bytes, "pin_ms": x.pin_ms,
            "attachments": x.attachments, "saved_blocks": x.saved_blocks,
            "loaded_blocks": x.loaded_blocks, "d2h_bytes": x.d2h_bytes, "h2d_bytes": x.h2d_bytes,
            "copy_errors": x.copy_errors,
            "last_error": if x.last_error.is_empty() { Value::Null } else { json!(x.last_error) },
        })),
        "s3": s.s3.as_ref().map(|x| json!({
            "endpoint": x.endpoint, "bucket": x.bucket, "degraded": x.degraded,
            "scanned": x.scanned, "blocks": x.blocks, "segments": x.segments, "bytes": x.bytes,
            "uploaded_segments": x.uploaded_segments, "uploaded_blocks": x.uploaded_blocks,
            "uploaded_bytes": x.uploaded_bytes, "upload_failures": x.upload_failures,
            "read_blocks": x.read_blocks, "read_bytes": x.read_bytes,
            "read_failures": x.read_failures, "checksum_failures": x.corrupt,
            "deleted_segments": x.deleted_segments, "requests": x.requests,
            "retries": x.retries, "failures": x.failures,
            "short_circuited": x.short_circuited, "breaker_opened": x.breaker_opened,
            "uploading": x.uploading, "drain_pending": x.drain_pending,
            "warm_pending": x.warm_pending, "warmed": x.warmed,
            "last_error": if x.last_error.is_empty() { Value::Null } else { json!(x.last_error) },
        })),
        "events": s.events.as_ref().map(|x| json!({
            "endpoint": x.endpoint,
            "replay_endpoint": if x.replay_endpoint.is_empty() { Value::Null } else { json!(x.replay_endpoint) },
            "topic_prefix": x.topic_prefix, "form": x.form, "batches": x.batches,
            "events": x.events, "skipped_no_lineage": x.skipped, "resyncs": x.resyncs,
            "next_seq": x.next_seq, "lineage_blocks": x.lineage_blocks,
            "last_error": if x.last_error.is_empty() { Value::Null } else { json!(x.last_error) },
        })),
    })
}
