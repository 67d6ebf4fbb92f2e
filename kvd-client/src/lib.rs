//! Rust client for kvd: connect, open namespaces, and move blocks through the shared arena.
//!
//! Control operations (lookup, pin, stats, listing) go over the Unix socket; block data never
//! does. A PUT reserves a slot on the ring, copies the bytes straight into the shared arena and
//! commits — the slot becomes the block, with no second copy in the daemon. A GET returns a
//! [`ReadLease`] that borrows the block's bytes in place until dropped. Batch calls
//! ([`Client::put_many`], [`Client::get_many`]) put many descriptors on the ring before waiting.
//!
//! [`Client`] is blocking and `Sync` (one ring per client, serialised by a mutex); give each
//! busy thread its own client for parallelism. [`AsyncClient`] is the tokio face.

#![deny(clippy::undocumented_unsafe_blocks)]

mod asynch;
mod control;
mod error;
pub mod gpu;
pub mod json;

use std::collections::HashMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use asynch::AsyncClient;
pub use control::{Control, SERVER_UID_ENV};
pub use error::{ClientError, Result};
pub use gpu::GpuAttachment;
pub use kvd_proto::frame::{
    BlockInfo, ClientInfo, ClusterLookup, DiskReport, NamespaceStats, NodeHolding, StatsReport,
    TierCounts, TierStats,
};
pub use kvd_proto::{BlockKey, NamespaceDesc, NamespaceId, Tier};

use kvd_proto::arena::ArenaHeader;
use kvd_proto::frame::{Request, Response};
use kvd_proto::ring::{Completion, Op, Status, Submission, COMPLETION_CHECKSUM_VALID};
use kvd_proto::PROTOCOL_VERSION;
use kvd_shm::{ClientRing, Mapping};
use parking_lot::Mutex;

/// Default socket path (also `$KVD_SOCKET`).
pub const DEFAULT_SOCKET: &str = "/run/kvd/kvd.sock";

/// Connection options.
#[derive(Debug, Clone)]
pub struct Options {
    /// Name shown in `kvd-ctl status`.
    pub name: String,
    /// Ask for admin rights (ls, inspect, evict).
    pub admin: bool,
    /// How long to spin for a completion before sleeping.
    pub spin: Duration,
    /// How long to wait for a ring completion or a control reply at all.
    pub timeout: Duration,
    /// The uid kvd must run as (`None`: `$KVD_SERVER_UID`, else root, this process's uid or
    /// the owner of the socket's directory); a socket served by anyone else is refused.
    pub server_uid: Option<u32>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            name: format!("pid-{}", std::process::id()),
            admin: false,
            spin: Duration::from_micros(200),
            timeout: Duration::from_secs(30),
            server_uid: None,
        }
    }
}

/// What the daemon said in the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// Daemon version.
    pub daemon_version: String,
    /// Connection id.
    pub client_id: u64,
    /// Largest block accepted.
    pub max_block_bytes: u64,
    /// Read-lease timeout.
    pub lease_timeout_ms: u32,
}

/// An open namespace: handle for descriptors plus the mapped arena.
#[derive(Debug, Clone)]
pub struct Namespace {
    /// Namespace id (for control operations).
    pub id: NamespaceId,
    /// Ring handle.
    pub handle: u32,
    /// The daemon publishes KV events: send [`Client::lineage`] for blocks before storing
    /// them, so their events carry tokens.
    pub events: bool,
    arena: Arc<ArenaMap>,
}

#[derive(Debug)]
struct ArenaMap {
    map: Mapping,
    header: ArenaHeader,
}

impl Namespace {
    /// Size of the mapped arena.
    pub fn arena_bytes(&self) -> u64 {
        self.arena.header.total_bytes
    }
}

/// Result of a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lookup {
    /// Number of leading keys stored.
    pub prefix_len: u32,
    /// Tiers holding them.
    pub tiers: TierCounts,
}

/// Outcome of a put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// Stored now.
    Stored,
    /// Already stored (by us or another client); nothing was written.
    Exists,
}

