//! Residency changes — "this node now holds / no longer holds block K of namespace N in tier
//! T" — recorded where they happen, for the cluster index to publish.
//!
//! The tiers' catalogs (the DRAM store, the disk tier's index) push a [`Change`] into their
//! [`Journal`] under the lock they already hold; the index publisher takes the batch from
//! time to time and sends it to Redis. Nothing here does IO, so recording costs a `Vec` push.
//! A journal is bounded: when the publisher cannot keep up (or Redis is away) it stops
//! recording and remembers that it lost changes, and the publisher then republishes the
//! node's whole state under a new epoch instead of replaying a partial history. A journal
//! made with [`Journal::off`] (no index configured) records nothing.

use kvd_proto::{BlockKey, NamespaceId, Tier};

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
