//! `kvd`: the per-node KV-cache daemon.
//!
//! Loads and validates the configuration, creates the DRAM arenas, opens the disk tier (if
//! configured), serves the control socket and the shared-memory rings, and shuts down cleanly on SIGTERM or SIGINT (closing every
//! client, releasing everything they held, removing the socket file).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use kvd::config::{Config, LogFormat};
use kvd::daemon::Daemon;

/// kvd keeps LLM KV-cache blocks in shared DRAM, and on local NVMe below it, for every engine
/// process on this node.
///
/// Configuration is layered: the TOML file (--config or $KVD_CONFIG), then environment
/// variables KVD_<SECTION>_<KEY> (e.g. KVD_DRAM_ARENA_BYTES=2GiB), then --set section.key=value.
/// See config/kvd.toml for every key with its default and meaning; the disk tier is off until
/// disk.capacity_bytes is set (e.g. --set disk.capacity_bytes=500GiB --set disk.path=/nvme/kvd).
#[derive(Debug, Parser)]
#[command(name = "kvd", version, about, long_about)]
struct Cli {
    /// TOML configuration file.
    #[arg(short, long, env = "KVD_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Override one key, e.g. --set dram.arena_bytes=256MiB (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Control socket path (shorthand for --set server.socket_path=PATH).
    #[arg(short, long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Validate the configuration, print it, and exit.
    #[arg(long)]
    check_config: bool,
}

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log.level));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match cfg.log.format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut sets = cli.sets.clone();
    if let Some(s) = &cli.socket {
        sets.push(format!("server.socket_path={}", s.display()));
    }
    let cfg = Config::load(cli.config.as_deref(), std::env::vars(), &sets)
        .context("loading the configuration")?;
    if cli.check_config {
        // Secrets print redacted (Redis URLs without their passwords).
        println!(
            "{}",
            toml::to_string_pretty(&cfg).context("printing the configuration")?
        );
        eprintln!("configuration is valid");
        return Ok(());
    }
    init_logging(&cfg);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kvd-io")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run(cfg))
}

/// A background task and the notifier that stops it.
type Task = (Arc<tokio::sync::Notify>, tokio::task::JoinHandle<()>);

/// Starts what runs beside the control socket: the cluster index and KV event publishers
/// (each fed residency changes on its own bounded channel, so neither waits for the other),
/// the peer data port and the metrics endpoint. Returns the publishers' feed ends, the tasks,
/// and how often the feed must run.
async fn start_publishers(
    daemon: &Arc<Daemon>,
) -> anyhow::Result<(Vec<kvd::residency::Subscriber>, Vec<Task>, u32)> {
    let mut subs = Vec::new();
    let mut tasks: Vec<Task> = Vec::new();
    let mut interval_ms = u32::MAX;
    if daemon.cfg.index.enabled() {
        let (sub, rx) = kvd::residency::channel();
        subs.push(sub);
        interval_ms = interval_ms.min(daemon.cfg.index.publish_interval_ms);
        let stop = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(kvd::index::run(daemon.clone(), rx, stop.clone()));
        tasks.push((stop, task));
    } else {
        tracing::info!("no cluster index configured (index.redis_urls): local index only");
    }
    if let Some(events) = &daemon.events {
        let (sub, rx) = kvd::residency::channel();
        subs.push(sub);
        interval_ms = interval_ms.min(daemon.cfg.events.publish_interval_ms);
        let stop = Arc::new(tokio::sync::Notify::new());
        let task = kvd::events::start(daemon.clone(), events.clone(), rx, stop.clone()).await?;
        tasks.push((stop, task));
    }
    if let Some(peer) = &daemon.peer {
        let listener = kvd::peer::bind(&daemon.cfg.peer)
            .await
            .with_context(|| format!("binding the peer data port {}", daemon.cfg.peer.listen))?;
        if daemon.index.is_none() {
            tracing::info!(
                "peer data port without a cluster index ([index]): this node \
                serves its blocks to peers but cannot find any to fetch from"
            );
        }
        if !peer.authenticated() {
            tracing::warn!(
                "peer.tls = \"off\": the data port serves every open namespace's blocks to \
                anyone who reaches it, and blocks are taken from whatever address the cluster \
                index names; use it only on a network nobody else can reach (docs/security.md)"
            );
        }
        tracing::info!(listen = %daemon.cfg.peer.listen, advertise = %peer.advertise(),
            tls = peer.authenticated(), "peer data port ready");
        let stop = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(kvd::peer::serve(daemon.clone(), listener, stop.clone()));
        tasks.push((stop, task));
    }
    if let Some(s3) = &daemon.s3 {
        let stop = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(s3.clone().maintain(stop.clone()));
        tasks.push((stop, task));
    }
    if !daemon.cfg.metrics.listen.is_empty() {
        let listener = kvd::metrics::bind(&daemon.cfg.metrics.listen).await?;
        tracing::info!(listen = %daemon.cfg.metrics.listen, "metrics: /metrics /healthz /readyz");
        let stop = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(kvd::metrics::serve(daemon.clone(), listener, stop.clone()));
        tasks.push((stop, task));
    }
    Ok((subs, tasks, interval_ms))
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    // Handlers first: once the socket accepts, a SIGTERM must mean a clean shutdown.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the SIGINT handler")?;
    let path = cfg.server.socket_path.clone();
    let listener = kvd::server::bind(&path, cfg.server.socket_mode, cfg.server.replace_socket)?;
    let daemon = match Daemon::new(cfg) {
        Ok(d) => d,
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            return Err(e).context("starting the tiers");
        }
    };
    // Every TCP/ZMQ endpoint is bound before the control socket serves, so a bad address
    // fails the start with nothing to wind down but the socket file.
    let (subs, publishers, interval_ms) = match start_publishers(&daemon).await {
        Ok(p) => p,
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
    };
    let stop = Arc::new(tokio::sync::Notify::new());
    let server = tokio::spawn(kvd::server::serve(daemon.clone(), listener, stop.clone()));
    let feed_stop = Arc::new(tokio::sync::Notify::new());
    let feed = tokio::spawn(kvd::residency::run(
        daemon.clone(),
        subs,
        std::time::Duration::from_millis(u64::from(interval_ms.min(60_000))),
        feed_stop.clone(),
    ));
    tracing::info!(socket = %path.display(), version = kvd::daemon::VERSION, "kvd ready");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    stop.notify_one();
    let _ = server.await;
    // Clients are gone: what only DRAM holds goes to disk (bounded), so a restart finds it.
    let deadline = std::time::Duration::from_millis(u64::from(daemon.cfg.server.shutdown_drain_ms));
    let t = std::time::Instant::now();
    match daemon.drain_for_shutdown(deadline).await {
        (0, _) => {}
        (n, 0) => tracing::info!(
            blocks = n,
            ms = t.elapsed().as_millis() as u64,
            "shutdown drain: DRAM blocks written to disk / uploaded to S3"
        ),
        (n, left) => tracing::warn!(
            blocks = n,
            left,
            ms = t.elapsed().as_millis() as u64,
            "shutdown drain: deadline (server.shutdown_drain_ms) passed; these blocks are lost"
        ),
    }
    feed_stop.notify_one();
    let _ = feed.await;
    for (stop, task) in publishers {
        stop.notify_one();
        let _ = task.await;
    }
    daemon.stop_background();
    let _ = std::fs::remove_file(&path);
    tracing::info!("kvd stopped");
    Ok(())
}