/// High bit of `user_data` marks completions nobody waits for (lease releases).
const DETACHED: u64 = 1 << 63;

#[derive(Debug)]
struct RingState {
    ring: ClientRing,
    next: u64,
    in_flight: u32,
    arrived: HashMap<u64, Completion>,
    /// How long the next wait spins: `Options::spin` while completions come within it,
    /// halved after each that did not (blocks read from disk take milliseconds, and spinning
    /// through them takes the CPU the daemon's IO threads need), back to full on a fast one.
    spin_now: Duration,
}

impl RingState {
    fn reap_one(&mut self, spin: Duration, timeout: Duration) -> Result<()> {
        let t = std::time::Instant::now();
        let c = self.ring.wait(self.spin_now.min(spin), timeout)?;
        self.spin_now = if t.elapsed() <= spin {
            spin
        } else if self.spin_now < Duration::from_micros(8) {
            Duration::ZERO
        } else {
            self.spin_now / 2
        };
        self.in_flight = self.in_flight.saturating_sub(1);
        if c.user_data & DETACHED == 0 {
            self.arrived.insert(c.user_data, c);
        }
        Ok(())
    }

    fn submit(&mut self, mut sub: Submission, detached: bool, o: &Options) -> Result<u64> {
        self.next = (self.next + 1) & !DETACHED;
        sub.user_data = self.next | if detached { DETACHED } else { 0 };
        while self.in_flight >= self.ring.entries() || !self.ring.push(&sub)? {
            self.ring.notify();
            self.reap_one(o.spin, o.timeout)?;
        }
        self.in_flight += 1;
        Ok(sub.user_data)
    }

    fn wait_for(&mut self, id: u64, o: &Options) -> Result<Completion> {
        loop {
            if let Some(c) = self.arrived.remove(&id) {
                return Ok(c);
            }
            self.reap_one(o.spin, o.timeout)?;
        }
    }

    /// Submits all, rings once, waits for all (in order).
    fn batch(&mut self, subs: &[Submission], o: &Options) -> Result<Vec<Completion>> {
        let mut ids = Vec::with_capacity(subs.len());
        for s in subs {
            ids.push(self.submit(*s, false, o)?);
        }
        self.ring.notify();
        ids.into_iter().map(|id| self.wait_for(id, o)).collect()
    }
}

/// A blocking kvd client.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    opts: Options,
    info: ServerInfo,
    ctl: Mutex<Control>,
    ring: Mutex<RingState>,
}

fn unexpected(what: &str, r: &Response) -> ClientError {
    ClientError::Unexpected(format!("expected {what}, got {r:?}"))
}

