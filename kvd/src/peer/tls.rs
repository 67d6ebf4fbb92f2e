//! Mutual TLS for the peer data port: a node serves blocks only to nodes holding a
//! certificate of the cluster's CA, and takes blocks only from the node the cluster index
//! names, proven by a certificate issued to that node's name.
//!
//! The three files (`peer.tls_cert`, `peer.tls_key`, `peer.tls_ca`: a Kubernetes TLS Secret's
//! `tls.crt`, `tls.key`, `ca.crt`) are read at start, where this node's certificate is
//! checked against the CA and `index.node_id` so a wrong mount fails loudly, and again when
//! any of them changes (checked at most once a second, on the next connection): a renewed
//! certificate is used without a restart, and files caught half-written keep the previous
//! ones in use with a warning. TLS 1.3 only, on the aws-lc-rs provider.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Protocol name both sides insist on: a TLS connection to some other service fails the
/// handshake instead of exchanging garbage.
const ALPN: &[u8] = b"kvd-peer/1";
/// The files are looked at no more often than this.
const RECHECK: Duration = Duration::from_secs(1);

/// Why the TLS files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{key} = {path}: {source}")]
    Read {
        /// Configuration key.
        key: &'static str,
        /// File.
        path: PathBuf,
        /// OS or PEM error.
        #[source]
        source: io::Error,
    },
    /// A file holds nothing usable.
    #[error("{key} = {path}: {why}")]
    Content {
        /// Configuration key.
        key: &'static str,
        /// File.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// This node's certificate would be refused by the other nodes.
    #[error(
        "peer.tls_cert = {path} is not valid for this node {node:?} under peer.tls_ca: {why} \
         (issue it to the node's name, index.node_id, for server and client auth)"
    )]
    NotForThisNode {
        /// Certificate file.
        path: PathBuf,
        /// This node's name.
        node: String,
        /// The verifier's reason.
        why: String,
    },
    /// rustls refused the combination (e.g. the key does not match the certificate).
    #[error("peer TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The files of one node's identity.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain (PEM), this node's first.
    pub cert: PathBuf,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates (PEM) every node's certificate must chain to.
    pub ca: PathBuf,
}

/// Both sides' rustls configurations, built from one reading of the files.
struct Loaded {
    stamp: Vec<Option<(SystemTime, u64, u64)>>,
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

/// This node's TLS identity, reloaded when its files change.
pub struct PeerTls {
    files: TlsFiles,
    node: String,
    loaded: Mutex<(Arc<Loaded>, Instant)>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls")
            .field("files", &self.files)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Modification time, size and inode of each file (a Secret update swaps a symlink).
fn stamp(files: &TlsFiles) -> Vec<Option<(SystemTime, u64, u64)>> {
    use std::os::unix::fs::MetadataExt;
    [&files.cert, &files.key, &files.ca]
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len(), m.ino()))
        })
        .collect()
}

/// A PEM file that could not be read (`Read`) or parsed (`Content`, saying what it should
/// have held).
fn pem_error(
    key: &'static str,
    path: &Path,
    e: rustls::pki_types::pem::Error,
    want: &str,
) -> TlsError {
    match e {
        rustls::pki_types::pem::Error::Io(source) => TlsError::Read {
            key,
            path: path.to_owned(),
            source,
        },
        other => TlsError::Content {
            key,
            path: path.to_owned(),
            why: format!("no usable {want} ({other})"),
        },
    }
}

fn certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |e| pem_error(key, path, e, "PEM certificates");
    let v = CertificateDer::pem_file_iter(path)
        .map_err(bad)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad)?;
    if v.is_empty() {
        return Err(TlsError::Content {
            key,
            path: path.to_owned(),
            why: "no PEM certificate in it".into(),
        });
    }
    Ok(v)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| pem_error("peer.tls_key", path, e, "private key"))
}

/// Reads the files and builds both sides' configurations, checking that this node's
/// certificate chains to the CA, is valid now and names `node`.
fn load(files: &TlsFiles, node: &str) -> Result<Loaded, TlsError> {
    let stamp = stamp(files);
    let chain = certs("peer.tls_cert", &files.cert)?;
    let key = private_key(&files.key)?;
    let mut roots = RootCertStore::empty();
    for ca in certs("peer.tls_ca", &files.ca)? {
        roots.add(ca).map_err(|e| TlsError::Content {
            key: "peer.tls_ca",
            path: files.ca.clone(),
            why: format!("not a CA certificate: {e}"),
        })?;
    }
    let roots = Arc::new(roots);
    let p = provider();
    let not_for_us = |why: String| TlsError::NotForThisNode {
        path: files.cert.clone(),
        node: node.to_owned(),
        why,
    };
    let name = server_name(node).map_err(|e| not_for_us(e.to_string()))?;
    let server_check = WebPkiServerVerifier::builder_with_provider(roots.clone(), p.clone())
        .build()
        .map_err(|e| not_for_us(e.to_string()))?;
    server_check
        .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
        .map_err(|e| not_for_us(e.to_string()))?;
    let clients = WebPkiClientVerifier::builder_with_provider(roots.clone(), p.clone())
        .build()
        .map_err(|e| not_for_us(e.to_string()))?;
    let mut server = ServerConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(clients)
        .with_single_cert(chain.clone(), key.clone_key())?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    let mut client = ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    client.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Loaded {
        stamp,
        acceptor: TlsAcceptor::from(Arc::new(server)),
        connector: TlsConnector::from(Arc::new(client)),
    })
}

