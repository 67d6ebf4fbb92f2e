//! Client errors: one enum, with a message that says what to do.

use std::path::PathBuf;

use kvd_proto::frame::ErrorCode;
use kvd_proto::ring::Status;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error(
        "kvd is not running at {path} ({source}); start it with `kvd --config config/kvd.toml` \
         or point the client at the right socket (KVD_SOCKET / --socket)"
    )]
    NotRunning {
        /// Socket path tried.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// Somebody other than kvd serves the socket.
    #[error(
        "the socket at {path} is served by uid {uid}, not by {expected}: something else has \
         taken kvd's socket; refusing to send it anything (check the socket directory's owner \
         and mode, and set KVD_SERVER_UID to the uid kvd runs as)"
    )]
    Impostor {
        /// Socket path.
        path: PathBuf,
        /// The uid serving it.
        uid: u32,
        /// Who was expected.
        expected: String,
    },
    /// Socket IO failed after connecting.
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon sent bytes this client cannot decode.
    #[error("kvd sent an invalid frame: {0}")]
    Protocol(#[from] kvd_proto::DecodeError),
    /// The daemon refused the request.
    #[error("kvd refused the request ({code:?}): {message}")]
    Server {
        /// Error code.
        code: ErrorCode,
        /// Daemon's explanation.
        message: String,
    },
    /// A ring operation completed with an error status.
    #[error("{op} failed: {why}")]
    Status {
        /// Operation.
        op: &'static str,
        /// Raw status.
        status: u16,
        /// Explanation.
        why: String,
    },
    /// The shared-memory ring failed (daemon gone, timeout, corruption).
    #[error("ring: {0}")]
    Ring(#[from] kvd_shm::RingError),
    /// The shared memory the daemon passed is unusable.
    #[error("shared memory: {0}")]
    Map(#[from] kvd_shm::MapError),
    /// The daemon answered something that does not fit the request.
    #[error("unexpected reply from kvd: {0}")]
    Unexpected(String),
    /// The caller passed something unusable.
    #[error("invalid argument: {0}")]
    Invalid(String),
}

impl ClientError {
    /// Whether trying again later may succeed (daemon restarting, cache momentarily full).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::NotRunning { .. } | ClientError::Io(_) => true,
            ClientError::Ring(kvd_shm::RingError::Closed | kvd_shm::RingError::Timeout(_)) => true,
            ClientError::Server { code, .. } => {
                matches!(code, ErrorCode::CacheFull | ErrorCode::ShuttingDown)
            }
            ClientError::Status { status, .. } => matches!(
                Status::from_u16(*status),
                Some(Status::CacheFull | Status::ShuttingDown | Status::LimitExceeded)
            ),
            _ => false,
        }
    }

    /// Whether the condition will not change by retrying.
    pub fn is_permanent(&self) -> bool {
        !self.is_retryable()
    }

    /// The ring status, if this is a ring status error.
    pub fn status(&self) -> Option<Status> {
        match self {
            ClientError::Status { status, .. } => Status::from_u16(*status),
            _ => None,
        }
    }

    pub(crate) fn from_status(op: &'static str, status: u16) -> Self {
        let why = match Status::from_u16(status) {
            Some(Status::CacheFull) => {
                "cache full: every block is pinned or being read; unpin or raise dram.arena_bytes"
                    .into()
            }
            Some(Status::TooLarge) => "block is empty or larger than dram.max_block_bytes".into(),
            Some(Status::BadNamespace) => "namespace handle not open on this connection".into(),
            Some(Status::Stale) => "reservation or lease already ended (timed out?)".into(),
            Some(Status::BadLength) => "length is zero or larger than the reserved slot".into(),
            Some(Status::ShuttingDown) => "kvd is shutting down".into(),
            Some(Status::LimitExceeded) => {
                "too many reservations/leases held on this connection; release some".into()
            }
            Some(s) => format!("{s:?}"),
            None => format!("unknown status {status}"),
        };
        ClientError::Status { op, status, why }
    }
}

/// Result alias.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;
