//! The crate's one error type.
//!
//! Every failure carries a stable `code()` (the table below, exported to Python as
//! `_core.ERROR_CODES`, where `nbdnats/errors.py` maps each to an exception class) and a
//! message that says what failed and what to do next.

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
    /// The transfer was cancelled on purpose, for good: neither end keeps anything to
    /// resume it (`Transfer.cancel(resumable=False)`).
    #[error("{0}")]
    Abandoned(String),
    /// A failure the peer reported (with its code), so both ends fail with the same class:
    /// a kind of ours, or `Remote` for a code that stays the peer's.
    #[error("peer: {0}")]
    Peer(Box<Error>),
}

/// The code table: each kind with a message, and its stable code. A peer's failure with a
/// code of the first list is rebuilt as the same kind; one of the second list (or a code of
/// the peer's own) stays `Remote` with the peer's code: the peer has ended already, so it
/// is not answered with an ABORT.
macro_rules! code_table {
    (rebuilt: $($r:ident = $rc:literal),* ; kept: $($k:ident = $kc:literal),* ;) => {
        /// Every code the core reports.
        pub const CODES: &[&str] = &[$($rc,)* $($kc,)* "cancelled"];

        impl Error {
            /// Stable machine-readable code.
            pub fn code(&self) -> &str {
                match self {
                    $(Error::$r(_) => $rc,)*
                    $(Error::$k(_) => $kc,)*
                    Error::Cancelled => "cancelled",
                    Error::Remote { code, .. } => code,
                    Error::Peer(e) => e.code(),
                }
            }

            /// Rebuild an error a peer reported with its code, so both ends fail with the
            /// same class; its message says it is the peer's ("peer: ...").
            pub fn from_remote(code: &str, message: &str) -> Error {
                let message = message.to_string();
                let kind = match code {
                    $($rc => Error::$r(message),)*
                    _ => Error::Remote {
                        code: code.to_string(),
                        message,
                    },
                };
                Error::Peer(Box::new(kind))
            }
        }
    };
}

code_table! {
    rebuilt: Usage = "usage", Endpoint = "endpoint", TargetTooSmall = "target_too_small",
        Protocol = "protocol", Integrity = "integrity", Busy = "busy", Abandoned = "abandoned";
    kept: Nats = "nats", Timeout = "timeout";
}

impl Error {
    /// Whether the transfer can go on after this failure with `--resume`: the peer or the
    /// network went away, or the user interrupted it (a signal, a cancelled task). (Not:
    /// bad data, a refused request, a usage error, a source or target that failed, or a
    /// transfer cancelled for good, `abandoned`.)
    pub fn resumable(&self) -> bool {
        matches!(self.code(), "timeout" | "nats" | "cancelled")
    }

    /// Whether the peer reported this failure (its message then starts "peer: ").
    pub fn from_peer(&self) -> bool {
        matches!(self, Error::Peer(_))
    }

    /// A failure the peer reported under a code that stays its own: the peer has ended
    /// already and need not be told.
    pub fn is_remote(&self) -> bool {
        matches!(self, Error::Peer(e) if matches!(**e, Error::Remote { .. }))
    }

    pub fn endpoint_io(what: &str, err: io::Error) -> Error {
        Error::Endpoint(format!("{what}: {err}"))
    }
}

/// Every async-nats error (publish, subscribe, flush...) is a failure of the NATS link.
impl<K> From<async_nats::error::Error<K>> for Error
where
    K: Clone + std::fmt::Debug + std::fmt::Display + PartialEq,
{
    fn from(e: async_nats::error::Error<K>) -> Error {
        Error::Nats(format!("NATS: {e}"))
    }
}

/// An I/O error with what failed: `result.endpoint("NBD client")?`.
pub trait IoContext<T> {
    fn endpoint(self, what: &str) -> Result<T>;
}

impl<T> IoContext<T> for std::result::Result<T, io::Error> {
    fn endpoint(self, what: &str) -> Result<T> {
        self.map_err(|e| Error::endpoint_io(what, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_a_peer_reports_comes_back_as_its_own() {
        for code in CODES {
            let err = Error::from_remote(code, "it failed");
            assert_eq!(err.code(), *code);
            assert_eq!(err.to_string(), "peer: it failed");
            assert!(err.from_peer());
        }
        let theirs = Error::from_remote("aborted", "gone");
        assert_eq!(theirs.code(), "aborted");
        assert!(theirs.is_remote());
        assert!(!Error::from_remote("busy", "taken").is_remote());
        assert!(Error::from_remote("timeout", "quiet").is_remote());
        assert!(!Error::Timeout("quiet".into()).from_peer());
    }
}
