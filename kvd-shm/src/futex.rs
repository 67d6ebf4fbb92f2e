//! Cross-process futex wait/wake on a `u32` in shared memory.
//!
//! A sleeping consumer costs nothing and a producer only pays a syscall when the consumer
//! announced it sleeps (see [`crate::ring`]). The futexes are not `FUTEX_PRIVATE` because the
//! word lives in a mapping shared between processes.

use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Sleeps while `*word == expected`, at most `timeout`. Returns on wake, timeout, signal, or
/// immediately if the value differs; callers re-check their condition either way.
pub fn wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(i32::try_from(timeout.subsec_nanos()).unwrap_or(0)),
    };
    // SAFETY: `word` is a live, aligned u32 for the duration of the call; FUTEX_WAIT only reads
    // it and `ts` outlives the syscall. Errors (EAGAIN, ETIMEDOUT, EINTR) all mean "re-check".
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

/// Wakes up to `n` waiters on `word`.
pub fn wake(word: &AtomicU32, n: i32) {
    // SAFETY: `word` is a live, aligned u32; FUTEX_WAKE does not access user memory beyond
    // using the address as a key.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn wait_returns_on_mismatch_and_timeout() {
        let w = AtomicU32::new(1);
        let t = Instant::now();
        wait(&w, 0, Duration::from_secs(5));
        assert!(t.elapsed() < Duration::from_secs(4));
        wait(&w, 1, Duration::from_millis(10));
    }

    #[test]
    fn wake_releases_a_waiter() {
        let w = Arc::new(AtomicU32::new(1));
        let w2 = w.clone();
        let h = std::thread::spawn(move || {
            while w2.load(Ordering::SeqCst) == 1 {
                wait(&w2, 1, Duration::from_secs(10));
            }
        });
        std::thread::sleep(Duration::from_millis(20));
        w.store(0, Ordering::SeqCst);
        wake(&w, 1);
        h.join().unwrap();
    }
}
