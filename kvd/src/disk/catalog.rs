//! The disk tier's durable catalog in RocksDB: which blocks are in which region, at which
//! offset, with which checksum, and the format it was written in; and, for the S3 tier, the
//! index of every segment this node knows, so a restart does not read them all from S3.
//!
//! RocksDB gives ordered keys (a region's blocks are one prefix scan), atomic write batches (a
//! reclaim deletes a region's blocks in one batch) and a write-ahead log, so after `kill -9` the
//! catalog holds exactly the batches that returned. Batches recording written blocks sync the
//! log (`disk.catalog_sync_ms`: with every batch by default, or at most that often), after the
//! region data they name was written with `O_DSYNC`: a power failure loses at most the
//! unsynced last batches, which then are simply misses (the data they named is never trusted
//! without the catalog and a checksum).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kvd_proto::{BlockKey, NamespaceId};
use parking_lot::Mutex;
use rocksdb::{Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};

use super::format::{
    block_key, parse_block_key, parse_region_value, region_key, region_prefix, region_value,
    BlockRecord, CatalogMeta, FormatError, META_KEY,
};

/// A catalog failure.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// RocksDB refused to open the directory.
    #[error("cannot open the disk catalog at {path}: {message}")]
    Open {
        /// Catalog directory.
        path: PathBuf,
        /// RocksDB's explanation.
        message: String,
    },
    /// The catalog was written by another format or is not a kvd catalog.
    #[error("the disk catalog at {path} {why}; move it away or point disk.path elsewhere")]
    Foreign {
        /// Catalog directory.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A read or write failed.
    #[error("disk catalog {op} failed: {message}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// RocksDB's explanation.
        message: String,
    },
}

/// The catalog.
pub struct Catalog {
    db: DB,
    path: PathBuf,
    /// `disk.catalog_sync_ms`.
    sync_every: Duration,
    /// When a batch of new blocks last synced the log.
    last_sync: Mutex<Option<Instant>>,
    /// When the mark was last written.
    last_mark: Mutex<Option<Instant>>,
    /// Writes the catalog had synced (per its mark) but lacked at open.
    lost_at_open: u64,
}

/// How often, at most, the mark is rewritten.
const MARK_EVERY: Duration = Duration::from_secs(1);

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog").field("path", &self.path).finish()
    }
}

fn io(op: &'static str) -> impl Fn(rocksdb::Error) -> CatalogError {
    move |e| CatalogError::Io {
        op,
        message: e.into_string(),
    }
}

/// Catalog key of a namespace's owner record: `o:` ‖ namespace id.
fn owner_key(ns: &NamespaceId) -> [u8; 18] {
    let mut k = [0u8; 18];
    k[..2].copy_from_slice(b"o:");
    k[2..].copy_from_slice(&ns.0);
    k
}

/// Catalog key of an S3 segment record: `s:` ‖ object key.
fn segment_key(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + name.len());
    k.extend_from_slice(b"s:");
    k.extend_from_slice(name.as_bytes());
    k
}

