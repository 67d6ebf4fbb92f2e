//! Block IO engines: io_uring on a dedicated thread, or positional syscalls as the fallback.
//!
//! Both take [`IoOp`]s through the same [`IoEngine`] trait over a bounded queue, move bytes
//! between a file and an [`IoBuf`] without a bounce copy (arena slots are 4 KiB aligned, so
//! O_DIRECT reads and writes go straight to and from shared memory), and hand the buffer back
//! with the result through the op's callback. The io_uring engine owns one ring on a named
//! thread (`kvd-io-uring`) and never has more than `depth` operations in flight; the psync
//! engine runs `depth.min(8)` threads doing `pread`/`pwrite`. The callbacks run on the IO
//! threads: they must only hand the result on (a channel send and a wake-up), never block.
//!
//! Long-lived memory (the DRAM arenas) can be registered with the io_uring engine as fixed
//! buffers ([`IoEngine::register`]): the kernel pins its pages once instead of on every IO,
//! which was about half of the IO thread's time with arenas in shared memory. A buffer names
//! its registration ([`IoBuf::with_fixed`]) and keeps it alive until the IO completed, so a
//! registration slot is never reused under an IO. Where registration is refused (an old
//! kernel, `RLIMIT_MEMLOCK` without `CAP_IPC_LOCK`) IOs go through the plain path.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;

use super::format::ALIGN;

/// Memory an IO reads into or writes from.
pub struct IoBuf {
    /// Keeps the memory behind `ptr` alive (shared memory owned elsewhere); only dropped.
    _keep: Option<Arc<dyn Send + Sync>>,
    owned: Option<Box<[Page]>>,
    /// The registration covering the buffer and its slot, when it has one.
    fixed: Option<(Arc<Registered>, u16)>,
    ptr: *mut u8,
    len: usize,
}

/// One aligned page of an owned buffer.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Page([u8; ALIGN as usize]);

// SAFETY: the pointer is into memory owned by `owned` or kept alive by `keep` (both Send +
// Sync), and the buffer is used by one thread at a time (the submitter, then the IO thread,
// then the callback), passed along by move.
unsafe impl Send for IoBuf {}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("owned", &self.owned.is_some())
            .field("fixed", &self.fixed.as_ref().map(|f| f.1))
            .finish()
    }
}

impl IoBuf {
    /// A zeroed, 4 KiB-aligned buffer of `len` bytes rounded up to whole pages.
    pub fn aligned(len: usize) -> IoBuf {
        let pages = len.div_ceil(ALIGN as usize).max(1);
        let mut owned = vec![Page([0; ALIGN as usize]); pages].into_boxed_slice();
        let ptr = owned.as_mut_ptr().cast::<u8>();
        IoBuf {
            _keep: None,
            owned: Some(owned),
            fixed: None,
            ptr,
            len: pages * ALIGN as usize,
        }
    }

    /// A buffer over memory owned elsewhere.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay valid for reads and writes while `keep` lives, and nobody else
    /// may write it while the IO is in flight (for a write) or read or write it (for a read).
    pub unsafe fn from_raw(keep: Arc<dyn Send + Sync>, ptr: *mut u8, len: usize) -> IoBuf {
        IoBuf {
            _keep: Some(keep),
            owned: None,
            fixed: None,
            ptr,
            len,
        }
    }

    /// Marks the buffer as lying in registered memory, when `reg` covers all of it (otherwise
    /// the buffer is unchanged and its IOs take the plain path).
    pub fn with_fixed(mut self, reg: Option<&Arc<Registered>>) -> IoBuf {
        if let Some(reg) = reg {
            if let Some(slot) = reg.slot_of(self.ptr, self.len) {
                self.fixed = Some((reg.clone(), slot));
            }
        }
        self
    }

    /// Whether IOs on this buffer use a registered (fixed) buffer.
    pub fn is_fixed(&self) -> bool {
        self.fixed.is_some()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes (owned buffers only: shared memory is read through its own accessors).
    pub fn as_slice(&self) -> &[u8] {
        match &self.owned {
            // SAFETY: `ptr` points at `owned`, which holds at least `len` bytes.
            Some(_) => unsafe { std::slice::from_raw_parts(self.ptr, self.len) },
            None => &[],
        }
    }

    /// The bytes, writable (owned buffers only).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match &mut self.owned {
            // SAFETY: `ptr` points at `owned`, which holds at least `len` bytes, borrowed
            // mutably through `self`.
            Some(_) => unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) },
            None => &mut [],
        }
    }

    fn raw(&self) -> (*mut u8, usize) {
        (self.ptr, self.len)
    }
}