impl PeerTls {
    /// Loads this node's identity; an error says which file and what to fix.
    pub fn new(files: TlsFiles, node: &str) -> Result<PeerTls, TlsError> {
        let loaded = load(&files, node)?;
        Ok(PeerTls {
            files,
            node: node.to_owned(),
            loaded: Mutex::new((Arc::new(loaded), Instant::now())),
        })
    }

    /// The current configurations, reloaded first if a file changed since the last look
    /// (at most once per second). A reload that fails keeps the previous ones.
    fn current(&self) -> Arc<Loaded> {
        let mut g = self.loaded.lock();
        if g.1.elapsed() < RECHECK {
            return g.0.clone();
        }
        g.1 = Instant::now();
        let now = stamp(&self.files);
        if now != g.0.stamp {
            match load(&self.files, &self.node) {
                Ok(l) => {
                    tracing::info!(cert = %self.files.cert.display(),
                        "peer TLS files changed: new connections use them");
                    g.0 = Arc::new(l);
                }
                Err(e) => {
                    tracing::warn!(error = %e,
                        "peer TLS files changed but cannot be used; keeping the previous ones");
                    // Tried again only when the files change again.
                    let kept = Loaded {
                        stamp: now,
                        acceptor: g.0.acceptor.clone(),
                        connector: g.0.connector.clone(),
                    };
                    g.0 = Arc::new(kept);
                }
            }
        }
        g.0.clone()
    }

    /// For accepted connections.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.current().acceptor.clone()
    }

    /// For dialed connections.
    pub fn connector(&self) -> TlsConnector {
        self.current().connector.clone()
    }
}

/// The name a dialed node's certificate must carry: its name in the cluster index.
pub fn server_name(node: &str) -> io::Result<ServerName<'static>> {
    ServerName::try_from(node.to_owned()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("node name {node:?} is not a DNS name a certificate can carry"),
        )
    })
}

#[cfg(test)]
mod tests {
    use kvd_tests::pki::{Ca, NodeFiles, Validity};

    use super::*;

    fn files(f: &NodeFiles) -> TlsFiles {
        TlsFiles {
            cert: f.cert.clone(),
            key: f.key.clone(),
            ca: f.ca.clone(),
        }
    }

    /// A node starts only with a certificate the other nodes will accept from it: issued by
    /// its CA, valid now, to its own name.
    #[test]
    fn a_certificate_is_checked_against_the_ca_the_clock_and_the_node_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("test");
        let good = ca.node(dir.path(), "good", "node-a", Validity::Current);
        PeerTls::new(files(&good), "node-a").unwrap();
        let e = PeerTls::new(files(&good), "node-b").unwrap_err();
        assert!(matches!(e, TlsError::NotForThisNode { .. }), "{e}");
        assert!(e.to_string().contains("index.node_id"), "{e}");
        let old = ca.node(dir.path(), "old", "node-a", Validity::Expired);
        let e = PeerTls::new(files(&old), "node-a").unwrap_err();
        assert!(e.to_string().to_lowercase().contains("expired"), "{e}");
        let other = Ca::new("other").node(dir.path(), "other", "node-a", Validity::Current);
        let mut mixed = files(&other);
        mixed.ca = good.ca.clone();
        let e = PeerTls::new(mixed, "node-a").unwrap_err();
        assert!(matches!(e, TlsError::NotForThisNode { .. }), "{e}");
    }

    #[test]
    fn a_missing_or_empty_file_names_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let good = Ca::new("test").node(dir.path(), "n", "node-a", Validity::Current);
        let mut f = files(&good);
        f.key = dir.path().join("absent.key");
        let e = PeerTls::new(f, "node-a").unwrap_err();
        assert!(e.to_string().starts_with("peer.tls_key = "), "{e}");
        let mut f = files(&good);
        std::fs::write(dir.path().join("empty.crt"), "").unwrap();
        f.ca = dir.path().join("empty.crt");
        let e = PeerTls::new(f, "node-a").unwrap_err();
        assert!(e.to_string().contains("peer.tls_ca"), "{e}");
    }

    /// Files that change are picked up on the next look; files that cannot be used keep the
    /// previous configuration.
    #[test]
    fn changed_files_are_reloaded_and_broken_ones_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let good = Ca::new("test").node(dir.path(), "n", "node-a", Validity::Current);
        let t = PeerTls::new(files(&good), "node-a").unwrap();
        let config = |t: &PeerTls| {
            t.loaded.lock().1 = Instant::now() - RECHECK;
            t.current().acceptor.config().clone()
        };
        let first = config(&t);
        assert!(Arc::ptr_eq(&config(&t), &first), "nothing changed");
        std::fs::write(&good.cert, "garbage").unwrap();
        assert!(
            Arc::ptr_eq(&config(&t), &first),
            "broken files are not used"
        );
        let renewed = Ca::new("renewed").node(dir.path(), "m", "node-a", Validity::Current);
        for (from, to) in [
            (&renewed.key, &good.key),
            (&renewed.ca, &good.ca),
            (&renewed.cert, &good.cert),
        ] {
            std::fs::copy(from, to).unwrap();
        }
        assert!(!Arc::ptr_eq(&config(&t), &first), "renewed files are used");
    }
}