impl Catalog {
    /// Opens (creating if absent) the catalog at `path`. `fresh` is the metadata to write into
    /// a new catalog; an existing one must have the same version and region size.
    pub fn open(path: &Path, fresh: CatalogMeta) -> Result<(Catalog, CatalogMeta), CatalogError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_max_open_files(256);
        opts.set_keep_log_file_num(4);
        opts.increase_parallelism(1);
        let db = DB::open(&opts, path).map_err(|e| CatalogError::Open {
            path: path.to_owned(),
            message: e.into_string(),
        })?;
        let mut cat = Catalog {
            db,
            path: path.to_owned(),
            sync_every: Duration::ZERO,
            last_sync: Mutex::new(None),
            last_mark: Mutex::new(None),
            lost_at_open: 0,
        };
        cat.lost_at_open = cat
            .read_mark()
            .saturating_sub(cat.db.latest_sequence_number());
        let foreign = |why: String| CatalogError::Foreign {
            path: path.to_owned(),
            why,
        };
        let meta = match cat.db.get(META_KEY).map_err(io("read of metadata"))? {
            Some(b) => CatalogMeta::decode(&b).map_err(|e| match e {
                FormatError::Version { found, .. } => foreign(format!(
                    "was written by kvd disk format {found}; this kvd reads format {}",
                    super::format::FORMAT_VERSION
                )),
                other => foreign(format!("has unreadable metadata ({other})")),
            })?,
            None => {
                let mut it = cat.db.iterator(IteratorMode::Start);
                if it.next().is_some() {
                    return Err(foreign("holds data but no kvd metadata".into()));
                }
                cat.db
                    .put(META_KEY, fresh.encode())
                    .map_err(io("write of metadata"))?;
                fresh
            }
        };
        if meta.region_bytes != fresh.region_bytes {
            return Err(foreign(format!(
                "was created with disk.region_bytes = {} but the configuration says {}",
                meta.region_bytes, fresh.region_bytes
            )));
        }
        Ok((cat, meta))
    }

    /// Directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the mark lives: beside the catalog directory. It holds the RocksDB sequence number
    /// of the last synced write, so a catalog that comes back behind it (its write-ahead log
    /// truncated or damaged) is noticed at open.
    fn mark_path(&self) -> PathBuf {
        self.path.with_extension("mark")
    }

    fn read_mark(&self) -> u64 {
        std::fs::read(self.mark_path())
            .ok()
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map_or(0, u64::from_le_bytes)
    }

    /// Records the sequence number of the last synced write (written to a temporary file,
    /// synced, renamed over the mark; an older mark left by a crash is only a lower bound).
    fn write_mark(&self, force: bool) {
        let mut last = self.last_mark.lock();
        if !force && last.is_some_and(|t| t.elapsed() < MARK_EVERY) {
            return;
        }
        let tmp = self.path.with_extension("mark.tmp");
        let seq = self.db.latest_sequence_number();
        let r = std::fs::write(&tmp, seq.to_le_bytes())
            .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, self.mark_path()));
        match r {
            Ok(()) => *last = Some(Instant::now()),
            Err(e) => tracing::warn!(error = %e, "cannot write the disk catalog's mark"),
        }
    }

    /// Writes (sequence numbers) the catalog had synced before but lacked at open: nonzero
    /// when its write-ahead log lost a tail. Put batches take two per block.
    pub fn lost_at_open(&self) -> u64 {
        self.lost_at_open
    }

    /// Syncs the log with a batch of new blocks at most every `every` (zero: every batch).
    pub fn set_sync_interval(&mut self, every: Duration) {
        self.sync_every = every;
    }

    /// Records newly written blocks (one atomic batch), syncing the log as configured.
    pub fn put_blocks(
        &self,
        blocks: &[(NamespaceId, BlockKey, BlockRecord)],
    ) -> Result<(), CatalogError> {
        let mut b = WriteBatch::default();
        for (ns, key, rec) in blocks {
            b.put(block_key(ns, key), rec.encode());
            b.put(region_key(rec.region, rec.offset), region_value(ns, key));
        }
        let mut last = self.last_sync.lock();
        let sync = last.is_none_or(|t| t.elapsed() >= self.sync_every);
        let mut o = WriteOptions::default();
        o.set_sync(sync);
        self.db
            .write_opt(b, &o)
            .map_err(io("write of new blocks"))?;
        if sync {
            *last = Some(Instant::now());
            drop(last);
            self.write_mark(false);
        }
        Ok(())
    }

    /// Updates blocks' access statistics (one batch).
    pub fn touch_many(
        &self,
        blocks: &[(NamespaceId, BlockKey, BlockRecord)],
    ) -> Result<(), CatalogError> {
        let mut b = WriteBatch::default();
        for (ns, key, rec) in blocks {
            b.put(block_key(ns, key), rec.encode());
        }
        self.db.write(b).map_err(io("update of access statistics"))
    }

    /// Removes blocks (one atomic batch).
    pub fn delete_blocks(
        &self,
        blocks: &[(NamespaceId, BlockKey, u32, u64)],
    ) -> Result<(), CatalogError> {
        let mut b = WriteBatch::default();
        for (ns, key, region, offset) in blocks {
            b.delete(block_key(ns, key));
            b.delete(region_key(*region, *offset));
        }
        self.db.write(b).map_err(io("delete of blocks"))
    }

    /// Removes every block of `region` in one batch and returns them.
    pub fn reclaim(&self, region: u32) -> Result<Vec<(NamespaceId, BlockKey)>, CatalogError> {
        let prefix = region_prefix(region);
        let mut gone = Vec::new();
        let mut b = WriteBatch::default();
        for item in self
            .db
            .iterator(IteratorMode::From(&prefix, Direction::Forward))
        {
            let (k, v) = item.map_err(io("scan of a region"))?;
            if !k.starts_with(&prefix) {
                break;
            }
            if let Some((ns, key)) = parse_region_value(&v) {
                // Only if the block record still points here (a re-written key moved on).
                let bk = block_key(&ns, &key);
                let here = self
                    .db
                    .get(bk)
                    .map_err(io("read of a block record"))?
                    .and_then(|r| BlockRecord::decode(&r).ok())
                    .is_some_and(|r| r.region == region);
                if here {
                    b.delete(bk);
                    gone.push((ns, key));
                }
            }
            b.delete(&k);
        }
        self.db.write(b).map_err(io("reclaim of a region"))?;
        Ok(gone)
    }

    /// Records an S3 segment this node knows: its object size and its trailer-and-index
    /// bytes (the S3 tier decodes and checks them again when it reads them back).
    pub fn put_segment(&self, name: &str, size: u64, index: &[u8]) -> Result<(), CatalogError> {
        let mut v = Vec::with_capacity(8 + index.len());
        v.extend_from_slice(&size.to_le_bytes());
        v.extend_from_slice(index);
        self.db
            .put(segment_key(name), v)
            .map_err(io("write of a segment record"))
    }

    /// Forgets S3 segments (one batch).
    pub fn delete_segments(&self, names: &[&str]) -> Result<(), CatalogError> {
        let mut b = WriteBatch::default();
        for n in names {
            b.delete(segment_key(n));
        }
        self.db.write(b).map_err(io("delete of segment records"))
    }

    /// Records which tenant (its base) a namespace's blocks count against. Not synced on its
    /// own: the synced batch of the namespace's first blocks, which follows, carries it.
    pub fn put_owner(&self, ns: &NamespaceId, tenant: &str) -> Result<(), CatalogError> {
        self.db
            .put(owner_key(ns), tenant.as_bytes())
            .map_err(io("write of a namespace owner"))
    }

    /// Forgets namespaces' owner records (one batch).
    pub fn delete_owners(&self, namespaces: &[NamespaceId]) -> Result<(), CatalogError> {
        let mut b = WriteBatch::default();
        for ns in namespaces {
            b.delete(owner_key(ns));
        }
        self.db.write(b).map_err(io("delete of namespace owners"))
    }

    /// Every namespace owner record; records that are not a namespace id and UTF-8 are skipped.
    pub fn owners(&self) -> Result<Vec<(NamespaceId, String)>, CatalogError> {
        let mut v = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(b"o:", Direction::Forward))
        {
            let (k, t) = item.map_err(io("scan of namespace owners"))?;
            let Some(id) = k.strip_prefix(b"o:") else {
                break;
            };
            if let (Ok(id), Ok(t)) = (<[u8; 16]>::try_from(id), std::str::from_utf8(&t)) {
                v.push((NamespaceId(id), t.to_owned()));
            }
        }
        Ok(v)
    }

    /// Every S3 segment record: name, object size, trailer-and-index bytes. Records too short
    /// to hold a size are skipped.
    pub fn scan_segments(&self, mut f: impl FnMut(&str, u64, &[u8])) -> Result<(), CatalogError> {
        for item in self
            .db
            .iterator(IteratorMode::From(b"s:", Direction::Forward))
        {
            let (k, v) = item.map_err(io("scan of segment records"))?;
            let Some(name) = k.strip_prefix(b"s:") else {
                break;
            };
            if let (Ok(name), Some((size, rest))) =
                (std::str::from_utf8(name), v.split_at_checked(8))
            {
                let mut a = [0u8; 8];
                a.copy_from_slice(size);
                f(name, u64::from_le_bytes(a), rest);
            }
        }
        Ok(())
    }

    /// Every block record, in key order; undecodable records come back as errors with their key.
    pub fn scan_blocks(
        &self,
        mut f: impl FnMut(NamespaceId, BlockKey, Result<BlockRecord, FormatError>),
    ) -> Result<(), CatalogError> {
        for item in self
            .db
            .iterator(IteratorMode::From(b"b", Direction::Forward))
        {
            let (k, v) = item.map_err(io("scan of block records"))?;
            if k.first() != Some(&b'b') {
                break;
            }
            if let Some((ns, key)) = parse_block_key(&k) {
                f(ns, key, BlockRecord::decode(&v));
            }
        }
        Ok(())
    }

    /// Up to `limit` block keys after `after` (from the first when `None`), in key order: a
    /// page of what the disk holds, read without stopping writers.
    pub fn block_keys(
        &self,
        after: Option<(NamespaceId, BlockKey)>,
        limit: usize,
    ) -> Result<Vec<(NamespaceId, BlockKey)>, CatalogError> {
        let start = after.map(|(ns, key)| block_key(&ns, &key));
        let from: &[u8] = start.as_ref().map_or(b"b", |k| &k[..]);
        let mut out = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(from, Direction::Forward))
        {
            let (k, _) = item.map_err(io("scan of block keys"))?;
            if k.first() != Some(&b'b') || out.len() >= limit {
                break;
            }
            match parse_block_key(&k) {
                Some(nk) if Some(nk) != after => out.push(nk),
                _ => {}
            }
        }
        Ok(out)
    }

    /// Every region-index entry as (region, offset, ns, key).
    pub fn scan_region_index(
        &self,
        mut f: impl FnMut(u32, u64, Option<(NamespaceId, BlockKey)>),
    ) -> Result<(), CatalogError> {
        for item in self
            .db
            .iterator(IteratorMode::From(b"r", Direction::Forward))
        {
            let (k, v) = item.map_err(io("scan of the region index"))?;
            if k.first() != Some(&b'r') || k.len() != 13 {
                break;
            }
            let mut r = [0u8; 4];
            r.copy_from_slice(&k[1..5]);
            let mut o = [0u8; 8];
            o.copy_from_slice(&k[5..13]);
            f(
                u32::from_be_bytes(r),
                u64::from_be_bytes(o),
                parse_region_value(&v),
            );
        }
        Ok(())
    }

    /// Removes raw region-index entries (leftovers found at start).
    pub fn delete_region_entries(&self, entries: &[(u32, u64)]) -> Result<(), CatalogError> {
        let mut b = WriteBatch::default();
        for (r, o) in entries {
            b.delete(region_key(*r, *o));
        }
        self.db.write(b).map_err(io("cleanup of the region index"))
    }

    /// Flushes the memtable and WAL (clean shutdown, drain).
    pub fn flush(&self) -> Result<(), CatalogError> {
        self.db.flush_wal(true).map_err(io("WAL flush"))?;
        self.write_mark(true);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(region_bytes: u64) -> CatalogMeta {
        CatalogMeta {
            version: super::super::format::FORMAT_VERSION,
            region_bytes,
            instance: 77,
            regions: 2,
            flags: 0,
        }
    }

    fn rec(region: u32, offset: u64) -> BlockRecord {
        BlockRecord {
            region,
            seq: 1,
            offset,
            len: 10,
            checksum: 5,
            stored_unix_ms: 0,
            hits: 0,
            last_unix_ms: 0,
        }
    }

    #[test]
    fn block_keys_come_in_pages_in_key_order() {
        let d = tempfile::tempdir().unwrap();
        let (c, _) = Catalog::open(&d.path().join("cat"), meta(1 << 20)).unwrap();
        let (a, b) = (NamespaceId([1; 16]), NamespaceId([2; 16]));
        let blocks: Vec<_> = [(b, 3u8), (a, 9), (a, 1), (b, 0), (a, 5)]
            .iter()
            .enumerate()
            .map(|(i, &(ns, k))| (ns, BlockKey([k; 32]), rec(0, 4096 * i as u64)))
            .collect();
        c.put_blocks(&blocks).unwrap();
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = c.block_keys(after, 2).unwrap();
            assert!(page.len() <= 2);
            let Some(&last) = page.last() else { break };
            seen.extend(page);
            after = Some(last);
        }
        let want: Vec<_> = [(a, 1u8), (a, 5), (a, 9), (b, 0), (b, 3)]
            .iter()
            .map(|&(ns, k)| (ns, BlockKey([k; 32])))
            .collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn reopen_keeps_blocks_and_meta_and_refuses_other_geometry() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("cat");
        let ns = NamespaceId([1; 16]);
        {
            let (c, m) = Catalog::open(&p, meta(1 << 20)).unwrap();
            assert_eq!(m.instance, 77);
            c.put_blocks(&[
                (ns, BlockKey([1; 32]), rec(0, 4096)),
                (ns, BlockKey([2; 32]), rec(1, 4096)),
            ])
            .unwrap();
        }
        let (c, m) = Catalog::open(
            &p,
            CatalogMeta {
                instance: 5,
                ..meta(1 << 20)
            },
        )
        .unwrap();
        assert_eq!(m.instance, 77, "existing metadata wins");
        let mut n = 0;
        c.scan_blocks(|_, _, r| {
            assert!(r.is_ok());
            n += 1;
        })
        .unwrap();
        assert_eq!(n, 2);
        assert_eq!(c.reclaim(0).unwrap(), vec![(ns, BlockKey([1; 32]))]);
        let mut left = Vec::new();
        c.scan_region_index(|r, o, _| left.push((r, o))).unwrap();
        assert_eq!(left, vec![(1, 4096)]);
        drop(c);
        let e = Catalog::open(&p, meta(2 << 20)).unwrap_err().to_string();
        assert!(
            e.contains("region_bytes") && e.contains(&p.display().to_string()),
            "{e}"
        );
    }

    #[test]
    fn another_format_version_is_refused_with_the_path() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("cat");
        {
            let (c, _) = Catalog::open(&p, meta(1 << 20)).unwrap();
            let mut m = meta(1 << 20).encode();
            m[0] = 99;
            c.db.put(META_KEY, m).unwrap();
        }
        let e = Catalog::open(&p, meta(1 << 20)).unwrap_err().to_string();
        assert!(
            e.contains("format 99") && e.contains(&p.display().to_string()),
            "{e}"
        );
    }

    #[test]
    fn a_file_where_the_directory_should_be_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("cat");
        std::fs::write(&p, b"not a directory").unwrap();
        let e = Catalog::open(&p, meta(1 << 20)).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
    }
}
