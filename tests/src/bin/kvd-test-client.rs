//! Test client process for the integration tests: drives a daemon in one of several modes so
//! the tests can run clients concurrently and kill them at awkward moments.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use kvd_client::gpu::BlockCode;
use kvd_client::{Client, Options, PutOutcome};
use kvd_tests::engine::FakeEngine;
use kvd_tests::{client_key as key, pattern, test_namespace};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    /// Puts, then reads back and verifies, `--iterations` rounds over `--blocks` keys.
    Churn,
    /// Reserves slots and never commits, printing `ready` once some are held; waits to be killed.
    HoldPut,
    /// Stores blocks, takes read leases on them and never releases; waits to be killed.
    HoldGet,
    /// A fake engine (KV cache in a memfd) attached for daemon-driven transfers: fills page
    /// `2 i` with seed-derived bytes and has kvd save it as key `i`, for `--blocks` keys.
    GpuSave,
    /// Two fake engines on one connection: each of `--iterations` rounds fills random pages
    /// of the first, has kvd save them and load them into random pages of the second, and
    /// checks every byte. Prints `ready` after the first round.
    GpuChurn,
    /// Opens `--model` as `--tenant`, stores one block, prints `ready`; waits to be killed.
    TenantHold,
    /// Prints what `Stats` shows it (`namespaces N`, then `tenant T` for each), then tries to
    /// open `--model` as `--tenant`: `opened` or `refused: <message>`.
    TenantProbe,
}

/// Integration-test client for kvd.
#[derive(Debug, Parser)]
struct Args {
    #[arg(long)]
    socket: PathBuf,
    #[arg(long, value_enum)]
    mode: Mode,
    /// Namespace model name.
    #[arg(long, default_value = "test-model")]
    model: String,
    /// Content seed (same seed → same bytes for the same key index).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 64)]
    blocks: u64,
    #[arg(long, default_value_t = 65536)]
    block_bytes: usize,
    #[arg(long, default_value_t = 10)]
    iterations: u64,
    /// Fake engine: layer buffers (a block is one page of each).
    #[arg(long, default_value_t = 2)]
    layers: u64,
    /// Fake engine: pages per layer.
    #[arg(long, default_value_t = 64)]
    pages: u64,
    /// Namespace tenant.
    #[arg(long, default_value = "")]
    tenant: String,
}

