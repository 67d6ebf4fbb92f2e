//! `kvd-ctl top`: a live terminal view of the daemon — tiers, hit rates and throughput,
//! the disk tier, cluster index, events and peer fetch, namespaces and clients — refreshed
//! every interval from the same statistics as `kvd-ctl status`. Rates are the difference of
//! two samples over the time between them. `--once` renders one frame as plain text (two
//! samples an interval apart), for scripts and tests.

use std::time::{Duration, Instant};

use anyhow::Context;
use kvd_client::{Client, StatsReport};
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};
use ratatui::{Frame, Terminal};

use super::human_bytes;

/// Two samples of the daemon's statistics.
pub struct View {
    /// The newer sample.
    pub now: StatsReport,
    /// The older sample, when there is one.
    pub before: Option<StatsReport>,
    /// Time between them.
    pub elapsed: Duration,
}

impl View {
    fn per_s(&self, new: u64, old: Option<u64>) -> String {
        match old {
            Some(o) if !self.elapsed.is_zero() => {
                let r = new.saturating_sub(o) as f64 / self.elapsed.as_secs_f64();
                if r >= 1e6 {
                    format!("{:.1}M", r / 1e6)
                } else if r >= 1e3 {
                    format!("{:.1}k", r / 1e3)
                } else {
                    format!("{r:.0}")
                }
            }
            _ => "-".into(),
        }
    }

    fn bytes_per_s(&self, new: u64, old: Option<u64>) -> String {
        match old {
            Some(o) if !self.elapsed.is_zero() => {
                let r = new.saturating_sub(o) as f64 / self.elapsed.as_secs_f64();
                format!("{}/s", human_bytes(r as u64))
            }
            _ => "-".into(),
        }
    }
}

fn pct(a: u64, b: u64) -> String {
    if b == 0 {
        "-".into()
    } else {
        format!("{:.1}%", 100.0 * a as f64 / b as f64)
    }
}

