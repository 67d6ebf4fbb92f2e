//! Test client process for the integration tests: drives a daemon in one of several modes so
//! the tests can run clients concurrently and kill them at awkward moments.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use kvd_client::{BlockKey, Client, Options, PutOutcome};
use kvd_tests::{pattern, test_namespace};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    /// Puts, then reads back and verifies, `--iterations` rounds over `--blocks` keys.
    Churn,
    /// Reserves slots and never commits, printing `ready` once some are held; waits to be killed.
    HoldPut,
    /// Stores blocks, takes read leases on them and never releases; waits to be killed.
    HoldGet,
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
}

fn key(seed: u64, i: u64) -> BlockKey {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&seed.to_le_bytes());
    k[8..16].copy_from_slice(&i.to_le_bytes());
    BlockKey(k)
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
    let ns = client.open_namespace(&test_namespace(&a.model))?;
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
    }
    Ok(())
}
