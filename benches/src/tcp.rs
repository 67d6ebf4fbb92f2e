//! The reference for peer fetch: a plain TCP copy of the same bytes over loopback, with as
//! many connections as kvd fetches over, from one buffer of distinct blocks into another
//! (a cache's footprint on both sides, as kvd's arenas have). No protocol, no checksum: what
//! the kernel's TCP can do here, which a peer fetch can at best match. `socket_buffer` sets
//! the sockets' buffers as kvd's data connections do (`None`: the kernel's autotuning).
//! With [`Transport::Tls`] each connection is a rustls client/server pair doing mutual TLS
//! with the same certificates and provider kvd uses: the reference for a peer fetch over
//! mutual TLS.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// How the reference's connections are made.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Plain TCP.
    Tcp,
    /// Mutual TLS 1.3 over TCP.
    Tls {
        /// The receiving side's configuration (it asks for the sender's certificate).
        server: Arc<rustls::ServerConfig>,
        /// The sending side's.
        client: Arc<rustls::ClientConfig>,
        /// The name the receiver's certificate carries.
        name: ServerName<'static>,
    },
}

fn pem_certs(p: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_file_iter(p)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| io::Error::other(format!("{}: {e}", p.display())))
}

fn pem_key(p: &Path) -> io::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(p).map_err(|e| io::Error::other(format!("{}: {e}", p.display())))
}

impl Transport {
    /// Mutual TLS between a receiver holding `(cert, key)` issued to `name` and a sender
    /// holding `(peer_cert, peer_key)`, both under `ca` (PEM files), on aws-lc-rs as kvd.
    pub fn mutual_tls(
        ca: &Path,
        (cert, key): (&Path, &Path),
        (peer_cert, peer_key): (&Path, &Path),
        name: &str,
    ) -> io::Result<Transport> {
        let bad = |e: rustls::Error| io::Error::other(e.to_string());
        let mut roots = rustls::RootCertStore::empty();
        for c in pem_certs(ca)? {
            roots.add(c).map_err(bad)?;
        }
        let roots = Arc::new(roots);
        let p = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), p.clone())
                .build()
                .map_err(|e| io::Error::other(e.to_string()))?;
        let mut server = rustls::ServerConfig::builder_with_provider(p.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(bad)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(pem_certs(cert)?, pem_key(key)?)
            .map_err(bad)?;
        let client = rustls::ClientConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(bad)?
            .with_root_certificates(roots)
            .with_client_auth_cert(pem_certs(peer_cert)?, pem_key(peer_key)?)
            .map_err(bad)?;
        // The sending side never reads: session tickets would sit unread in its socket and
        // turn its close into a reset that discards the receiver's last bytes.
        server.send_tls13_tickets = 0;
        Ok(Transport::Tls {
            server: Arc::new(server),
            client: Arc::new(client),
            name: ServerName::try_from(name.to_owned())
                .map_err(|e| io::Error::other(e.to_string()))?,
        })
    }
}

/// One side of a reference connection.
trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

/// Wraps a connected pair as `t` says, completing both sides' TLS handshakes.
fn wrap(
    t: &Transport,
    out: TcpStream,
    inc: TcpStream,
) -> io::Result<(Box<dyn Conn>, Box<dyn Conn>)> {
    let Transport::Tls {
        server,
        client,
        name,
    } = t
    else {
        return Ok((Box::new(out), Box::new(inc)));
    };
    let bad = |e: rustls::Error| io::Error::other(e.to_string());
    let mut c = rustls::StreamOwned::new(
        rustls::ClientConnection::new(client.clone(), name.clone()).map_err(bad)?,
        out,
    );
    let mut s = rustls::StreamOwned::new(
        rustls::ServerConnection::new(server.clone()).map_err(bad)?,
        inc,
    );
    std::thread::scope(|scope| -> io::Result<()> {
        let h = scope.spawn(|| -> io::Result<()> {
            while s.conn.is_handshaking() {
                s.conn.complete_io(&mut s.sock)?;
            }
            Ok(())
        });
        let mut client = Ok(());
        while client.is_ok() && c.conn.is_handshaking() {
            client = c.conn.complete_io(&mut c.sock).map(|_| ());
        }
        // The receiver's reason first: a refused certificate shows there, as a reset here.
        h.join()
            .map_err(|_| io::Error::other("a handshake thread panicked"))?
            .and(client)
    })?;
    Ok((Box::new(c), Box::new(s)))
}

