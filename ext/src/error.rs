//! The crate's one error type.
//!
//! Every failure carries a stable `code()` (shared with the Python exception tree in
//! `nbdnats/errors.py`) and a message that says what failed and what to do next.

use std::io;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad argument or option: the caller's mistake, fixed by changing the call.
    #[error("{0}")]
    Usage(String),
    /// A source or target could not be opened, read or written.
    #[error("{0}")]
    Endpoint(String),
    /// The target cannot hold the source.
    #[error("{0}")]
    TargetTooSmall(String),
    /// NATS could not be reached or the connection failed.
    #[error("{0}")]
    Nats(String),
    /// The peer did not show up or stopped answering in time.
    #[error("{0}")]
    Timeout(String),
    /// The peer broke the protocol or sent something we cannot accept.
    #[error("{0}")]
    Protocol(String),
    /// The peer reported a failure of its own.
    #[error("{message}")]
    Remote { code: String, message: String },
    /// Data did not match its checksum or the end-of-transfer digest.
    #[error("{0}")]
    Integrity(String),
    /// Another receiver already serves this transfer id.
    #[error("{0}")]
    Busy(String),
    /// The transfer was cancelled by its owner.
    #[error("transfer cancelled")]
    Cancelled,
}

impl Error {
    /// Stable machine-readable code; `nbdnats/errors.py` maps each to an exception class.
    pub fn code(&self) -> &str {
        match self {
            Error::Usage(_) => "usage",
            Error::Endpoint(_) => "endpoint",
            Error::TargetTooSmall(_) => "target_too_small",
            Error::Nats(_) => "nats",
            Error::Timeout(_) => "timeout",
            Error::Protocol(_) => "protocol",
            Error::Remote { code, .. } => code,
            Error::Integrity(_) => "integrity",
            Error::Busy(_) => "busy",
            Error::Cancelled => "cancelled",
        }
    }

    /// Whether the transfer can go on after this failure with `--resume`: the peer or the
    /// network went away, or the user interrupted it. (Not: bad data, a refused request,
    /// a source or target that failed.)
    pub fn resumable(&self) -> bool {
        matches!(self.code(), "timeout" | "nats" | "cancelled")
    }

    /// Rebuild an error a peer reported with its code, so both ends fail with the same class.
    pub fn from_remote(code: &str, message: &str) -> Error {
        let message = format!("peer: {message}");
        match code {
            "target_too_small" => Error::TargetTooSmall(message),
            "busy" => Error::Busy(message),
            "integrity" => Error::Integrity(message),
            "usage" => Error::Usage(message),
            "endpoint" => Error::Endpoint(message),
            "protocol" => Error::Protocol(message),
            _ => Error::Remote {
                code: code.to_string(),
                message,
            },
        }
    }

    pub fn endpoint_io(what: &str, err: io::Error) -> Error {
        Error::Endpoint(format!("{what}: {err}"))
    }
}