/// Draws one frame.
pub fn draw(f: &mut Frame, v: &View) {
    let s = &v.now;
    let head = Style::default().add_modifier(Modifier::BOLD);
    let mut status_lines = vec![Line::from(format!(
        "kvd {}  up {}s  {} clients  (q to quit)",
        s.daemon_version,
        s.uptime_ms / 1000,
        s.clients.len()
    ))];
    if let Some(d) = &s.disk {
        let old = v.before.as_ref().and_then(|b| b.disk.as_ref());
        status_lines.push(Line::from(format!(
            "disk {}  read {}  write {}  free regions {}/{}  checksum failures {}{}",
            d.path,
            v.bytes_per_s(d.read_bytes, old.map(|o| o.read_bytes)),
            v.bytes_per_s(d.write_bytes, old.map(|o| o.write_bytes)),
            d.free_regions,
            d.regions,
            d.checksum_failures,
            if d.degraded.is_empty() {
                String::new()
            } else {
                format!("  DEGRADED: {}", d.degraded)
            }
        )));
    }
    if let Some(x) = &s.index {
        status_lines.push(Line::from(format!(
            "index {}  node {}  {}  published {}",
            x.endpoint,
            x.node,
            if x.connected {
                "connected"
            } else {
                "UNREACHABLE"
            },
            x.published
        )));
    }
    if let Some(x) = &s.peer {
        let old = v.before.as_ref().and_then(|b| b.peer.as_ref());
        status_lines.push(Line::from(format!(
            "peer {}  fetched {}  served {}  failures {}",
            x.advertise,
            v.bytes_per_s(x.fetched_bytes, old.map(|o| o.fetched_bytes)),
            v.bytes_per_s(x.served_bytes, old.map(|o| o.served_bytes)),
            x.fetch_failures
        )));
    }
    if let Some(x) = &s.gpu {
        let old = v.before.as_ref().and_then(|b| b.gpu.as_ref());
        status_lines.push(Line::from(format!(
            "gpu {}  attached {}  D2H {}  H2D {}  errors {}",
            x.backend,
            x.attachments,
            v.bytes_per_s(x.d2h_bytes, old.map(|o| o.d2h_bytes)),
            v.bytes_per_s(x.h2d_bytes, old.map(|o| o.h2d_bytes)),
            x.copy_errors
        )));
    }
    if let Some(x) = &s.s3 {
        let old = v.before.as_ref().and_then(|b| b.s3.as_ref());
        status_lines.push(Line::from(format!(
            "s3 {}{}  up {}  read {}  uploading {}  failures {}",
            x.bucket,
            if x.degraded { " DEGRADED" } else { "" },
            v.bytes_per_s(x.uploaded_bytes, old.map(|o| o.uploaded_bytes)),
            v.bytes_per_s(x.read_bytes, old.map(|o| o.read_bytes)),
            x.uploading,
            x.failures
        )));
    }
    if let Some(x) = &s.events {
        let old = v.before.as_ref().and_then(|b| b.events.as_ref());
        status_lines.push(Line::from(format!(
            "events {}  {} events/s  unannounced {}",
            x.endpoint,
            v.per_s(x.events, old.map(|o| o.events)),
            x.skipped
        )));
    }

    let tiers: Vec<Row> = s
        .tiers
        .iter()
        .map(|t| {
            let old = v
                .before
                .as_ref()
                .and_then(|b| b.tiers.iter().find(|o| o.tier == t.tier));
            Row::new(vec![
                t.tier.name().to_string(),
                human_bytes(t.capacity_bytes),
                human_bytes(t.used_bytes),
                pct(t.used_bytes, t.capacity_bytes),
                t.blocks.to_string(),
                pct(t.hits, t.hits + t.misses),
                v.per_s(t.hits, old.map(|o| o.hits)),
                v.per_s(t.misses, old.map(|o| o.misses)),
                v.per_s(t.evictions, old.map(|o| o.evictions)),
                v.bytes_per_s(t.bytes_in, old.map(|o| o.bytes_in)),
                v.bytes_per_s(t.bytes_out, old.map(|o| o.bytes_out)),
            ])
        })
        .collect();
    let tier_table = Table::new(
        tiers,
        [
            Constraint::Length(6),
            Constraint::Length(10),
            Constraint::Length(10),
            Constraint::Length(7),
            Constraint::Length(10),
            Constraint::Length(9),
            Constraint::Length(9),
            Constraint::Length(9),
            Constraint::Length(9),
            Constraint::Length(12),
            Constraint::Length(12),
        ],
    )
    .header(
        Row::new([
            "TIER", "CAPACITY", "USED", "USE%", "BLOCKS", "HIT RATE", "HITS/S", "MISS/S",
            "EVICT/S", "IN", "OUT",
        ])
        .style(head),
    )
    .block(Block::bordered().title(" tiers "));

    let namespaces: Vec<Row> = s
        .namespaces
        .iter()
        .map(|n| {
            // The tenant's base only: a salt digest stays off the screen.
            let tenant = n.desc.tenant.split('|').next().unwrap_or("");
            Row::new(vec![
                n.ns.short(),
                n.desc.model.clone(),
                if tenant.is_empty() {
                    "-".to_string()
                } else {
                    tenant.to_string()
                },
                n.owner_uid.to_string(),
                human_bytes(n.used_bytes),
                n.blocks.to_string(),
                n.pinned.to_string(),
                n.leases.to_string(),
                pct(n.hits, n.hits + n.misses),
            ])
        })
        .collect();
    let ns_table = Table::new(
        namespaces,
        [
            Constraint::Length(10),
            Constraint::Min(16),
            Constraint::Length(12),
            Constraint::Length(7),
            Constraint::Length(10),
            Constraint::Length(9),
            Constraint::Length(7),
            Constraint::Length(7),
            Constraint::Length(9),
        ],
    )
    .header(
        Row::new([
            "NAMESPACE",
            "MODEL",
            "TENANT",
            "OWNER",
            "USED",
            "BLOCKS",
            "PINNED",
            "LEASES",
            "HIT RATE",
        ])
        .style(head),
    )
    .block(Block::bordered().title(" namespaces "));

    let clients: Vec<Row> = s
        .clients
        .iter()
        .map(|c| {
            let old = v
                .before
                .as_ref()
                .and_then(|b| b.clients.iter().find(|o| o.id == c.id));
            Row::new(vec![
                c.id.to_string(),
                c.name.clone(),
                c.pid.to_string(),
                c.ops.to_string(),
                v.per_s(c.ops, old.map(|o| o.ops)),
                format!("{}/{}", c.sq_depth, c.cq_depth),
            ])
        })
        .collect();
    let client_table = Table::new(
        clients,
        [
            Constraint::Length(6),
            Constraint::Min(16),
            Constraint::Length(8),
            Constraint::Length(12),
            Constraint::Length(9),
            Constraint::Length(9),
        ],
    )
    .header(Row::new(["ID", "NAME", "PID", "RING OPS", "OPS/S", "SQ/CQ"]).style(head))
    .block(Block::bordered().title(" clients "));

    let n_status = status_lines.len() as u16 + 2;
    let [top, mid, bottom, last] = Layout::vertical([
        Constraint::Length(n_status),
        Constraint::Length(s.tiers.len() as u16 + 3),
        Constraint::Min(4),
        Constraint::Min(4),
    ])
    .areas(f.area());
    f.render_widget(
        Paragraph::new(status_lines).block(Block::bordered().title(" kvd top ")),
        top,
    );
    f.render_widget(tier_table, mid);
    f.render_widget(ns_table, bottom);
    f.render_widget(client_table, last);
}

