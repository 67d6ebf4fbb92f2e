//! Block IO engines: io_uring on a dedicated thread, or positional syscalls as the fallback.
//!
//! Both take [`IoOp`]s through the same [`IoEngine`] trait over a bounded queue, move bytes
//! between a file and an [`IoBuf`] without a bounce copy (arena slots are 4 KiB aligned, so
//! O_DIRECT reads and writes go straight to and from shared memory), and hand the buffer back
//! with the result through the op's callback. The io_uring engine owns one ring on a named
//! thread (`kvd-io-uring`) and never has more than `depth` operations in flight; the psync
//! engine runs `depth.min(8)` threads doing `pread`/`pwrite`. The callbacks run on the IO
//! threads: they must only hand the result on (a channel send and a wake-up), never block.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
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
            ptr,
            len,
        }
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

/// A block IO engine.
pub trait IoEngine: Send + Sync {
    /// Engine name for logs and status (`io_uring` or `psync`).
    fn name(&self) -> &'static str;
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

/// io_uring engine: one ring on one thread, at most `depth` operations in flight.
pub struct UringEngine {
    tx: Mutex<Option<SyncSender<Vec<IoOp>>>>,
    thread: Option<JoinHandle<()>>,
}

impl UringEngine {
    /// Creates the ring (fails where io_uring is unavailable, e.g. seccomp or old kernels)
    /// and starts its thread.
    pub fn start(depth: u32) -> io::Result<UringEngine> {
        let depth = depth.clamp(1, 4096);
        let ring = io_uring::IoUring::new(depth.next_power_of_two())?;
        let (tx, rx) = sync_channel::<Vec<IoOp>>(depth as usize * 4);
        let thread = std::thread::Builder::new()
            .name("kvd-io-uring".into())
            .spawn(move || uring_loop(ring, rx, depth as usize))?;
        Ok(UringEngine {
            tx: Mutex::new(Some(tx)),
            thread: Some(thread),
        })
    }
}

fn uring_loop(mut ring: io_uring::IoUring, rx: Receiver<Vec<IoOp>>, depth: usize) {
    use io_uring::{opcode, types};
    let mut slots: Vec<Option<IoOp>> = (0..depth).map(|_| None).collect();
    let mut free: Vec<usize> = (0..depth).rev().collect();
    let mut backlog: std::collections::VecDeque<IoOp> = std::collections::VecDeque::new();
    let mut inflight = 0usize;
    let mut open = true;
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
                match got {
                    Some(v) => backlog.extend(v),
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
            let entry = match op.kind {
                IoKind::Read => opcode::Read::new(fd, ptr, len32).offset(op.offset).build(),
                IoKind::Write => opcode::Write::new(fd, ptr, len32).offset(op.offset).build(),
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
            while let Ok(v) = rx.try_recv() {
                v.into_iter().for_each(|op| op.finish(Err(stopped())));
            }
            return;
        }
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (ud, res) in done {
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
        send(&self.tx, ops).map_err(|ops| {
            ops.into_iter().for_each(|o| o.finish(Err(stopped())));
            Stopped
        })
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.tx.lock().take();
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
}
