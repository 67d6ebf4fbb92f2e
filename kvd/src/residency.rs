//! Residency changes — "this node now holds / no longer holds block K of namespace N in tier
//! T" — recorded where they happen, for the cluster index and the KV events to publish.
//!
//! The tiers' catalogs (the DRAM store, the disk tier's index) push a [`Change`] into their
//! [`Journal`] under the lock they already hold; the [`run`] task takes them from time to
//! time and hands the same batch to every publisher (Redis, ZMQ events) through a bounded
//! channel each. Nothing on the tiers' side does IO, so recording costs a `Vec` push.
//! A journal is bounded, and so is each publisher's channel: when a publisher cannot keep
//! up (or its server is away) changes are dropped and the publisher is told so
//! ([`Batch::lost`]); it then republishes the node's whole state instead of replaying a
//! partial history. A journal made with [`Journal::off`] (nothing to publish to) records
//! nothing.

use std::sync::Arc;
use std::time::Duration;

use kvd_proto::{BlockKey, NamespaceId, Tier};
use tokio::sync::mpsc;

use crate::daemon::Daemon;

/// One residency change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// Namespace of the block.
    pub ns: NamespaceId,
    /// The block.
    pub key: BlockKey,
    /// Tier that gained or lost it.
    pub tier: Tier,
    /// True: now held; false: no longer held.
    pub stored: bool,
}

impl Change {
    /// "Now held in `tier`".
    pub fn stored(ns: NamespaceId, key: BlockKey, tier: Tier) -> Change {
        Change {
            ns,
            key,
            tier,
            stored: true,
        }
    }

    /// "No longer held in `tier`".
    pub fn removed(ns: NamespaceId, key: BlockKey, tier: Tier) -> Change {
        Change {
            stored: false,
            ..Change::stored(ns, key, tier)
        }
    }
}

/// Bounded list of changes not yet taken by the publisher.
#[derive(Debug, Default)]
pub struct Journal {
    changes: Vec<Change>,
    cap: usize,
    lost: bool,
}

/// What [`Journal::take`] hands over.
#[derive(Debug, Default)]
pub struct Taken {
    /// Changes in the order they happened.
    pub changes: Vec<Change>,
    /// Some changes were dropped because the journal was full: the recorded ones are not the
    /// whole story.
    pub lost: bool,
}

impl Journal {
    /// A journal that records nothing (no cluster index configured).
    pub fn off() -> Journal {
        Journal::default()
    }

    /// A journal holding at most `cap` changes between two takes.
    pub fn new(cap: usize) -> Journal {
        Journal {
            changes: Vec::new(),
            cap,
            lost: false,
        }
    }

    /// Whether changes are recorded at all.
    pub fn is_on(&self) -> bool {
        self.cap > 0
    }

    /// Records a change; when full, drops it and remembers that changes were lost.
    #[inline]
    pub fn record(&mut self, ns: NamespaceId, key: BlockKey, tier: Tier, stored: bool) {
        if self.cap == 0 {
            return;
        }
        if self.changes.len() >= self.cap {
            self.lost = true;
            return;
        }
        self.changes.push(Change {
            ns,
            key,
            tier,
            stored,
        });
    }

    /// Hands over everything recorded since the last take and starts afresh.
    pub fn take(&mut self) -> Taken {
        Taken {
            changes: std::mem::take(&mut self.changes),
            lost: std::mem::replace(&mut self.lost, false),
        }
    }
}

/// Changes handed to one publisher.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// In the order they happened (per tier).
    pub changes: Arc<[Change]>,
    /// Changes before these were dropped: the publisher must resynchronise.
    pub lost: bool,
}

/// Batches a publisher's channel holds before further ones are dropped (and it is told).
pub const FEED_BATCHES: usize = 256;

/// One publisher's end of the feed.
pub struct Subscriber {
    tx: mpsc::Sender<Batch>,
    lost: bool,
}

/// A publisher's channel: the [`Subscriber`] goes to [`run`], the receiver to the publisher.
pub fn channel() -> (Subscriber, mpsc::Receiver<Batch>) {
    let (tx, rx) = mpsc::channel(FEED_BATCHES);
    (Subscriber { tx, lost: false }, rx)
}

/// Everything waiting in a publisher's channel, as one list, and whether any was lost.
pub fn drain(rx: &mut mpsc::Receiver<Batch>) -> (Vec<Change>, bool) {
    let (mut all, mut lost) = (Vec::new(), false);
    while let Ok(b) = rx.try_recv() {
        lost |= b.lost;
        all.extend_from_slice(&b.changes);
    }
    (all, lost)
}

/// Changes recorded by every tier since the last call, and whether any were lost.
pub fn take_changes(daemon: &Daemon) -> (Vec<Change>, bool) {
    let mut all = daemon.take_orphan_changes();
    let mut lost = false;
    for ns in daemon.namespaces() {
        let t = ns.store.lock().take_changes();
        lost |= t.lost;
        all.extend(t.changes);
    }
    if let Some(disk) = &daemon.disk {
        let t = disk.take_changes();
        lost |= t.lost;
        all.extend(t.changes);
    }
    (all, lost)
}

/// Hands the tiers' changes to every subscriber every `interval`, until `stop` fires (one
/// last round then, so what the shutdown drain wrote is published) or every publisher has
/// gone.
pub async fn run(
    daemon: Arc<Daemon>,
    mut subs: Vec<Subscriber>,
    interval: Duration,
    stop: Arc<tokio::sync::Notify>,
) {
    while !subs.is_empty() {
        let last = tokio::select! {
            _ = stop.notified() => true,
            _ = tokio::time::sleep(interval) => false,
        };
        fan_out(&daemon, &mut subs);
        if last {
            break;
        }
    }
}

/// One round: the changes since the last one to every subscriber (a full channel marks the
/// subscriber as having lost changes; a closed one is dropped).
fn fan_out(daemon: &Daemon, subs: &mut Vec<Subscriber>) {
    let (changes, lost) = take_changes(daemon);
    if changes.is_empty() && !lost && !subs.iter().any(|s| s.lost) {
        return;
    }
    let changes: Arc<[Change]> = changes.into();
    subs.retain_mut(|s| {
        let b = Batch {
            changes: changes.clone(),
            lost: lost || s.lost,
        };
        match s.tx.try_send(b) {
            Ok(()) => {
                s.lost = false;
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                s.lost = true;
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u8) -> BlockKey {
        BlockKey([i; 32])
    }

    #[test]
    fn off_records_nothing() {
        let mut j = Journal::off();
        assert!(!j.is_on());
        j.record(NamespaceId([1; 16]), k(1), Tier::Dram, true);
        let t = j.take();
        assert!(t.changes.is_empty() && !t.lost);
    }

    #[test]
    fn full_journal_drops_and_says_so_once() {
        let ns = NamespaceId([1; 16]);
        let mut j = Journal::new(2);
        for i in 0..5 {
            j.record(ns, k(i), Tier::Disk, i % 2 == 0);
        }
        let t = j.take();
        assert_eq!(t.changes.len(), 2);
        assert_eq!((t.changes[1].key, t.changes[1].stored), (k(1), false));
        assert!(t.lost);
        j.record(ns, k(9), Tier::Dram, true);
        let t = j.take();
        assert_eq!(t.changes.len(), 1);
        assert!(!t.lost, "a take resets the lost flag");
    }
}