/// Renders one frame into a buffer of `width` × `height` and returns it as text.
pub fn render_text(v: &View, width: u16, height: u16) -> anyhow::Result<String> {
    let mut t = Terminal::new(TestBackend::new(width, height)).context("test terminal")?;
    t.draw(|f| draw(f, v)).context("drawing")?;
    let buf = t.backend().buffer();
    let mut out = String::new();
    for y in 0..buf.area.height {
        let line: String = (0..buf.area.width)
            .map(|x| buf[(x, y)].symbol().to_string())
            .collect();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    Ok(out)
}

/// `kvd-ctl top`: live until q, Esc or Ctrl-C; with `once`, one text frame.
pub fn run(c: &Client, interval: Duration, once: bool) -> anyhow::Result<()> {
    let mut before = c.stats()?;
    let mut t0 = Instant::now();
    if once {
        std::thread::sleep(interval);
        let now = c.stats()?;
        let v = View {
            now,
            before: Some(before),
            elapsed: t0.elapsed(),
        };
        print!("{}", render_text(&v, 120, 40)?);
        return Ok(());
    }
    let mut term = ratatui::init();
    let r = (|| -> anyhow::Result<()> {
        let mut v = View {
            now: before.clone(),
            before: None,
            elapsed: Duration::ZERO,
        };
        loop {
            term.draw(|f| draw(f, &v))?;
            let deadline = Instant::now() + interval;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                if event::poll(left)? {
                    if let Event::Key(k) = event::read()? {
                        let ctrl_c = k.code == KeyCode::Char('c')
                            && k.modifiers.contains(KeyModifiers::CONTROL);
                        if k.kind == KeyEventKind::Press
                            && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c)
                        {
                            return Ok(());
                        }
                    }
                }
            }
            let now = c.stats()?;
            v = View {
                before: Some(std::mem::replace(&mut before, now.clone())),
                now,
                elapsed: t0.elapsed(),
            };
            t0 = Instant::now();
        }
    })();
    ratatui::restore();
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvd_client::{ClientInfo, Tier, TierStats};

    fn report(hits: u64, ops: u64) -> StatsReport {
        StatsReport {
            daemon_version: "9.9.9".into(),
            uptime_ms: 61_000,
            tiers: vec![TierStats {
                tier: Tier::Dram,
                capacity_bytes: 1 << 30,
                used_bytes: 256 << 20,
                blocks: 128,
                hits,
                misses: 10,
                evictions: 0,
                bytes_in: 64 << 20,
                bytes_out: hits << 20,
            }],
            namespaces: vec![],
            clients: vec![ClientInfo {
                id: 7,
                name: "vllm-worker".into(),
                pid: 4242,
                uid: 0,
                admin: false,
                ops,
                sq_depth: 3,
                cq_depth: 0,
            }],
            disk: None,
            index: None,
            events: None,
            peer: None,
            gpu: None,
            s3: None,
        }
    }

    #[test]
    fn a_frame_shows_tiers_rates_and_clients() {
        let v = View {
            now: report(2_090, 5_000),
            before: Some(report(90, 1_000)),
            elapsed: Duration::from_secs(2),
        };
        let text = render_text(&v, 140, 30).unwrap();
        assert!(text.contains("kvd 9.9.9  up 61s  1 clients"), "{text}");
        assert!(
            text.contains("1000.0 MiB/s"),
            "2000 MiB read in 2 s: {text}"
        );
        assert!(text.contains("dram"), "{text}");
        assert!(text.contains("25.0%"), "used share: {text}");
        assert!(text.contains("99.5%"), "hit rate 2090/2100: {text}");
        assert!(text.contains("1.0k"), "2000 hits in 2 s: {text}");
        assert!(
            text.contains("vllm-worker") && text.contains("2.0k") && text.contains("3/0"),
            "{text}"
        );
    }

    #[test]
    fn a_first_frame_has_no_rates_yet() {
        let v = View {
            now: report(5, 5),
            before: None,
            elapsed: Duration::ZERO,
        };
        let text = render_text(&v, 110, 30).unwrap();
        assert!(text.contains(" - "), "{text}");
    }
}
