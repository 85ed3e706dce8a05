//! The open handshake on `data.cmd.<id>.open` (JSON, request/reply), and its validation.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::frame::PROTOCOL_VERSION;
use crate::io::SinkCaps;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct OpenRequest {
    pub v: u8,
    /// A receiver checking whether another receiver already serves this id.
    pub probe: bool,
    pub size: u64,
    pub chunk_size: u64,
    pub window: u64,
    pub max_payload: u64,
    pub checksum: String,
    pub digest: String,
    pub verify: bool,
    /// The sender restarted mid-transfer and asks a running receiver to continue with it.
    pub resume: bool,
    /// A stream of writes (a live producer): frames may address any offset, in sequence
    /// order, rather than cut the disk from start to end. No journal, no verify.
    pub writes: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct OpenReply {
    pub v: u8,
    pub ok: bool,
    pub code: String,
    pub message: String,
    /// Chosen by the receiver; every frame and ack of this transfer carries it.
    pub session: u32,
    pub chunk_size: u64,
    pub window: u64,
    pub max_payload: u64,
    pub target: SinkCaps,
    pub target_size: Option<u64>,
    /// Continue from this frame (it starts at `resume_offset`): everything before it is
    /// already written. 0 for a fresh transfer.
    pub resume_seq: u64,
    pub resume_offset: u64,
}

impl OpenReply {
    pub fn refuse(err: &Error) -> OpenReply {
        OpenReply {
            v: PROTOCOL_VERSION,
            ok: false,
            code: err.code().into(),
            message: err.to_string(),
            ..Default::default()
        }
    }
}

pub fn encode<T: Serialize>(msg: &T) -> bytes::Bytes {
    // Serialising these plain structs cannot fail.
    serde_json::to_vec(msg)
        .map(bytes::Bytes::from)
        .unwrap_or_default()
}

pub fn decode<'a, T: Deserialize<'a>>(what: &str, payload: &'a [u8]) -> Result<T> {
    serde_json::from_slice(payload).map_err(|e| Error::Protocol(format!("malformed {what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_is_a_minimal_request() {
        let req: OpenRequest = decode("open", br#"{"v":1,"probe":true}"#).unwrap();
        assert!(req.probe);
        assert_eq!(req.size, 0);
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        let err = decode::<OpenRequest>("open request", b"\xff{").unwrap_err();
        assert_eq!(err.code(), "protocol");
        assert!(err.to_string().starts_with("malformed open request"));
    }
}
