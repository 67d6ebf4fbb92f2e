//! `kvd-bench gpu`: daemon-driven transfers — kvd copying an engine's KV pages itself — beside
//! the same copies made by this process through the same backend and plans, in the same run;
//! and a many-page gather beside one contiguous copy of the same bytes.
//!
//! The "engine" is this process: its KV buffers (`--layers` layer buffers, a block being one
//! page of each) live in device memory shared with the spawned kvd through a CUDA IPC handle
//! (`--backend cuda`), or in a sealed memfd for the host stand-in backend (`--backend host`,
//! any machine; there "device" copies are memcpys, so only the overheads are measured).
//! Per size and round: kvd saves every block (device → its arena; D2H) and loads every block
//! back into other pages (arena → device; H2D), each timed from the client's side; the
//! reference copies the same pages between the same device buffer and a pinned host buffer
//! with the same batched plans and copy method (`--copy-method`); the gather and scatter rows
//! set those paged copies beside one contiguous copy of the same bytes each way (the bus's
//! own rate). The warm-up round checks every loaded byte.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use kvd_benches::{fill, Record};
use kvd_client::gpu::{BlockCode, GpuLayer, GpuShare};
use kvd_client::NamespaceDesc;
use kvd_gpu::method::CopyMethod;
use kvd_gpu::plan::{block_runs, Layer};
use kvd_gpu::{Backend, DevicePtr, Run, Shared};
use kvd_shm::map::HugePages;
use kvd_shm::Mapping;

use super::{admin_client, emit, gbps, key, median, parse_sizes, spawn_daemon_with};

/// Blocks per kvd request and per reference batch (kvd's own batch of driver calls).
const BATCH: usize = 256;

#[derive(Debug, clap::Args)]
pub struct GpuArgs {
    /// `host` (stand-in: any machine, copies are memcpys) or `cuda` (a GPU, and kvd and
    /// kvd-bench built with `--features cuda`).
    #[arg(long, default_value = "host")]
    backend: String,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: u32,
    /// Block sizes to measure.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "64KiB,256KiB,1MiB,4MiB,8MiB"
    )]
    sizes: Vec<String>,
    /// Bytes moved per size, direction and round.
    #[arg(long, default_value = "512MiB")]
    total: String,
    /// Layer buffers per block: 1 moves one contiguous page per block; 32 or more measures
    /// gathers of many small pages.
    #[arg(long, default_value_t = 1)]
    layers: u64,
    /// Measured rounds per size (after a warm-up round that checks every byte); medians are
    /// reported, with the median of the per-round ratios.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Give kvd a T0 block pool of this size in device memory (`gpu.pool_bytes`): loads of
    /// blocks still pooled are then device-to-device copies (compare with `--pool-bytes 0`).
    #[arg(long, default_value = "0")]
    pool_bytes: String,
    /// How batches of page copies are issued, by kvd (`gpu.copy_method`) and by this
    /// process's reference copies alike: auto, memcpy (one driver copy per page), batch
    /// (cuMemcpyBatchAsync) or kernel (kvd's copy kernel). CUDA only.
    #[arg(long, default_value = "auto")]
    copy_method: CopyMethod,
    /// Threads kvd computes the checksums of saved blocks on (`gpu.seal_threads`) where the
    /// GPU does not (the host backend; pages not a multiple of 64 bytes).
    #[arg(long, default_value_t = 8)]
    seal_threads: u32,
    /// Print one JSON object per line.
    #[arg(long)]
    json: bool,
}

/// The engine's KV memory: device memory this process can copy to and from, shared with kvd.
struct Engine {
    backend: Arc<dyn Backend>,
    /// The same device with one driver copy per run (DMA by the copy engines): the
    /// contiguous reference copies, whatever `--copy-method` says.
    dma: Arc<dyn Backend>,
    base: DevicePtr,
    share: GpuShare,
    fd: Option<OwnedFd>,
}