/// Direction of an IO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// File → buffer.
    Read,
    /// Buffer → file.
    Write,
}

/// Called with the buffer and the outcome once an IO finished.
pub type IoCallback = Box<dyn FnOnce(IoBuf, io::Result<()>) + Send>;

/// One read or write of a whole buffer at a file offset.
pub struct IoOp {
    /// Direction.
    pub kind: IoKind,
    /// File (kept open until the IO finished).
    pub file: Arc<File>,
    /// File offset (aligned for direct IO).
    pub offset: u64,
    /// Memory; its whole length is transferred.
    pub buf: IoBuf,
    /// Receives the result.
    pub done: IoCallback,
}

impl std::fmt::Debug for IoOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoOp")
            .field("kind", &self.kind)
            .field("offset", &self.offset)
            .field("buf", &self.buf)
            .finish()
    }
}

impl IoOp {
    fn finish(self, r: io::Result<()>) {
        (self.done)(self.buf, r);
    }
}

/// The engine has stopped (shutdown or a fatal ring error); the operations' callbacks were
/// called with an error.
#[derive(Debug, thiserror::Error)]
#[error("the IO engine has stopped")]
pub struct Stopped;

/// Largest piece of memory one registration slot covers (the kernel's limit per buffer).
const FIXED_CHUNK: usize = 1 << 30;

/// Registration slots of one io_uring engine (at most this many GiB registered at once).
const FIXED_SLOTS: u32 = 1024;

/// user_data of the wake-up poll (IO slots are small indices).
const WAKE: u64 = u64::MAX;

/// Distinguishes engines, so a registration is only ever used on the ring that holds it.
static NEXT_ENGINE: AtomicU64 = AtomicU64::new(1);

/// What a registration shares with its engine: the way in, and slots waiting to be freed.
struct Link {
    id: u64,
    tx: Mutex<Option<SyncSender<Msg>>>,
    /// Slots of dropped registrations, emptied by the IO thread before it takes new ones.
    released: Mutex<Vec<u16>>,
    /// Written after every message, so an IO thread waiting for completions (the ring polls
    /// this eventfd) takes new operations at once instead of at the next completion.
    wake: Option<OwnedFd>,
}

impl Link {
    /// Sends `msg` (waiting while the queue is full) and wakes the IO thread.
    fn send(&self, msg: Msg) -> Result<(), Msg> {
        send(&self.tx, msg)?;
        self.notify();
        Ok(())
    }

    fn notify(&self) {
        if let Some(fd) = &self.wake {
            let one = 1u64;
            // SAFETY: writes 8 bytes from a local to an eventfd we own; it is non-blocking,
            // and a failure (a counter at its maximum) still leaves the thread woken.
            unsafe { libc::write(fd.as_raw_fd(), (&raw const one).cast(), 8) };
        }
    }
}

/// A non-blocking eventfd, or `None` where the kernel has none (the thread then takes new
/// operations at its next completion).
fn eventfd() -> Option<OwnedFd> {
    // SAFETY: eventfd takes no pointers; a non-negative result is a new fd we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    // SAFETY: `fd` was just returned to us by eventfd and is owned by nothing else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Memory registered with an engine, in slots of at most 1 GiB; unregistered when dropped.
pub struct Registered {
    link: Arc<Link>,
    base: usize,
    len: usize,
    slots: Vec<u16>,
}

impl std::fmt::Debug for Registered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registered")
            .field("len", &self.len)
            .field("slots", &self.slots)
            .finish()
    }
}

impl Registered {
    /// The slot holding all of `ptr..ptr+len`, if one does.
    fn slot_of(&self, ptr: *const u8, len: usize) -> Option<u16> {
        let start = (ptr as usize).checked_sub(self.base)?;
        let end = start.checked_add(len)?;
        if len == 0 || end > self.len || start / FIXED_CHUNK != (end - 1) / FIXED_CHUNK {
            return None;
        }
        self.slots.get(start / FIXED_CHUNK).copied()
    }

