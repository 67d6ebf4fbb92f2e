//! What the engine told kvd about its blocks beyond their bytes: each block's tokens and
//! parent key, for KV events.
//!
//! A block's key is a hash; a consumer of KV events (llm-d's precise prefix-cache scorer)
//! needs the tokens behind it and its parent to place it, and drops a `BlockStored` event
//! without them. The engine's scheduler knows both and sends them ([`Request::Lineage`])
//! before its workers store the blocks; the event publisher looks them up here when the
//! store shows up in a tier's journal. The table is bounded by a block count and forgets
//! the oldest first: a block demoted long after it was stored may find its lineage gone,
//! and its event is then skipped (and counted) rather than sent incomplete.
//!
//! [`Request::Lineage`]: kvd_proto::Request::Lineage

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use kvd_proto::{BlockKey, NamespaceId};

/// Tokens and parent of one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Key of the block before it in its sequence; `None` for a first block.
    pub parent: Option<BlockKey>,
    /// Its token ids.
    pub tokens: Box<[u32]>,
}

/// What the events need to know about a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Space {
    /// Model name (the topic's last part).
    pub model: Arc<str>,
    /// LoRA adapter name; `None` for the base model.
    pub lora: Option<Arc<str>>,
    /// Tokens per block.
    pub block_tokens: u32,
}

/// Bounded table of block lineages, oldest forgotten first.
#[derive(Debug)]
pub struct Lineage {
    entries: HashMap<(NamespaceId, BlockKey), Entry>,
    order: VecDeque<(NamespaceId, BlockKey)>,
    spaces: HashMap<NamespaceId, Space>,
    cap: usize,
}

impl Lineage {
    /// A table of at most `cap` blocks.
    pub fn new(cap: usize) -> Lineage {
        Lineage {
            entries: HashMap::new(),
            order: VecDeque::new(),
            spaces: HashMap::new(),
            cap: cap.max(1),
        }
    }

    /// Records a chain: `keys[0]`'s parent is `parent`, each next key's parent the key before
    /// it; `tokens` holds `block_tokens` ids per key (the caller checked the length).
    /// Returns how many blocks were recorded.
    pub fn record(
        &mut self,
        ns: NamespaceId,
        space: Space,
        parent: Option<BlockKey>,
        keys: &[BlockKey],
        tokens: &[u32],
    ) -> usize {
        let per = space.block_tokens as usize;
        self.spaces.insert(ns, space);
        let mut prev = parent;
        for (key, toks) in keys.iter().zip(tokens.chunks_exact(per.max(1))) {
            let entry = Entry {
                parent: prev,
                tokens: toks.into(),
            };
            if self.entries.insert((ns, *key), entry).is_none() {
                self.order.push_back((ns, *key));
            }
            prev = Some(*key);
        }
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.entries.remove(&old);
            }
        }
        keys.len().min(tokens.len() / per.max(1))
    }

    /// The lineage of a block, if still known.
    pub fn get(&self, ns: &NamespaceId, key: &BlockKey) -> Option<&Entry> {
        self.entries.get(&(*ns, *key))
    }

    /// The namespace's model and block size, once a lineage of it was recorded.
    pub fn space(&self, ns: &NamespaceId) -> Option<&Space> {
        self.spaces.get(ns)
    }

    /// Namespaces seen so far.
    pub fn spaces(&self) -> impl Iterator<Item = (&NamespaceId, &Space)> {
        self.spaces.iter()
    }

    /// Blocks remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u8) -> BlockKey {
        BlockKey([i; 32])
    }

    fn space() -> Space {
        Space {
            model: "m".into(),
            lora: None,
            block_tokens: 2,
        }
    }

    #[test]
    fn a_chain_links_each_block_to_the_one_before() {
        let ns = NamespaceId([1; 16]);
        let mut l = Lineage::new(16);
        assert_eq!(
            l.record(
                ns,
                space(),
                Some(k(9)),
                &[k(1), k(2), k(3)],
                &[1, 2, 3, 4, 5, 6]
            ),
            3
        );
        assert_eq!(l.get(&ns, &k(1)).unwrap().parent, Some(k(9)));
        assert_eq!(l.get(&ns, &k(3)).unwrap().parent, Some(k(2)));
        assert_eq!(&*l.get(&ns, &k(2)).unwrap().tokens, &[3, 4]);
        assert!(l.get(&NamespaceId([2; 16]), &k(1)).is_none());
        assert_eq!(l.space(&ns).unwrap().block_tokens, 2);
    }

    #[test]
    fn the_oldest_blocks_are_forgotten_first_and_a_rerecord_does_not_count_twice() {
        let ns = NamespaceId([1; 16]);
        let mut l = Lineage::new(3);
        l.record(ns, space(), None, &[k(1), k(2)], &[0; 4]);
        l.record(ns, space(), None, &[k(1)], &[7, 7]);
        assert_eq!(l.len(), 2);
        l.record(ns, space(), Some(k(2)), &[k(3), k(4)], &[0; 4]);
        assert_eq!(l.len(), 3);
        assert!(l.get(&ns, &k(1)).is_none());
        assert!(l.get(&ns, &k(4)).is_some());
    }
}