impl Client {
    /// Connects with default options.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client> {
        Self::connect_with(path, Options::default())
    }

    /// Connects, handshakes and maps the ring.
    pub fn connect_with(path: impl AsRef<Path>, opts: Options) -> Result<Client> {
        let path = path.as_ref().to_owned();
        let mut ctl = Control::connect_to(&path, control::expected_server_uid(opts.server_uid)?)?;
        ctl.set_timeout(Some(opts.timeout))?;
        let (resp, fd) = ctl.call(&Request::Hello {
            protocol_version: PROTOCOL_VERSION,
            client_name: opts.name.clone(),
            admin: opts.admin,
        })?;
        let Response::Welcome {
            daemon_version,
            client_id,
            ring_bytes,
            max_block_bytes,
            lease_timeout_ms,
            ..
        } = resp
        else {
            return Err(unexpected("Welcome", &resp));
        };
        let fd = fd.ok_or_else(|| ClientError::Unexpected("Welcome carried no ring fd".into()))?;
        let ring_bytes = usize::try_from(ring_bytes)
            .map_err(|_| ClientError::Unexpected("ring larger than address space".into()))?;
        let ring = ClientRing::from_fd(&fd, ring_bytes)?;
        let spin = opts.spin;
        Ok(Client {
            path,
            info: ServerInfo {
                daemon_version,
                client_id,
                max_block_bytes,
                lease_timeout_ms,
            },
            opts,
            ctl: Mutex::new(ctl),
            ring: Mutex::new(RingState {
                ring,
                next: 0,
                in_flight: 0,
                arrived: HashMap::new(),
                spin_now: spin,
            }),
        })
    }

    /// Socket path this client is connected to.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Handshake information.
    pub fn info(&self) -> &ServerInfo {
        &self.info
    }

    fn call(&self, req: &Request) -> Result<(Response, Option<std::os::fd::OwnedFd>)> {
        self.ctl.lock().call(req)
    }

    /// Opens a namespace (creating it in the daemon if new) and maps its arena.
    pub fn open_namespace(&self, desc: &NamespaceDesc) -> Result<Namespace> {
        desc.validate()
            .map_err(|e| ClientError::Invalid(e.to_string()))?;
        let (resp, fd) = self.call(&Request::OpenNamespace(desc.clone()))?;
        let Response::NamespaceOpened {
            ns,
            handle,
            arena_bytes,
            events,
        } = resp
        else {
            return Err(unexpected("NamespaceOpened", &resp));
        };
        let fd =
            fd.ok_or_else(|| ClientError::Unexpected("NamespaceOpened carried no fd".into()))?;
        let len = usize::try_from(arena_bytes)
            .map_err(|_| ClientError::Unexpected("arena larger than address space".into()))?;
        let map = Mapping::map_fd(&fd, len, true, false)?;
        // SAFETY: the header page is inside the mapping (len ≥ 1 page, checked by read()).
        let header = ArenaHeader::read(unsafe { map.slice(0, 4096.min(len)) }, arena_bytes)?;
        if header.ns != ns {
            return Err(ClientError::Unexpected(format!(
                "arena belongs to namespace {}, expected {ns}",
                header.ns
            )));
        }
        Ok(Namespace {
            id: ns,
            handle,
            events,
            arena: Arc::new(ArenaMap { map, header }),
        })
    }

    /// Longest stored prefix of `keys` (a chain, first block first).
    pub fn lookup(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Result<Lookup> {
        match self.call(&Request::Lookup {
            ns: *ns,
            keys: keys.to_vec(),
        })? {
            (Response::LookupResult { prefix_len, tiers }, _) => Ok(Lookup { prefix_len, tiers }),
            (r, _) => Err(unexpected("LookupResult", &r)),
        }
    }

    /// Which nodes of the cluster hold the leading blocks of `keys`, and in which tier (the
    /// cluster index with the daemon's own view folded in; only the daemon's view, with
    /// `cluster: false`, when no index is configured or it is unreachable). Needs the
    /// namespace open on this client, or an admin client.
    pub fn cluster_lookup(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Result<ClusterLookup> {
        match self.call(&Request::ClusterLookup {
            ns: *ns,
            keys: keys.to_vec(),
        })? {
            (Response::ClusterResult(r), _) => Ok(r),
            (r, _) => Err(unexpected("ClusterResult", &r)),
        }
    }

    /// Tells the daemon the tokens and parents of a chain of blocks about to be stored, for
    /// their KV events: `keys[0]`'s parent is `parent`, every other key's the one before it;
    /// `tokens` holds the namespace's `block_tokens` ids per key. Returns how many blocks
    /// were recorded (0 when the daemon publishes no events: see [`Namespace::events`]).
    pub fn lineage(
        &self,
        ns: &NamespaceId,
        parent: Option<BlockKey>,
        keys: &[BlockKey],
        tokens: &[u32],
    ) -> Result<u32> {
        if keys.len() > kvd_proto::frame::MAX_KEYS || tokens.len() > kvd_proto::frame::MAX_TOKENS {
            return Err(ClientError::Invalid(format!(
                "a lineage holds at most {} keys and {} tokens; split the chain",
                kvd_proto::frame::MAX_KEYS,
                kvd_proto::frame::MAX_TOKENS
            )));
        }
        self.count(Request::Lineage {
            ns: *ns,
            parent,
            keys: keys.to_vec(),
            tokens: tokens.to_vec(),
        })
    }

    fn count(&self, req: Request) -> Result<u32> {
        match self.call(&req)? {
            (Response::Count(n), _) => Ok(n),
            (r, _) => Err(unexpected("Count", &r)),
        }
    }

    /// Pins blocks against eviction; returns how many were found.
    pub fn pin(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Result<u32> {
        self.count(Request::Pin {
            ns: *ns,
            keys: keys.to_vec(),
        })
    }

    /// Drops one pin per block; returns how many were pinned.
    pub fn unpin(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Result<u32> {
        self.count(Request::Unpin {
            ns: *ns,
            keys: keys.to_vec(),
        })
    }

    /// Deletes blocks; returns how many were found.
    pub fn delete(&self, ns: &NamespaceId, keys: &[BlockKey]) -> Result<u32> {
        self.count(Request::Delete {
            ns: *ns,
            keys: keys.to_vec(),
        })
    }

    /// Evicts unpinned blocks (all evictable ones when `keys` is empty). Admin only.
    pub fn evict(&self, ns: Option<NamespaceId>, keys: &[BlockKey]) -> Result<u32> {
        self.count(Request::Evict {
            ns,
            keys: keys.to_vec(),
        })
    }

    /// Starts copying every DRAM block without a disk copy to the disk tier (of one namespace,
    /// or all); returns how many blocks that is. Progress: `stats().disk.drain_pending`.
    /// Admin only; an error when the daemon has no disk tier.
    pub fn drain(&self, ns: Option<NamespaceId>) -> Result<u32> {
        self.count(Request::Drain { ns })
    }

    /// Starts reading blocks held only on disk back into DRAM (of one open namespace, or all),
    /// most recently used first, as many as fit without evicting; returns how many blocks that
    /// is. Progress: `stats().disk.warm_pending`. Admin only; an error when the daemon has no
    /// disk tier, the namespace is not open, or a warm is already running.
    pub fn warm(&self, ns: Option<NamespaceId>) -> Result<u32> {
        self.count(Request::Warm { ns })
    }

    /// Daemon statistics.
    pub fn stats(&self) -> Result<StatsReport> {
        match self.call(&Request::Stats)? {
            (Response::Stats(s), _) => Ok(*s),
            (r, _) => Err(unexpected("Stats", &r)),
        }
    }

    /// One page of the block listing. Admin only.
    pub fn list(
        &self,
        ns: Option<NamespaceId>,
        after: Option<(NamespaceId, BlockKey)>,
        limit: u32,
    ) -> Result<(Vec<BlockInfo>, bool)> {
        match self.call(&Request::List { ns, after, limit })? {
            (Response::Blocks { blocks, more }, _) => Ok((blocks, more)),
            (r, _) => Err(unexpected("Blocks", &r)),
        }
    }

    /// Every stored copy of `key`. Admin only.
    pub fn inspect(&self, key: &BlockKey) -> Result<Vec<BlockInfo>> {
        match self.call(&Request::Inspect { key: *key })? {
            (Response::Blocks { blocks, .. }, _) => Ok(blocks),
            (r, _) => Err(unexpected("Blocks", &r)),
        }
    }

    /// Waits until every earlier ring operation of this client has been applied by the daemon
    /// — including the releases and aborts sent when leases and slots are dropped, which do
    /// not wait. Call it before a control operation that must see those releases (an evict,
    /// a stats check).
    pub fn flush(&self) -> Result<()> {
        self.nop()
    }

    /// A ring round trip that does nothing (latency probe).
    pub fn nop(&self) -> Result<()> {
        let c = self
            .ring
            .lock()
            .batch(&[Submission::new(Op::Nop, 0, 0)], &self.opts)?;
        check("nop", &c[0])
    }

    /// Reserves a slot for `len` bytes of `key`; `None` when the block is already stored.
    pub fn reserve<'a>(
        &'a self,
        ns: &'a Namespace,
        key: &BlockKey,
        len: usize,
    ) -> Result<Option<PutSlot<'a>>> {
        let mut s = self.reserve_many(ns, &[(*key, len)])?;
        Ok(s.pop().flatten())
    }

    /// Reserves slots for many blocks in one ring batch (`None` for those already stored).
    pub fn reserve_many<'a>(
        &'a self,
        ns: &'a Namespace,
        items: &[(BlockKey, usize)],
    ) -> Result<Vec<Option<PutSlot<'a>>>> {
        let subs: Vec<Submission> = items
            .iter()
            .map(|(k, len)| {
                let mut s = Submission::new(Op::Reserve, ns.handle, 0);
                s.key = *k;
                s.arg0 = *len as u64;
                s
            })
            .collect();
        let cpls = self.ring.lock().batch(&subs, &self.opts)?;
        per_item("reserve", &cpls, Status::Exists, |i, c| {
            let len = items[i].1;
            let slot = PutSlot {
                client: self,
                ns,
                offset: c.offset,
                len,
                token: c.token,
                done: false,
            };
            // Never write past the slot: a slot smaller than asked for is refused.
            let bad = if c.len < len as u64 {
                Some(ClientError::Unexpected(format!(
                    "kvd granted a {}-byte slot for a {len}-byte block",
                    c.len
                )))
            } else {
                ns.arena
                    .header
                    .check_slot(c.offset, c.len)
                    .err()
                    .map(ClientError::Protocol)
            };
            (slot, bad)
        })
    }

    /// Commits many written slots in one ring batch.
    pub fn commit_many(&self, slots: Vec<PutSlot<'_>>) -> Result<Vec<PutOutcome>> {
        let mut subs = Vec::with_capacity(slots.len());
        for mut s in slots {
            let mut sub = Submission::new(Op::Commit, s.ns.handle, 0);
            sub.arg0 = s.token;
            sub.arg1 = s.len as u64;
            s.done = true;
            subs.push(sub);
        }
        let cpls = self.ring.lock().batch(&subs, &self.opts)?;
        cpls.iter()
            .map(|c| match Status::from_u16(c.status) {
                Some(Status::Ok) => Ok(PutOutcome::Stored),
                Some(Status::Exists) => Ok(PutOutcome::Exists),
                _ => Err(ClientError::from_status("commit", c.status)),
            })
            .collect()
    }

    /// Stores one block.
    pub fn put(&self, ns: &Namespace, key: &BlockKey, data: &[u8]) -> Result<PutOutcome> {
        match self.reserve(ns, key, data.len())? {
            None => Ok(PutOutcome::Exists),
            Some(mut slot) => {
                kvd_shm::copy_bytes(slot.as_mut_slice(), data);
                slot.commit()
            }
        }
    }

    /// Stores many blocks with two ring batches (reserve all, copy, commit all).
    pub fn put_many(&self, ns: &Namespace, items: &[(BlockKey, &[u8])]) -> Result<Vec<PutOutcome>> {
        let want: Vec<(BlockKey, usize)> = items.iter().map(|(k, d)| (*k, d.len())).collect();
        let slots = self.reserve_many(ns, &want)?;
        let mut out = vec![PutOutcome::Exists; items.len()];
        let mut to_commit = Vec::new();
        let mut idx = Vec::new();
        for (i, (slot, (_, data))) in slots.into_iter().zip(items).enumerate() {
            if let Some(mut s) = slot {
                kvd_shm::copy_bytes(s.as_mut_slice(), data);
                to_commit.push(s);
                idx.push(i);
            }
        }
        for (i, r) in idx.into_iter().zip(self.commit_many(to_commit)?) {
            out[i] = r;
        }
        Ok(out)
    }

    /// Reads one block in place; `None` when it is not stored.
    pub fn get<'a>(&'a self, ns: &'a Namespace, key: &BlockKey) -> Result<Option<ReadLease<'a>>> {
        Ok(self.get_many(ns, &[*key])?.pop().flatten())
    }

    /// Reads many blocks in one ring batch.
    pub fn get_many<'a>(
        &'a self,
        ns: &'a Namespace,
        keys: &[BlockKey],
    ) -> Result<Vec<Option<ReadLease<'a>>>> {
        let subs: Vec<Submission> = keys
            .iter()
            .map(|k| {
                let mut s = Submission::new(Op::Get, ns.handle, 0);
                s.key = *k;
                s
            })
            .collect();
        let cpls = self.ring.lock().batch(&subs, &self.opts)?;
        per_item("get", &cpls, Status::NotFound, |_, c| {
            let lease = ReadLease {
                client: self,
                ns,
                offset: c.offset,
                len: c.len,
                checksum: (c.flags & COMPLETION_CHECKSUM_VALID != 0).then_some(c.checksum),
                token: c.token,
            };
            let bad = ns
                .arena
                .header
                .check_slot(c.offset, c.len)
                .err()
                .map(ClientError::Protocol);
            (lease, bad)
        })
    }

    /// Copies one block into `buf`; returns its length, or `None` when not stored. Fails with
    /// `Invalid` when `buf` is too small.
    pub fn get_into(
        &self,
        ns: &Namespace,
        key: &BlockKey,
        buf: &mut [u8],
    ) -> Result<Option<usize>> {
        let Some(lease) = self.get(ns, key)? else {
            return Ok(None);
        };
        let n = lease.len();
        if n > buf.len() {
            return Err(ClientError::Invalid(format!(
                "buffer of {} bytes is too small for a block of {n}",
                buf.len()
            )));
        }
        kvd_shm::copy_bytes(&mut buf[..n], &lease);
        Ok(Some(n))
    }

    fn detached(&self, op: Op, ns: u32, token: u64) {
        let mut s = Submission::new(op, ns, 0);
        s.arg0 = token;
        let mut r = self.ring.lock();
        // Best effort: if the ring is gone, the daemon already released everything we held.
        if r.submit(s, true, &self.opts).is_ok() {
            r.ring.notify();
        }
    }
}