/// Copies `src` to `dst` (same length) in blocks of `size` bytes over `conns` connections
/// made as `transport` says, block `i` on connection `i % conns`; returns the time from the
/// first byte sent to the last received (connections and handshakes come before).
pub fn copy(
    src: &[u8],
    dst: &mut [u8],
    size: usize,
    conns: usize,
    socket_buffer: Option<u32>,
    transport: &Transport,
) -> io::Result<Duration> {
    assert_eq!(
        src.len(),
        dst.len(),
        "source and destination differ in length"
    );
    let conns = conns.max(1);
    let size = size.max(1);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut receivers = Vec::with_capacity(conns);
    for _ in 0..conns {
        let out = TcpStream::connect(addr)?;
        let (inc, _) = listener.accept()?;
        out.set_nodelay(true)?;
        if let Some(b) = socket_buffer {
            set_buffer(&out, libc::SO_SNDBUF, b)?;
            set_buffer(&inc, libc::SO_RCVBUF, b)?;
        }
        receivers.push(wrap(transport, out, inc)?);
    }
    // Each connection's destination blocks, as disjoint slices.
    let mut shares: Vec<Vec<&mut [u8]>> = (0..conns).map(|_| Vec::new()).collect();
    for (i, block) in dst.chunks_mut(size).enumerate() {
        shares[i % conns].push(block);
    }
    let start = Instant::now();
    std::thread::scope(|s| -> io::Result<()> {
        let mut handles = Vec::new();
        for (c, ((mut out, mut inc), share)) in receivers.into_iter().zip(shares).enumerate() {
            handles.push(s.spawn(move || -> io::Result<()> {
                for block in src.chunks(size).skip(c).step_by(conns) {
                    out.write_all(block)?;
                }
                out.flush()
            }));
            handles.push(s.spawn(move || -> io::Result<()> {
                for block in share {
                    inc.read_exact(block)?;
                }
                Ok(())
            }));
        }
        for h in handles {
            h.join()
                .map_err(|_| io::Error::other("a copy thread panicked"))??;
        }
        Ok(())
    })?;
    Ok(start.elapsed())
}

fn set_buffer(s: &TcpStream, opt: libc::c_int, bytes: u32) -> io::Result<()> {
    let v = bytes as libc::c_int;
    // SAFETY: a valid socket descriptor and a pointer to a c_int of the given size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_every_block_to_its_place() {
        let src: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut dst = vec![0u8; src.len()];
        copy(&src, &mut dst, 1000, 3, Some(1 << 20), &Transport::Tcp).expect("copy");
        assert_eq!(src, dst);
        dst.fill(0);
        copy(&src, &mut dst, 777, 2, None, &Transport::Tcp).expect("copy");
        assert_eq!(src, dst);
    }

    #[test]
    fn copies_every_block_over_mutual_tls() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = kvd_tests::pki::Ca::new("bench");
        let v = kvd_tests::pki::Validity::Current;
        let (a, b) = (
            ca.node(dir.path(), "a", "node-a", v),
            ca.node(dir.path(), "b", "node-b", v),
        );
        let t = Transport::mutual_tls(&a.ca, (&a.cert, &a.key), (&b.cert, &b.key), "node-a")
            .expect("tls");
        let src: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let mut dst = vec![0u8; src.len()];
        copy(&src, &mut dst, 70_000, 3, None, &t).expect("copy");
        assert_eq!(src, dst);
    }
}
