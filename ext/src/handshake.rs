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
    /// The content digest END carries (`checksum::CONTENT_ALGORITHM`).
    pub content: String,
    pub verify: bool,
    /// The sender restarted mid-transfer and asks a running receiver to continue with it.
    pub resume: bool,
    /// A stream of writes (a live producer): frames may address any offset, in sequence
    /// order, rather than cut the disk from start to end. No journal, no verify.
    pub writes: bool,
    /// A dirty transfer (protocol 5): frames cover only the ranges a dirty bitmap marks
    /// changed, in increasing offset order with gaps; the receiver leaves every byte between
    /// them as it is, so its target must already hold the previous image (or a base is
    /// merged into a stream). No journal, no verify.
    pub dirty: bool,
    /// The sender's key (`SenderKey::anchor`). The receiver binds the transfer to it: a
    /// repeated open with the same key gets the same answer (an open whose reply was lost),
    /// an open with another key is refused while the transfer runs.
    pub key: String,
    /// Codecs the sender can compress data frames with, preferred first (`compress::Codec`
    /// names); empty: none. Added within protocol 5: a receiver that does not know the
    /// field ignores it and replies without `compress`, which means no compression.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub compress: Vec<String>,
    /// The sender asks to stripe the transfer over this many sub-streams (`--streams`).
    /// Added within protocol 5: a receiver that does not know the field ignores it and
    /// replies without `stripes`, and the transfer runs as one stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stripes: Option<Stripes>,
}

/// How a striped transfer is cut (`stripe::Geometry` holds the arithmetic): `count`
/// sub-streams, stripe `k` carrying the `size`-byte segments `i` of the disk with
/// `i % count == k`. Each sub-stream is a transfer of its own (`stripe::child_id`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stripes {
    pub count: u32,
    pub size: u64,
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
    /// The codec the receiver picked from the request's `compress` ("": none). Absent in
    /// an older receiver's reply, so none (and left out when none, as such a reply does).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub compress: String,
    /// The request's `stripes`, when the receiver runs the transfer striped: the data then
    /// flows in the sub-streams, none on this transfer's own subjects. Absent: one stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stripes: Option<Stripes>,
}

/// Reply code of a receiver that is still checking its target before it continues a
/// transfer: the sender keeps asking (the check shows the receiver is alive).
pub const CHECKING: &str = "checking";

/// How many times one transfer can be resumed by its sender (the length of its key chain).
const CHAIN: u32 = 4096;
/// How many links of the chain a resume may skip (keys a crashed sender used up without
/// the receiver ever seeing them).
const MAX_SKIP: u32 = 256;

/// A sender's keys: a hash chain `K_i = sha256^(CHAIN - i)(seed)`. The first open carries
/// `K_0` (the anchor); the i-th resume reveals `K_i`, which the receiver checks by hashing
/// it back to the anchor it holds, then keeps as its new anchor. A key seen on the wire
/// thus opens nothing any more, yet a sender that crashed mid-resume can still go on.
#[derive(Clone)]
pub struct SenderKey {
    seed: [u8; 32],
    used: u32,
}

impl SenderKey {
    pub fn new() -> Result<SenderKey> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| Error::Endpoint(format!("no randomness: {e}")))?;
        Ok(SenderKey { seed, used: 0 })
    }

    fn link(&self, i: u32) -> [u8; 32] {
        let mut k = self.seed;
        for _ in 0..CHAIN - i {
            k = sha256(&k);
        }
        k
    }

    /// What the first open carries: the key the receiver binds the transfer to.
    pub fn anchor(&self) -> String {
        hex(&self.link(0))
    }

    /// The next key to reveal on a resume (it counts as used from now on).
    pub fn advance(&mut self) -> Result<String> {
        if self.used + 1 >= CHAIN {
            return Err(Error::Usage(format!(
                "this transfer was resumed {CHAIN} times; start it over"
            )));
        }
        self.used += 1;
        Ok(hex(&self.link(self.used)))
    }

    /// Keep the key where a later `send --resume` finds it (readable by its owner only),
    /// replacing any earlier one atomically.
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let io = |e: std::io::Error| Error::Endpoint(format!("sender key {}: {e}", path.display()));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let staged = path.with_extension("key.new");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&staged)
            .map_err(io)?;
        writeln!(f, "{} {}", hex(&self.seed), self.used).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&staged, path).map_err(io)
    }

    /// The key an earlier sender of the same transfer saved.
    pub fn load(path: &std::path::Path, id: &str) -> Result<SenderKey> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Usage(format!(
                "cannot resume transfer {id}: no key of its sender at {} ({e}); only the sender \
                 that started a transfer (with the same --state-dir) can continue it",
                path.display()
            ))
        })?;
        let damaged = || {
            Error::Usage(format!(
                "the sender key at {} is damaged; start the transfer over",
                path.display()
            ))
        };
        let mut parts = text.split_whitespace();
        let seed = parts.next().and_then(unhex).ok_or_else(damaged)?;
        let used = parts
            .next()
            .and_then(|u| u.parse::<u32>().ok())
            .filter(|u| *u < CHAIN)
            .ok_or_else(damaged)?;
        Ok(SenderKey { seed, used })
    }
}