/// One result per completion of a batch: `Some` for `Ok`, `None` for the `absent` status, and
/// the first error otherwise. `build` makes the guard for an `Ok` completion plus any problem
/// with it; guards are built even then, so that on error dropping them gives back what the
/// daemon granted (slots aborted, leases released).
fn per_item<T>(
    op: &'static str,
    cpls: &[Completion],
    absent: Status,
    mut build: impl FnMut(usize, &Completion) -> (T, Option<ClientError>),
) -> Result<Vec<Option<T>>> {
    let mut out = Vec::with_capacity(cpls.len());
    let mut err = None;
    for (i, c) in cpls.iter().enumerate() {
        match Status::from_u16(c.status) {
            Some(Status::Ok) => {
                let (guard, bad) = build(i, c);
                if let Some(e) = bad {
                    err.get_or_insert(e);
                }
                out.push(Some(guard));
            }
            Some(s) if s == absent => out.push(None),
            _ => {
                err.get_or_insert(ClientError::from_status(op, c.status));
            }
        }
    }
    match err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

fn check(op: &'static str, c: &Completion) -> Result<()> {
    if c.status == Status::Ok as u16 {
        Ok(())
    } else {
        Err(ClientError::from_status(op, c.status))
    }
}

/// A reserved, writable arena slot. Commit it to publish the block; dropping it aborts.
#[derive(Debug)]
pub struct PutSlot<'a> {
    client: &'a Client,
    ns: &'a Namespace,
    offset: u64,
    len: usize,
    token: u64,
    done: bool,
}