/// [`Mode::TenantProbe`].
fn tenant_probe(client: &Client, a: &Args) -> anyhow::Result<()> {
    let stats = client.stats()?;
    println!("namespaces {}", stats.namespaces.len());
    for n in &stats.namespaces {
        println!("tenant {}", n.desc.tenant);
    }
    let mut desc = test_namespace(&a.model);
    desc.tenant = a.tenant.clone();
    match client.open_namespace(&desc) {
        Ok(_) => println!("opened"),
        Err(e) => println!("refused: {e}"),
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let client = Client::connect_with(
        &a.socket,
        Options {
            name: format!("test-client-{:?}", a.mode),
            ..Options::default()
        },
    )?;
    if let Mode::TenantProbe = a.mode {
        return tenant_probe(&client, &a);
    }
    let mut desc = test_namespace(&a.model);
    desc.tenant = a.tenant.clone();
    let ns = client.open_namespace(&desc)?;
    let mut out = std::io::stdout();
    match a.mode {
        Mode::Churn => {
            let mut stored = 0u64;
            let mut verified = 0u64;
            for it in 0..a.iterations {
                for i in 0..a.blocks {
                    let data = pattern(a.seed, i, a.block_bytes);
                    if client.put(&ns, &key(a.seed, i), &data)? == PutOutcome::Stored {
                        stored += 1;
                    }
                }
                for i in 0..a.blocks {
                    // Eviction may have taken a block; what is returned must be exact.
                    if let Some(l) = client.get(&ns, &key(a.seed, i))? {
                        let want = pattern(a.seed, i, a.block_bytes);
                        if *l != want[..] {
                            bail!("iteration {it} block {i}: bytes differ from what was written");
                        }
                        if l.verify() == Some(false) {
                            bail!("iteration {it} block {i}: checksum mismatch");
                        }
                        verified += 1;
                    }
                }
                if it % 2 == 1 {
                    let keys: Vec<_> = (0..a.blocks).step_by(3).map(|i| key(a.seed, i)).collect();
                    client.delete(&ns.id, &keys)?;
                }
            }
            println!("{{\"stored\":{stored},\"verified\":{verified}}}");
        }
        Mode::TenantHold => {
            client.put(&ns, &key(a.seed, 0), &pattern(a.seed, 0, a.block_bytes))?;
            writeln!(out, "ready")?;
            out.flush()?;
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
        // Answered above, before a namespace is opened.
        Mode::TenantProbe => {}
        Mode::HoldPut => {
            let mut held = Vec::new();
            for i in 0..a.blocks {
                if let Some(mut s) =
                    client.reserve(&ns, &key(a.seed, 1_000_000 + i), a.block_bytes)?
                {
                    s.as_mut_slice().fill(0xAB);
                    held.push(s);
                }
                if i == 0 {
                    writeln!(out, "ready").context("stdout")?;
                    out.flush().context("stdout")?;
                }
            }
            // Keep the reservations; the parent kills us.
            std::thread::sleep(std::time::Duration::from_secs(60));
            drop(held);
        }
        Mode::HoldGet => {
            for i in 0..a.blocks {
                client.put(&ns, &key(a.seed, i), &pattern(a.seed, i, a.block_bytes))?;
            }
            let mut leases = Vec::new();
            for i in 0..a.blocks {
                if let Some(l) = client.get(&ns, &key(a.seed, i))? {
                    leases.push(l);
                }
                if i == 0 {
                    writeln!(out, "ready").context("stdout")?;
                    out.flush().context("stdout")?;
                }
            }
            std::thread::sleep(std::time::Duration::from_secs(60));
            drop(leases);
        }
        Mode::GpuSave => {
            let page = (a.block_bytes as u64 / a.layers).max(1);
            let e = FakeEngine::new(a.layers, a.pages, page, page + 512);
            let att = e.attach(&client, &ns.id);
            let n = a.blocks.min(a.pages / 2);
            let keys: Vec<_> = (0..n).map(|i| key(a.seed, i)).collect();
            let pages: Vec<u32> = (0..n).map(|i| (2 * i) as u32).collect();
            for &p in &pages {
                e.fill(u64::from(p), a.seed ^ u64::from(p));
            }
            let codes = client.gpu_save(&att, &keys, &pages)?;
            let saved = codes.iter().filter(|c| **c == BlockCode::Done).count();
            println!("{{\"saved\":{saved}}}");
        }
        Mode::GpuChurn => {
            let page = (a.block_bytes as u64 / a.layers).max(1);
            let src = FakeEngine::new(a.layers, a.pages, page, page);
            let dst = FakeEngine::new(a.layers, a.pages, page + 64, page + 64);
            let (sa, da) = (src.attach(&client, &ns.id), {
                // Same block layout, different strides and pages: only page bytes must match.
                let mut l = dst.layout();
                for x in &mut l {
                    x.page = page;
                }
                client.gpu_attach(&ns.id, &dst.shares(), &[dst.fd()], &l)?
            });
            let mut x = a.seed | 1;
            let mut next = |n: u64| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % n
            };
            let (mut moved, per_round) = (0u64, a.blocks.min(a.pages / 2).max(1));
            for it in 0..a.iterations {
                let mut from: Vec<u64> = Vec::new();
                while (from.len() as u64) < per_round {
                    let p = next(a.pages);
                    if !from.contains(&p) {
                        from.push(p);
                    }
                }
                let mut to: Vec<u64> = Vec::new();
                while (to.len() as u64) < per_round {
                    let p = next(a.pages);
                    if !to.contains(&p) {
                        to.push(p);
                    }
                }
                let keys: Vec<_> = (0..per_round)
                    .map(|j| key(a.seed, it * 1_000_000 + j))
                    .collect();
                for &p in &from {
                    src.fill(p, a.seed ^ (it << 20) ^ p);
                }
                let ids = |v: &[u64]| v.iter().map(|&p| p as u32).collect::<Vec<_>>();
                let saved = client.gpu_save(&sa, &keys, &ids(&from))?;
                if saved.iter().any(|c| *c != BlockCode::Done) {
                    bail!("round {it}: save codes {saved:?}");
                }
                let loaded = client.gpu_load(&da, &keys, &ids(&to), None, true)?;
                if loaded.iter().any(|c| *c != BlockCode::Done) {
                    bail!("round {it}: load codes {loaded:?}");
                }
                for (f, t) in from.iter().zip(&to) {
                    for l in 0..a.layers {
                        if dst.read(l, *t)[..page as usize] != src.read(l, *f)[..] {
                            bail!("round {it}: layer {l} page {t} differs from source page {f}");
                        }
                    }
                }
                moved += per_round;
                client.delete(&ns.id, &keys)?;
                if it == 0 {
                    writeln!(out, "ready").context("stdout")?;
                    out.flush().context("stdout")?;
                }
            }
            println!("{{\"rounds\":{},\"blocks\":{moved}}}", a.iterations);
        }
    }
    Ok(())
}