    /// Bytes registered.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether empty (never: registrations cover at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        // Every IO naming these slots holds this registration, so none is in flight. This may
        // run on the IO thread itself (a callback dropping the last buffer), so it must not
        // wait on the queue: the slots go on a list the thread empties before it hands slots
        // out again, and a wake-up is sent only where there is room (a full queue means the
        // thread is awake anyway).
        self.link.released.lock().append(&mut self.slots);
        if let Some(tx) = self.link.tx.lock().as_ref() {
            let _ = tx.try_send(Msg::Wake);
        }
        self.link.notify();
    }
}

/// Why memory could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// This engine has no registered buffers (psync, or a kernel without sparse buffer tables).
    #[error("the {0} engine does not register buffers")]
    Unsupported(&'static str),
    /// All registration slots are taken.
    #[error("all {FIXED_SLOTS} buffer registration slots are in use")]
    Full,
    /// The kernel refused (typically `RLIMIT_MEMLOCK` without `CAP_IPC_LOCK`).
    #[error("the kernel refused to register {bytes} bytes: {source}")]
    Refused {
        /// Bytes asked for.
        bytes: usize,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// The engine has stopped.
    #[error("the IO engine has stopped")]
    Stopped,
}

/// A block IO engine.
pub trait IoEngine: Send + Sync {
    /// Engine name for logs and status (`io_uring` or `psync`).
    fn name(&self) -> &'static str;
    /// Registers `ptr..ptr+len` so IOs into it skip per-IO page pinning; the pages stay pinned
    /// until the returned registration is dropped.
    ///
    /// # Safety
    /// The range must be mapped, readable and writable memory that stays mapped while the
    /// registration lives (IOs through it reach the pages pinned here, not whatever is mapped
    /// at the address later).
    unsafe fn register(&self, ptr: *mut u8, len: usize) -> Result<Arc<Registered>, RegisterError> {
        let _ = (ptr, len);
        Err(RegisterError::Unsupported(self.name()))
    }
    /// Queues operations, in order, waiting while the queue is full. Handing over a batch at
    /// once lets the engine put all of it in flight together.
    fn submit_many(&self, ops: Vec<IoOp>) -> Result<(), Stopped>;
    /// Queues one operation.
    fn submit(&self, op: IoOp) -> Result<(), Stopped> {
        self.submit_many(vec![op])
    }
}

fn short(kind: IoKind, got: usize, want: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("short {kind:?}: {got} of {want} bytes"),
    )
}

fn stopped() -> io::Error {
    io::Error::other("the IO engine has stopped")
}

/// Sends `msg` on a bounded queue, waiting while it is full; gives it back when the queue is
/// closed.
fn send<T>(tx: &Mutex<Option<SyncSender<T>>>, msg: T) -> Result<(), T> {
    let Some(tx) = tx.lock().clone() else {
        return Err(msg);
    };
    match tx.try_send(msg) {
        Ok(()) => Ok(()),
        Err(TrySendError::Full(m)) => tx.send(m).map_err(|e| e.0),
        Err(TrySendError::Disconnected(m)) => Err(m),
    }
}

/// Positional-syscall engine (`pread`/`pwrite` on a few threads).
pub struct PsyncEngine {
    tx: Mutex<Option<SyncSender<IoOp>>>,
    threads: Vec<JoinHandle<()>>,
}

impl PsyncEngine {
    /// Starts `depth.min(8)` IO threads sharing a queue of `depth × 4` operations.
    pub fn start(depth: u32) -> io::Result<PsyncEngine> {
        let (tx, rx) = sync_channel::<IoOp>(depth as usize * 4);
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::new();
        for i in 0..depth.clamp(1, 8) {
            let rx = rx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("kvd-io-psync-{i}"))
                    .spawn(move || loop {
                        let op = rx.lock().recv();
                        let Ok(op) = op else { return };
                        let r = psync(&op);
                        op.finish(r);
                    })?,
            );
        }
        Ok(PsyncEngine {
            tx: Mutex::new(Some(tx)),
            threads,
        })
    }
}

