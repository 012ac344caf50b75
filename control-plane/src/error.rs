//! The crate's one error type, and its mapping to gRPC status codes (the only place it happens).

use flex_shared::crypto::CryptoError;
use tonic::{Code, Status};

use crate::store::StoreError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a control-plane operation can fail with. Messages are written for the operator who
/// reads them in `flex admin` output: what went wrong, and how to fix it. None of them ever
/// contains a secret, a key hash or a ciphertext.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; the message says what to change, with an example.
    #[error("{0}")]
    InvalidArgument(String),
    /// The named org, key or provider key does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is well-formed but the current state forbids it (e.g. revoking a revoked key).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Another command changed the same aggregate first (optimistic concurrency).
    #[error("stream {stream_id} was changed by another command after it was read (expected version {expected}); retry the call")]
    Conflict { stream_id: String, expected: u64 },
    #[error("event store: {0}")]
    Store(StoreError),
    #[error("provider key encryption: {0}")]
    Crypto(#[from] CryptoError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict {
                stream_id,
                expected,
            } => Error::Conflict {
                stream_id,
                expected,
            },
            other => Error::Store(other),
        }
    }
}

impl Error {
    /// The gRPC code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Conflict { .. } | Error::Store(StoreError::IdempotencyKeyTaken { .. }) => {
                Code::Aborted
            }
            Error::Store(StoreError::Database(
                sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed,
            )) => Code::Unavailable,
            Error::Store(StoreError::UnsupportedUrl(_)) => Code::InvalidArgument,
            Error::Crypto(CryptoError::UnknownKeyId(_)) => Code::FailedPrecondition,
            Error::Store(_) | Error::Crypto(_) | Error::Transport(_) | Error::Internal(_) => {
                Code::Internal
            }
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = e.code();
        match code {
            Code::Internal => {
                // The detail goes to the log (it never holds secrets), the caller gets a hint.
                tracing::error!(error = %e, "control plane internal error");
                Status::internal(
                    "internal error in the control plane; the details are in its log. Retrying may help",
                )
            }
            Code::Unavailable => {
                tracing::warn!(error = %e, "database unavailable");
                Status::unavailable(
                    "the control plane cannot reach its database right now; retry shortly",
                )
            }
            _ => Status::new(code, e.to_string()),
        }
    }
}
