//! Admission of connections to the daemon's network endpoints (peer data port, metrics, the
//! KV-event sockets): at most a fixed number at once in all and from one address, a
//! connection over either cap closed at once (not left in the listen backlog, where a flood
//! of idle connections used to hold every slot while probes and real fetches waited), a
//! failed accept logged and retried after a pause, and an end when the endpoint is told to
//! stop. Each endpoint puts its own deadline on a connection's first bytes.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hashbrown::HashMap;
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// Caps of one endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// Connections at once, in all.
    pub total: usize,
    /// Connections at once from one IP address (`None`, for Unix sockets, counts as one).
    pub per_addr: usize,
}

/// Who is connected to an endpoint, per address.
#[derive(Debug)]
pub struct Admission {
    caps: Caps,
    per_addr: Mutex<HashMap<Option<IpAddr>, usize>>,
    refused: AtomicU64,
}

/// Held while a connection is served; gives its place back when dropped.
#[derive(Debug)]
pub struct Admitted {
    adm: Arc<Admission>,
    addr: Option<IpAddr>,
}

impl Admission {
    /// An endpoint with `caps`.
    pub fn new(caps: Caps) -> Arc<Admission> {
        Arc::new(Admission {
            caps,
            per_addr: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
        })
    }

    /// A place for a connection from `addr`, or `None` (counted) when a cap is reached.
    pub fn admit(self: &Arc<Self>, addr: Option<IpAddr>) -> Option<Admitted> {
        let mut m = self.per_addr.lock();
        let total: usize = m.values().sum();
        let here = m.get(&addr).copied().unwrap_or(0);
        if total >= self.caps.total || here >= self.caps.per_addr {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *m.entry(addr).or_insert(0) += 1;
        Some(Admitted {
            adm: self.clone(),
            addr,
        })
    }

    /// Connections closed at a cap so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut m = self.adm.per_addr.lock();
        if let Some(n) = m.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.addr);
            }
        }
    }
}

/// The next admitted TCP connection, with its place; `None` once `stop` fires.
pub async fn next(
    what: &str,
    listener: &TcpListener,
    adm: &Arc<Admission>,
    stop: &Notify,
) -> Option<(TcpStream, SocketAddr, Admitted)> {
    loop {
        let accepted = tokio::select! {
            _ = stop.notified() => return None,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, addr)) => match adm.admit(Some(addr.ip())) {
                Some(place) => return Some((stream, addr, place)),
                None => tracing::debug!(peer = %addr, "{what}: connection over the caps closed"),
            },
            Err(e) => {
                tracing::warn!(error = %e, "{what}: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_address_and_in_all() {
        let adm = Admission::new(Caps {
            total: 3,
            per_addr: 2,
        });
        let a = Some(IpAddr::from([127, 0, 0, 1]));
        let b = Some(IpAddr::from([127, 0, 0, 2]));
        let x1 = adm.admit(a).expect("first");
        let _x2 = adm.admit(a).expect("second");
        assert!(adm.admit(a).is_none(), "the per-address cap");
        let _y1 = adm.admit(b).expect("other address");
        assert!(adm.admit(b).is_none(), "the total cap");
        drop(x1);
        assert!(adm.admit(b).is_some(), "a place given back");
        assert_eq!(adm.refused(), 2);
    }
}