fn psync(op: &IoOp) -> io::Result<()> {
    let (ptr, len) = op.buf.raw();
    match op.kind {
        IoKind::Read => {
            // SAFETY: IoBuf guarantees `ptr..ptr+len` is valid and exclusively ours for the
            // duration of the IO.
            let b = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
            op.file.read_exact_at(b, op.offset)
        }
        IoKind::Write => {
            // SAFETY: as above; a write only reads the buffer.
            let b = unsafe { std::slice::from_raw_parts(ptr, len) };
            op.file.write_all_at(b, op.offset)
        }
    }
}

impl IoEngine for PsyncEngine {
    fn name(&self) -> &'static str {
        "psync"
    }
    fn submit_many(&self, ops: Vec<IoOp>) -> Result<(), Stopped> {
        let mut ops = ops.into_iter();
        while let Some(op) = ops.next() {
            if let Err(op) = send(&self.tx, op) {
                op.finish(Err(stopped()));
                ops.for_each(|o| o.finish(Err(stopped())));
                return Err(Stopped);
            }
        }
        Ok(())
    }
}

impl Drop for PsyncEngine {
    fn drop(&mut self) {
        self.tx.lock().take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What the io_uring thread is asked to do, in order.
enum Msg {
    /// Put these operations in flight.
    Ops(Vec<IoOp>),
    /// Register memory (`base`, `len`) and answer with the slots it took.
    Register(usize, usize, SyncSender<Result<Vec<u16>, RegisterError>>),
    /// Look at the released slots.
    Wake,
}

/// io_uring engine: one ring on one thread, at most `depth` operations in flight.
pub struct UringEngine {
    link: Arc<Link>,
    thread: Option<JoinHandle<()>>,
}

impl UringEngine {
    /// Creates the ring (fails where io_uring is unavailable, e.g. seccomp or old kernels)
    /// and starts its thread.
    pub fn start(depth: u32) -> io::Result<UringEngine> {
        let depth = depth.clamp(1, 4096);
        // One entry more than the IOs in flight: the poll on the wake-up eventfd.
        let ring = io_uring::IoUring::new((depth + 1).next_power_of_two())?;
        // A sparse table (Linux 5.19+) lets arenas come and go; without one, IOs stay plain.
        let fixed = match ring.submitter().register_buffers_sparse(FIXED_SLOTS) {
            Ok(()) => Some((0..FIXED_SLOTS as u16).rev().collect()),
            Err(e) => {
                tracing::info!(error = %e, "io_uring without registered buffers");
                None
            }
        };
        let (tx, rx) = sync_channel::<Msg>(depth as usize * 4);
        let link = Arc::new(Link {
            id: NEXT_ENGINE.fetch_add(1, Ordering::Relaxed),
            tx: Mutex::new(Some(tx)),
            released: Mutex::new(Vec::new()),
            wake: eventfd(),
        });
        let l = link.clone();
        let thread = std::thread::Builder::new()
            .name("kvd-io-uring".into())
            .spawn(move || uring_loop(ring, rx, depth as usize, &l, fixed))?;
        Ok(UringEngine {
            link,
            thread: Some(thread),
        })
    }
}

/// Registers `base..base+len` in slots of at most [`FIXED_CHUNK`] taken from `free`; on
/// failure, frees what it took.
fn register_chunks(
    ring: &io_uring::IoUring,
    free: &mut Vec<u16>,
    base: usize,
    len: usize,
) -> Result<Vec<u16>, RegisterError> {
    let mut took = Vec::new();
    let mut at = 0;
    while at < len {
        let n = (len - at).min(FIXED_CHUNK);
        let Some(slot) = free.pop() else {
            unregister_chunks(ring, free, took);
            return Err(RegisterError::Full);
        };
        let iov = libc::iovec {
            iov_base: (base + at) as *mut libc::c_void,
            iov_len: n,
        };
        // SAFETY: the caller of `IoEngine::register` promised the range is mapped memory that
        // stays mapped while registered; the kernel pins its pages and keeps no pointer.
        let r = unsafe {
            ring.submitter()
                .register_buffers_update(slot.into(), &[iov], None)
        };
        if let Err(source) = r {
            free.push(slot);
            unregister_chunks(ring, free, took);
            return Err(RegisterError::Refused { bytes: len, source });
        }
        took.push(slot);
        at += n;
    }
    Ok(took)
}

/// Empties registration slots (the kernel unpins their pages) and makes them free again.
fn unregister_chunks(ring: &io_uring::IoUring, free: &mut Vec<u16>, slots: Vec<u16>) {
    let empty = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    };
    for slot in slots {
        // SAFETY: an empty entry (null, 0) clears the slot; no memory is handed over.
        match unsafe {
            ring.submitter()
                .register_buffers_update(slot.into(), &[empty], None)
        } {
            Ok(()) => free.push(slot),
            // Leave the slot out rather than hand it out still holding old pages.
            Err(e) => tracing::warn!(slot, error = %e, "cannot clear a registered buffer"),
        }
    }
}

fn uring_loop(
    mut ring: io_uring::IoUring,
    rx: Receiver<Msg>,
    depth: usize,
    link: &Link,
    mut fixed: Option<Vec<u16>>,
) {
    use io_uring::{opcode, types};
    let mut slots: Vec<Option<IoOp>> = (0..depth).map(|_| None).collect();
    let mut free: Vec<usize> = (0..depth).rev().collect();
    let mut backlog: std::collections::VecDeque<IoOp> = std::collections::VecDeque::new();
    let mut inflight = 0usize;
    let mut open = true;
    // Whether a poll on the wake-up eventfd is in the ring.
    let mut armed = false;
    loop {
        // Take new operations while there is room; block only when nothing is in flight.
        while !free.is_empty() {
            if backlog.is_empty() && open {
                let got = if inflight == 0 {
                    rx.recv().ok()
                } else {
                    match rx.try_recv() {
                        Ok(v) => Some(v),
                        Err(std::sync::mpsc::TryRecvError::Empty) => break,
                        Err(std::sync::mpsc::TryRecvError::Disconnected) => None,
                    }
                };
                if let Some(f) = fixed.as_mut() {
                    let released = std::mem::take(&mut *link.released.lock());
                    if !released.is_empty() {
                        unregister_chunks(&ring, f, released);
                    }
                }
                match got {
                    Some(Msg::Ops(v)) => backlog.extend(v),
                    Some(Msg::Register(base, len, reply)) => {
                        let r = match fixed.as_mut() {
                            Some(f) => register_chunks(&ring, f, base, len),
                            None => Err(RegisterError::Unsupported("io_uring")),
                        };
                        let _ = reply.send(r);
                    }
                    Some(Msg::Wake) => {}
                    None => open = false,
                }
            }
            let Some(op) = backlog.pop_front() else { break };
            let (ptr, len) = op.buf.raw();
            let Ok(len32) = u32::try_from(len) else {
                op.finish(Err(io::Error::other("IO larger than 4 GiB")));
                continue;
            };
            let fd = types::Fd(op.file.as_raw_fd());
            let Some(slot) = free.pop() else {
                backlog.push_front(op);
                break;
            };
            let reg = op
                .buf
                .fixed
                .as_ref()
                .filter(|(r, _)| r.link.id == link.id)
                .map(|f| f.1);
            let entry = match (op.kind, reg) {
                (IoKind::Read, None) => opcode::Read::new(fd, ptr, len32).offset(op.offset).build(),
                (IoKind::Write, None) => {
                    opcode::Write::new(fd, ptr, len32).offset(op.offset).build()
                }
                (IoKind::Read, Some(b)) => opcode::ReadFixed::new(fd, ptr, len32, b)
                    .offset(op.offset)
                    .build(),
                (IoKind::Write, Some(b)) => opcode::WriteFixed::new(fd, ptr, len32, b)
                    .offset(op.offset)
                    .build(),
            }
            .user_data(slot as u64);
            slots[slot] = Some(op);
            // SAFETY: the buffer and the file stay alive in `slots[slot]` until the completion
            // for this user_data is reaped below; the queue has room (at most `depth` in
            // flight and the ring has ≥ depth entries, and we submit after every push).
            let pushed = unsafe { ring.submission().push(&entry) };
            if pushed.is_err() {
                if let Some(op) = slots[slot].take() {
                    op.finish(Err(io::Error::other("io_uring submission queue full")));
                }
                free.push(slot);
                continue;
            }
            inflight += 1;
        }
        if inflight == 0 {
            if !open && backlog.is_empty() {
                return;
            }
            continue;
        }
        if !armed {
            if let Some(fd) = &link.wake {
                let poll = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), libc::POLLIN as u32)
                    .build()
                    .user_data(WAKE);
                // SAFETY: a poll holds no memory; the eventfd lives in `link`, which outlives
                // this loop and the ring. A full queue just leaves it unarmed this time.
                armed = unsafe { ring.submission().push(&poll) }.is_ok();
            }
        }
        if let Err(e) = ring.submit_and_wait(1) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %e, "io_uring submit failed; failing the IOs in flight");
            for s in slots.iter_mut() {
                if let Some(op) = s.take() {
                    op.finish(Err(io::Error::new(e.kind(), e.to_string())));
                }
            }
            backlog.drain(..).for_each(|op| op.finish(Err(stopped())));
            while let Ok(m) = rx.try_recv() {
                match m {
                    Msg::Ops(v) => v.into_iter().for_each(|op| op.finish(Err(stopped()))),
                    Msg::Register(_, _, reply) => {
                        let _ = reply.send(Err(RegisterError::Stopped));
                    }
                    Msg::Wake => {}
                }
            }
            return;
        }
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (ud, res) in done {
            if ud == WAKE {
                armed = false;
                if let Some(fd) = &link.wake {
                    let mut n = 0u64;
                    // SAFETY: reads 8 bytes into a local from our non-blocking eventfd (resets
                    // its counter; EAGAIN when it is already zero is fine).
                    unsafe { libc::read(fd.as_raw_fd(), (&raw mut n).cast(), 8) };
                }
                continue;
            }
            let slot = ud as usize;
            let Some(op) = slots.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            free.push(slot);
            inflight -= 1;
            let want = op.buf.len();
            let r = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else if res as usize != want {
                Err(short(op.kind, res as usize, want))
            } else {
                Ok(())
            };
            op.finish(r);
        }
    }
}