impl Engine {
    fn new(kind: &str, device: u32, method: CopyMethod, len: u64) -> anyhow::Result<Engine> {
        match kind {
            "host" => {
                let fd = kvd_shm::map::create_memfd("kvd-bench-engine", len, HugePages::Off)?;
                let backend = Arc::new(kvd_gpu::host::HostBackend::new());
                let m = backend.import(Shared::Fd {
                    fd: fd.as_fd(),
                    len,
                })?;
                Ok(Engine {
                    dma: backend.clone(),
                    backend,
                    base: m.base,
                    share: GpuShare::Fd { len },
                    fd: Some(fd),
                })
            }
            "cuda" => cuda_engine(device, method, len),
            other => bail!("--backend must be host or cuda, not {other:?}"),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_engine(device: u32, method: CopyMethod, len: u64) -> anyhow::Result<Engine> {
    let b = kvd_gpu::cuda::CudaBackend::open(i32::try_from(device)?, method)?;
    let base = b.alloc(usize::try_from(len)?)?;
    let handle = b.ipc_handle(base)?;
    let dma = kvd_gpu::cuda::CudaBackend::open(i32::try_from(device)?, CopyMethod::Memcpy)?;
    Ok(Engine {
        backend: Arc::new(b),
        dma: Arc::new(dma),
        base,
        share: GpuShare::CudaIpc(handle),
        fd: None,
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_engine(_device: u32, _method: CopyMethod, _len: u64) -> anyhow::Result<Engine> {
    bail!("this kvd-bench was built without the cuda feature: cargo build --release -p kvd-benches --features cuda (and kvd with --features cuda)")
}

/// Pinned (registered) host memory for the reference copies, unpinned on drop.
struct PinnedBuf {
    // Dropped before `map`: unpinned while still mapped.
    _pin: kvd_gpu::register::Pinned,
    map: Mapping,
}

impl PinnedBuf {
    fn new(backend: Arc<dyn Backend>, len: usize) -> anyhow::Result<PinnedBuf> {
        let fd = kvd_shm::map::create_memfd("kvd-bench-pinned", len as u64, HugePages::Off)?;
        let map = Mapping::map_fd(&fd, len, true, true)?;
        // SAFETY: the mapping lives in the same struct and is dropped after the guard.
        let pin =
            unsafe { kvd_gpu::register::pin_parallel(backend, map.as_ptr(), len, 0, len, 1) }?;
        Ok(PinnedBuf { _pin: pin, map })
    }
}

/// Runs `runs` in batches in one direction; returns the time taken.
fn timed(backend: &dyn Backend, batches: &[Vec<Run>], d2h: bool) -> anyhow::Result<Duration> {
    let t = Instant::now();
    for runs in batches {
        // SAFETY: every run lies inside the engine's allocation and the pinned buffer, both
        // alive for the call, and nothing else touches them meanwhile.
        unsafe {
            if d2h {
                backend.copy_d2h(runs)?;
            } else {
                backend.copy_h2d(runs)?;
            }
        }
    }
    Ok(t.elapsed())
}

fn record(
    op: &'static str,
    size: usize,
    gbps: f64,
    reference: f64,
    ratio: f64,
    ops: u64,
) -> Record {
    Record {
        tier: "gpu",
        op,
        size_bytes: size as u64,
        gbps: Some(gbps),
        p50_us: 0.0,
        p99_us: 0.0,
        memcpy_gbps: Some(reference),
        fio_gbps: None,
        sdk_gbps: None,
        queue_depth: None,
        ratio: Some(ratio),
        ops,
    }
}

pub fn run(a: GpuArgs) -> anyhow::Result<()> {
    let (sizes, total, max) = parse_sizes(&a.sizes, &a.total)?;
    if a.layers == 0 || sizes.iter().any(|&s| s as u64 % a.layers != 0) {
        bail!("every size must be a multiple of --layers ({})", a.layers);
    }
    let sets = vec![
        format!("gpu.backend={}", a.backend),
        format!("gpu.device={}", a.device),
        format!("gpu.pool_bytes={}", super::parse_size(&a.pool_bytes)?),
        format!("gpu.copy_method={}", a.copy_method),
        format!("gpu.seal_threads={}", a.seal_threads),
    ];
    let arena = total + (64 << 20) + 4 * max;
    let (_daemon, socket) = spawn_daemon_with(arena, max, &sets)?;
    let client = admin_client(&socket)?;
    let ns = client.open_namespace(&NamespaceDesc::new("kvd-bench", "bytes", "gpu", 16))?;
    if !a.json {
        println!(
            "kvd-bench gpu: backend {}, copies {}, {} seal threads, {} per size, direction and round, {} layer buffer(s) per block, T0 pool {}, {} rounds after a warm-up round that checks every byte",
            a.backend, a.copy_method, a.seal_threads, a.total, a.layers, a.pool_bytes, a.rounds
        );
    }
    for &size in &sizes {
        let n = (total / size).max(2);
        let page = size as u64 / a.layers;
        // Two halves: blocks are saved from pages [0, n) and loaded into pages [n, 2n).
        let pages = 2 * n as u64;
        let len = pages * size as u64;
        let engine = Engine::new(&a.backend, a.device, a.copy_method, len)?;
        let layers: Vec<Layer> = (0..a.layers)
            .map(|l| Layer {
                base: engine.base + l * pages * page,
                stride: page,
                page,
                pages,
            })
            .collect();
        let wire: Vec<GpuLayer> = (0..a.layers)
            .map(|l| GpuLayer {
                share: 0,
                offset: l * pages * page,
                stride: page,
                page,
                pages,
            })
            .collect();
        let fds: Vec<_> = engine.fd.iter().map(|f| f.as_fd()).collect();
        let att = client.gpu_attach(&ns.id, std::slice::from_ref(&engine.share), &fds, &wire)?;
        let pinned = PinnedBuf::new(engine.backend.clone(), n * size)?;
        let host = pinned.map.as_ptr() as usize;
        // The engine's pages get known content: staged in the pinned buffer, then uploaded.
        let content = {
            let mut v = vec![0u8; n * size];
            fill(&mut v, size as u64);
            v
        };
        pinned.map.copy_in(0, &content);
        let ids: Vec<u64> = (0..n as u64).collect();
        let slots: Vec<usize> = (0..n).map(|i| host + i * size).collect();
        let plan = |first: u64| -> anyhow::Result<Vec<Vec<Run>>> {
            ids.chunks(BATCH)
                .zip(slots.chunks(BATCH))
                .map(|(i, s)| {
                    let i: Vec<u64> = i.iter().map(|x| x + first).collect();
                    Ok(block_runs(&layers, &i, s)?)
                })
                .collect()
        };
        let (save_plan, load_plan) = (plan(0)?, plan(n as u64)?);
        timed(engine.backend.as_ref(), &save_plan, false)?;
        let contiguous = [vec![Run {
            dev: engine.base,
            host,
            len: n * size,
        }]];
        let keys: Vec<_> = (0..n).map(|i| key(size, i)).collect();
        let save_ids: Vec<u32> = (0..n as u32).collect();
        let load_ids: Vec<u32> = (n as u32..2 * n as u32).collect();
        let bytes = n * size;
        let (mut d2h, mut h2d, mut r_d2h, mut r_h2d) = (vec![], vec![], vec![], vec![]);
        let (mut contig, mut contig_up) = (vec![], vec![]);
        let (mut q_d2h, mut q_h2d, mut q_gather, mut q_scatter) = (vec![], vec![], vec![], vec![]);
        for round in 0..=a.rounds {
            client.delete(&ns.id, &keys)?;
            // kvd: save every block, then load it into the other half.
            let t = Instant::now();
            for (k, p) in keys.chunks(BATCH).zip(save_ids.chunks(BATCH)) {
                let codes = client.gpu_save(&att, k, p)?;
                if codes.iter().any(|c| *c != BlockCode::Done) {
                    bail!("kvd did not save every block: {codes:?} (arena too small?)");
                }
            }
            let kvd_d2h = gbps(bytes, t.elapsed());
            let t = Instant::now();
            for (k, p) in keys.chunks(BATCH).zip(load_ids.chunks(BATCH)) {
                let codes = client.gpu_load(&att, k, p, None, false)?;
                if codes.iter().any(|c| *c != BlockCode::Done) {
                    bail!("kvd did not load every block: {codes:?}");
                }
            }
            let kvd_h2d = gbps(bytes, t.elapsed());
            if round == 0 {
                // The loaded half, read back through the reference path, is the content.
                timed(engine.backend.as_ref(), &load_plan, true)?;
                let mut back = vec![0u8; bytes];
                pinned.map.copy_out(0, &mut back);
                if back != content {
                    bail!("{size}-byte blocks: pages loaded by kvd differ from the pages it saved");
                }
                continue;
            }
            // Reference: the same pages, plans and batches, copied by this process.
            let ref_d2h = gbps(bytes, timed(engine.backend.as_ref(), &save_plan, true)?);
            let ref_h2d = gbps(bytes, timed(engine.backend.as_ref(), &load_plan, false)?);
            let one = gbps(bytes, timed(engine.dma.as_ref(), &contiguous, true)?);
            let one_up = gbps(bytes, timed(engine.dma.as_ref(), &contiguous, false)?);
            d2h.push(kvd_d2h);
            h2d.push(kvd_h2d);
            r_d2h.push(ref_d2h);
            r_h2d.push(ref_h2d);
            contig.push(one);
            contig_up.push(one_up);
            q_d2h.push(kvd_d2h / ref_d2h);
            q_h2d.push(kvd_h2d / ref_h2d);
            q_gather.push(ref_d2h / one);
            q_scatter.push(ref_h2d / one_up);
        }
        client.gpu_detach(&att)?;
        client.delete(&ns.id, &keys)?;
        let ops = n as u64 * u64::from(a.rounds);
        let rows = [
            record(
                "save_d2h",
                size,
                median(d2h),
                median(r_d2h.clone()),
                median(q_d2h),
                ops,
            ),
            record(
                "load_h2d",
                size,
                median(h2d),
                median(r_h2d.clone()),
                median(q_h2d),
                ops,
            ),
            record(
                "gather",
                size,
                median(r_d2h),
                median(contig),
                median(q_gather),
                ops,
            ),
            record(
                "scatter",
                size,
                median(r_h2d),
                median(contig_up),
                median(q_scatter),
                ops,
            ),
        ];
        for r in &rows {
            if a.json {
                emit(true, r)?;
            } else {
                let what = match r.op {
                    "save_d2h" => "kvd save (D2H)  vs same copies here",
                    "load_h2d" => "kvd load (H2D)  vs same copies here",
                    "gather" => "paged gather    vs one contiguous copy (D2H)",
                    _ => "paged scatter   vs one contiguous copy (H2D)",
                };
                println!(
                    "gpu {:>8} KiB x{n:<6} {what}: {:>7.2} GB/s vs {:>7.2} GB/s  ratio {:>5.2}",
                    size / 1024,
                    r.gbps.unwrap_or(f64::NAN),
                    r.memcpy_gbps.unwrap_or(f64::NAN),
                    r.ratio.unwrap_or(f64::NAN)
                );
            }
        }
    }
    Ok(())
}
