//! The accept loop of the daemon's TCP endpoints (peer data port, metrics): at most a fixed
//! number of connections served at once (more wait in the listen backlog), a failed accept
//! logged and retried after a pause, and an end when the endpoint is told to stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// The next connection, with the permit to hold while serving it; `None` once `stop` fires.
pub async fn next(
    what: &str,
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
    stop: &Notify,
) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    let permit = tokio::select! {
        _ = stop.notified() => return None,
        p = permits.clone().acquire_owned() => p.ok()?,
    };
    loop {
        let accepted = tokio::select! {
            _ = stop.notified() => return None,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, addr)) => return Some((stream, addr, permit)),
            Err(e) => {
                tracing::warn!(error = %e, "{what}: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