impl IoEngine for UringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
    }
    fn submit_many(&self, ops: Vec<IoOp>) -> Result<(), Stopped> {
        if ops.is_empty() {
            return Ok(());
        }
        self.link.send(Msg::Ops(ops)).map_err(|m| {
            if let Msg::Ops(ops) = m {
                ops.into_iter().for_each(|o| o.finish(Err(stopped())));
            }
            Stopped
        })
    }

    unsafe fn register(&self, ptr: *mut u8, len: usize) -> Result<Arc<Registered>, RegisterError> {
        if len == 0 {
            return Err(RegisterError::Refused {
                bytes: 0,
                source: io::Error::from(io::ErrorKind::InvalidInput),
            });
        }
        let (reply, answer) = sync_channel(1);
        self.link
            .send(Msg::Register(ptr as usize, len, reply))
            .map_err(|_| RegisterError::Stopped)?;
        let slots = answer.recv().map_err(|_| RegisterError::Stopped)??;
        Ok(Arc::new(Registered {
            link: self.link.clone(),
            base: ptr as usize,
            len,
            slots,
        }))
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.link.tx.lock().take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs one operation and waits for it (start-up and header writes).
pub fn run_sync(
    engine: &dyn IoEngine,
    kind: IoKind,
    file: Arc<File>,
    offset: u64,
    buf: IoBuf,
) -> io::Result<IoBuf> {
    let (tx, rx) = sync_channel(1);
    let op = IoOp {
        kind,
        file,
        offset,
        buf,
        done: Box::new(move |b, r| {
            let _ = tx.send((b, r));
        }),
    };
    // On failure the callback already delivered the error.
    let _ = engine.submit(op);
    let (b, r) = rx
        .recv()
        .map_err(|_| io::Error::other("the IO engine dropped an operation"))?;
    r.map(|()| b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engines() -> Vec<Box<dyn IoEngine>> {
        let mut v: Vec<Box<dyn IoEngine>> = vec![Box::new(PsyncEngine::start(4).unwrap())];
        match UringEngine::start(8) {
            Ok(u) => v.push(Box::new(u)),
            Err(e) => eprintln!("io_uring unavailable here ({e}); testing psync only"),
        }
        v
    }

    fn scratch(dir: &std::path::Path) -> Arc<File> {
        Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.join("f"))
                .unwrap(),
        )
    }

    #[test]
    fn write_then_read_back_through_each_engine() {
        for e in engines() {
            let dir = tempfile::tempdir().unwrap();
            let f = scratch(dir.path());
            let mut w = IoBuf::aligned(8192);
            for (i, b) in w.as_mut_slice().iter_mut().enumerate() {
                *b = (i % 251) as u8;
            }
            let w = run_sync(e.as_ref(), IoKind::Write, f.clone(), 4096, w).unwrap();
            let r = run_sync(
                e.as_ref(),
                IoKind::Read,
                f.clone(),
                4096,
                IoBuf::aligned(8192),
            )
            .unwrap();
            assert_eq!(r.as_slice(), w.as_slice(), "{}", e.name());
            // Reading past the end is a short read: an error, never silent zeroes.
            let err =
                run_sync(e.as_ref(), IoKind::Read, f, 8192, IoBuf::aligned(8192)).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{}", e.name());
        }
    }

    #[test]
    fn many_ops_in_flight_all_complete() {
        for e in engines() {
            let dir = tempfile::tempdir().unwrap();
            let f = scratch(dir.path());
            let (tx, rx) = std::sync::mpsc::channel();
            for i in 0..100u64 {
                let mut b = IoBuf::aligned(4096);
                b.as_mut_slice().fill(i as u8);
                let tx = tx.clone();
                e.submit(IoOp {
                    kind: IoKind::Write,
                    file: f.clone(),
                    offset: i * 4096,
                    buf: b,
                    done: Box::new(move |_, r| tx.send(r.is_ok()).unwrap()),
                })
                .unwrap();
            }
            assert!((0..100).all(|_| rx.recv().unwrap()), "{}", e.name());
            let mut all = vec![0u8; 100 * 4096];
            f.read_exact_at(&mut all, 0).unwrap();
            assert!(all
                .chunks(4096)
                .enumerate()
                .all(|(i, c)| c.iter().all(|&b| b == i as u8)));
        }
    }

    fn uring() -> Option<UringEngine> {
        match UringEngine::start(8) {
            Ok(u) => Some(u),
            Err(e) => {
                eprintln!("io_uring unavailable here ({e}); skipping");
                None
            }
        }
    }

    /// Registers an owned buffer's memory (tests only: the buffer outlives the registration).
    fn register(e: &dyn IoEngine, b: &IoBuf) -> Option<Arc<Registered>> {
        let (ptr, len) = b.raw();
        // SAFETY: `b` is owned memory that the tests keep alive past the registration.
        match unsafe { e.register(ptr, len) } {
            Ok(r) => Some(r),
            Err(err) => {
                eprintln!("registration refused here ({err}); skipping");
                None
            }
        }
    }

    #[test]
    fn registered_buffers_round_trip() {
        let Some(e) = uring() else { return };
        let dir = tempfile::tempdir().unwrap();
        let f = scratch(dir.path());
        let mut w = IoBuf::aligned(3 * 4096);
        let Some(reg) = register(&e, &w) else { return };
        for (i, b) in w.as_mut_slice().iter_mut().enumerate() {
            *b = (i % 253) as u8;
        }
        let w = w.with_fixed(Some(&reg));
        assert!(w.is_fixed());
        let w = run_sync(&e, IoKind::Write, f.clone(), 0, w).unwrap();
        let mut r = IoBuf::aligned(3 * 4096);
        let Some(rreg) = register(&e, &r) else { return };
        r.as_mut_slice().fill(0xee);
        let r = run_sync(&e, IoKind::Read, f.clone(), 0, r.with_fixed(Some(&rreg))).unwrap();
        assert_eq!(r.as_slice(), w.as_slice());
        let mut plain = vec![0u8; 3 * 4096];
        f.read_exact_at(&mut plain, 0).unwrap();
        assert_eq!(plain, w.as_slice());
    }

    #[test]
    fn registrations_cover_only_their_range_and_engine() {
        let Some(e) = uring() else { return };
        let Some(other) = uring() else { return };
        let big = IoBuf::aligned(4 * 4096);
        let Some(reg) = register(&e, &big) else {
            return;
        };
        let (ptr, _) = big.raw();
        assert_eq!(reg.slot_of(ptr, 4 * 4096), reg.slots.first().copied());
        // SAFETY: 4096 is inside `big` (four pages), so the pointer stays in its allocation.
        let inner = unsafe { ptr.add(4096) };
        assert!(reg.slot_of(inner, 3 * 4096).is_some());
        assert!(reg.slot_of(inner, 3 * 4096 + 1).is_none(), "past the end");
        assert!(reg.slot_of(ptr, 0).is_none());
        let elsewhere = IoBuf::aligned(4096);
        assert!(!elsewhere.with_fixed(Some(&reg)).is_fixed());
        // A buffer registered with another engine takes the plain path there and still works.
        let dir = tempfile::tempdir().unwrap();
        let f = scratch(dir.path());
        let b = run_sync(&other, IoKind::Write, f, 0, big.with_fixed(Some(&reg))).unwrap();
        assert!(b.is_fixed());
    }

    #[test]
    fn dropped_registrations_give_their_slots_back() {
        let Some(e) = uring() else { return };
        let b = IoBuf::aligned(4096);
        // More registrations than there are slots: each one's drop must free its slot.
        for _ in 0..FIXED_SLOTS + 100 {
            let Some(reg) = register(&e, &b) else { return };
            assert_eq!(reg.len(), 4096);
        }
        // Dropping the engine while a registration still lives neither hangs nor fails.
        let reg = register(&e, &b);
        drop(e);
        drop(reg);
    }

    #[test]
    fn psync_does_not_register() {
        let e = PsyncEngine::start(2).unwrap();
        let b = IoBuf::aligned(4096);
        let (ptr, len) = b.raw();
        // SAFETY: `b` outlives the (refused) registration.
        let r = unsafe { e.register(ptr, len) };
        assert!(matches!(r, Err(RegisterError::Unsupported("psync"))));
    }

    /// Drops `CAP_IPC_LOCK` from the calling thread's effective set (threads it starts
    /// inherit that), so registrations are charged to `RLIMIT_MEMLOCK` as for an unprivileged
    /// pod.
    fn drop_ipc_lock_here() -> bool {
        const VERSION_3: u32 = 0x2008_0522;
        const CAP_IPC_LOCK: u32 = 14;
        let mut header = [VERSION_3, 0u32];
        let mut data = [0u32; 6];
        // SAFETY: capget/capset with a version-3 header and room for its two data structs.
        unsafe {
            if libc::syscall(libc::SYS_capget, header.as_mut_ptr(), data.as_mut_ptr()) != 0 {
                return false;
            }
            data[0] &= !(1 << CAP_IPC_LOCK);
            libc::syscall(libc::SYS_capset, header.as_mut_ptr(), data.as_ptr()) == 0
        }
    }

    #[test]
    fn a_registration_over_the_memlock_limit_is_refused_and_io_goes_on() {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit fills the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0
            || lim.rlim_cur == libc::RLIM_INFINITY
            || lim.rlim_cur >= 64 << 20
        {
            eprintln!("RLIMIT_MEMLOCK is not below 64 MiB here; skipping");
            return;
        }
        // In a thread of its own: capabilities are per thread.
        std::thread::spawn(|| {
            if !drop_ipc_lock_here() {
                eprintln!("cannot drop CAP_IPC_LOCK here; skipping");
                return;
            }
            let Some(e) = uring() else { return };
            let big = IoBuf::aligned(64 << 20);
            let (ptr, len) = big.raw();
            // SAFETY: `big` outlives the (refused) registration.
            match unsafe { e.register(ptr, len) } {
                Err(RegisterError::Refused { bytes, .. }) => assert_eq!(bytes, 64 << 20),
                Err(RegisterError::Unsupported(_)) => return,
                other => panic!("expected a refusal, got {other:?}"),
            }
            // The engine still works, on the plain path.
            let dir = tempfile::tempdir().unwrap();
            let f = scratch(dir.path());
            let mut w = IoBuf::aligned(4096);
            w.as_mut_slice().fill(7);
            let w = run_sync(&e, IoKind::Write, f.clone(), 0, w).unwrap();
            let r = run_sync(&e, IoKind::Read, f, 0, IoBuf::aligned(4096)).unwrap();
            assert_eq!(r.as_slice(), w.as_slice());
        })
        .join()
        .unwrap();
    }
}
