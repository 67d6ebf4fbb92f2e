//! Certificates for the peer data port's mutual TLS, made on the spot with rcgen: a cluster
//! CA and node certificates issued to node names, plus the bad ones a test needs (another
//! CA's, expired, another node's name). Files are written where a daemon reads them, in the
//! layout of a Kubernetes TLS Secret (`tls.crt`, `tls.key`, `ca.crt`).

use std::path::{Path, PathBuf};

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// A certificate authority.
pub struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// How a node certificate is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// Valid now.
    Current,
    /// Expired in 2021.
    Expired,
}

/// One node's files.
#[derive(Debug, Clone)]
pub struct NodeFiles {
    /// Certificate.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
    /// The CA this node trusts.
    pub ca: PathBuf,
}

impl NodeFiles {
    /// `--set` arguments pointing a daemon at these files (mutual TLS on).
    pub fn sets(&self) -> Vec<String> {
        vec![
            "peer.tls=mutual".into(),
            format!("peer.tls_cert={}", self.cert.display()),
            format!("peer.tls_key={}", self.key.display()),
            format!("peer.tls_ca={}", self.ca.display()),
        ]
    }
}

impl Ca {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = p.self_signed(&key).expect("CA certificate");
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    /// Writes a certificate for node `name` (both server and client auth), its key and this
    /// CA into `dir/<file_stem>.{crt,key}` and `dir/<file_stem>-ca.crt`.
    pub fn node(&self, dir: &Path, file_stem: &str, name: &str, v: Validity) -> NodeFiles {
        let mut p = CertificateParams::new(vec![name.to_owned()]).expect("node params");
        p.distinguished_name.push(DnType::CommonName, name);
        p.use_authority_key_identifier_extension = true;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if v == Validity::Expired {
            p.not_before = date_time_ymd(2020, 1, 1);
            p.not_after = date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().expect("node key");
        let cert = p.signed_by(&key, &self.issuer).expect("node certificate");
        let files = NodeFiles {
            cert: dir.join(format!("{file_stem}.crt")),
            key: dir.join(format!("{file_stem}.key")),
            ca: dir.join(format!("{file_stem}-ca.crt")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write certificate");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        std::fs::write(&files.ca, &self.pem).expect("write CA");
        files
    }
}