impl PutSlot<'_> {
    /// The slot's bytes (exactly the reserved length).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the daemon reserved [offset, offset+len) for this client alone (the range was
        // checked against the arena header when the slot was created) and nobody reads it until
        // commit; `&mut self` makes this the only view.
        unsafe { self.ns.arena.map.slice_mut(self.offset as usize, self.len) }
    }

    /// Raw pointer to the slot, for DMA engines writing it directly.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_slice().as_mut_ptr()
    }

    /// Publishes the slot as the block.
    pub fn commit(self) -> Result<PutOutcome> {
        let client = self.client;
        let mut r = client.commit_many(vec![self])?;
        r.pop()
            .ok_or_else(|| ClientError::Unexpected("commit returned nothing".into()))
    }
}

impl Drop for PutSlot<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.client.detached(Op::Abort, self.ns.handle, self.token);
        }
    }
}

/// A read lease on a stored block: derefs to its bytes, in place. Released on drop.
#[derive(Debug)]
pub struct ReadLease<'a> {
    client: &'a Client,
    ns: &'a Namespace,
    offset: u64,
    len: u64,
    checksum: Option<u64>,
    token: u64,
}

impl ReadLease<'_> {
    /// xxh3-64 of the block as sealed by the daemon; `None` when the daemon has not yet
    /// checksummed it (it does so off the request path, shortly after commit).
    pub fn checksum(&self) -> Option<u64> {
        self.checksum
    }

    /// Recomputes the checksum of the bytes in place and compares: `Some(true)` when they
    /// match, `Some(false)` on corruption, `None` when no checksum was sealed yet.
    pub fn verify(&self) -> Option<bool> {
        self.checksum.map(|c| kvd_checksum(self) == c)
    }

    /// Test hook: flips one byte of the stored block in place (the namespace's arena is writable
    /// by its clients, as the trust model says), so tests can prove that readers detect or
    /// use corrupted bytes. Returns false when `offset` is outside the block. Not for production.
    #[doc(hidden)]
    pub fn testing_flip_byte(&self, offset: usize) -> bool {
        if offset as u64 >= self.len {
            return false;
        }
        let base = self.deref().as_ptr();
        // SAFETY: `offset` is inside the leased block (checked above), which lies inside the
        // shared read-write arena mapping; a volatile write of one byte races at worst with
        // readers of this block, which is the corruption the test wants them to see.
        unsafe {
            let p = base.add(offset).cast_mut();
            std::ptr::write_volatile(p, !std::ptr::read_volatile(p));
        }
        true
    }
}