/// Where a sender keeps its key for transfer `id`.
pub fn key_path(state_dir: &std::path::Path, id: &str) -> std::path::PathBuf {
    state_dir.join("journals").join(format!("send-{id}.key"))
}

/// Beside a striped transfer's key (`key_path`): how many sub-streams it was started as,
/// so that a resume asks for as many (`striped::send`).
pub fn streams_record(key: &std::path::Path) -> std::path::PathBuf {
    key.with_extension("streams")
}

/// Whether `key` (revealed by a resuming sender) hashes back to `anchor` within a few
/// links: it is the next key of the chain the transfer is bound to. `key == anchor` is
/// not a match: that key was already seen.
pub fn key_follows(key: &str, anchor: &str) -> bool {
    let (Some(mut k), Some(anchor)) = (unhex(key), unhex(anchor)) else {
        return false;
    };
    for _ in 0..MAX_SKIP {
        k = sha256(&k);
        if k == anchor {
            return true;
        }
    }
    false
}

/// A key in the form the wire carries it: 64 hex digits.
pub fn is_key(s: &str) -> bool {
    unhex(s).is_some()
}

fn sha256(data: &[u8; 32]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The one line for a peer of another protocol version (an open request, reply or frame).
pub fn other_version(peer: u8) -> Error {
    Error::Protocol(format!(
        "the peer speaks nbdnats protocol {peer}, this one {PROTOCOL_VERSION}: run the same \
         nbd-nats version on both ends"
    ))
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
    fn each_resume_key_opens_once_and_only_after_its_anchor() {
        let mut k = SenderKey::new().unwrap();
        let other = SenderKey::new().unwrap();
        let anchor = k.anchor();
        let first = k.advance().unwrap();
        assert!(key_follows(&first, &anchor));
        assert!(
            !key_follows(&anchor, &anchor),
            "a key seen on the wire opens nothing"
        );
        assert!(!key_follows(&first, &first));
        assert!(!key_follows(&other.anchor(), &anchor));
        assert!(!key_follows("-x", &anchor) && !is_key("zz"));
        // Keys a crashed sender used up without the receiver seeing them are skipped.
        let skipped = (0..5).map(|_| k.advance().unwrap()).last().unwrap();
        assert!(key_follows(&skipped, &first));
        assert!(!key_follows(&first, &skipped), "never backwards");
    }

    #[test]
    fn a_saved_key_continues_where_it_left_off() {
        let path = std::env::temp_dir().join(format!("nbdnats-key-{}", std::process::id()));
        let mut k = SenderKey::new().unwrap();
        let anchor = k.anchor();
        k.advance().unwrap();
        k.save(&path).unwrap();
        let mut again = SenderKey::load(&path, "t").unwrap();
        assert_eq!(again.anchor(), anchor);
        assert_eq!(again.advance().unwrap(), k.advance().unwrap());
        std::fs::write(&path, "nonsense").unwrap();
        assert!(SenderKey::load(&path, "t").is_err());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        let err = decode::<OpenRequest>("open request", b"\xff{").unwrap_err();
        assert_eq!(err.code(), "protocol");
        assert!(err.to_string().starts_with("malformed open request"));
    }
}