/// The block checksum kvd uses (xxh3-64), exposed so callers can verify data they hold.
pub fn kvd_checksum(b: &[u8]) -> u64 {
    twox_hash::XxHash3_64::oneshot(b)
}

impl std::ops::Deref for ReadLease<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the daemon holds the block for us under this lease (it is committed, so no
        // client writes it, and it is not evicted or reused until we release); the range was
        // checked against the arena header.
        unsafe {
            self.ns
                .arena
                .map
                .slice(self.offset as usize, self.len as usize)
        }
    }
}

impl Drop for ReadLease<'_> {
    fn drop(&mut self) {
        self.client
            .detached(Op::Release, self.ns.handle, self.token);
    }
}

#[cfg(test)]
mod tests {
    use std::hash::Hasher;

    use super::kvd_checksum;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 + i / 4096) as u8).collect()
    }

    /// The checksum is XXH3-64 with seed 0, the value already recorded in disk catalogs and
    /// checked by clients: the empty input's value is the reference one from the XXH3
    /// specification; the others were computed by a second implementation (xxhash-rust)
    /// and cover the short, mid-size (240 B) and long paths, the last with a partial stripe.
    #[test]
    fn checksum_is_xxh3_64() {
        let d = pattern((1 << 20) + 17);
        assert_eq!(kvd_checksum(b""), 0x2d06_8005_38d3_94c2);
        assert_eq!(kvd_checksum(b"kvd"), 0x3e23_561f_1ff9_2d09);
        assert_eq!(kvd_checksum(&d[..240]), 0xe315_d53d_5129_eede);
        assert_eq!(kvd_checksum(&d), 0xca5c_5dde_3f60_aadd);
    }

    /// The daemon hashes blocks in steps (sealing) or in one piece (disk reads); both must
    /// give the one-shot value.
    #[test]
    fn streamed_checksum_equals_one_shot() {
        let d = pattern((1 << 20) + 17);
        // Byte-at-a-time over a prefix (crossing the internal buffer many times), then the
        // step sizes the daemon and clients use over the whole block.
        for (step, len) in [
            (1, 5000),
            (63, d.len()),
            (4096, d.len()),
            (16 << 10, d.len()),
        ] {
            let mut h = twox_hash::XxHash3_64::new();
            for c in d[..len].chunks(step) {
                h.write(c);
            }
            assert_eq!(h.finish(), kvd_checksum(&d[..len]), "step {step}");
        }
    }
}
