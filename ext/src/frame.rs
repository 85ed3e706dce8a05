//! Wire format of the block stream (protocol version 5; `docs/protocol.md` is its prose twin).
//!
//! Chunk frames go sender → receiver on `data.blk.<id>.c`, ack frames receiver → sender on
//! `data.blk.<id>.a`. Both start with a fixed little-endian header; the transfer id lives in
//! the subject, never in the frame. Everything decoded here comes from the network, so every
//! length and offset is checked before it is used and nothing panics on bad input.

use bytes::{BufMut, Bytes, BytesMut};

use crate::checksum::frame_checksum;
use crate::compress::Codec;

/// 4: END carries the content digest (`checksum::CONTENT_ALGORITHM`). 5: dirty transfers
/// (frames cover only changed ranges; END carries the bytes the bitmap marked dirty).
/// Compression came later without a new number: it is negotiated (the open's optional
/// `compress`), so a peer that predates it never sees a compressed frame.
pub const PROTOCOL_VERSION: u8 = 5;
pub const CHUNK_MAGIC: [u8; 2] = *b"NF";
pub const ACK_MAGIC: [u8; 2] = *b"NA";
/// Bytes of the chunk header in front of every payload.
pub const HEADER_LEN: usize = 40;
/// Bytes of the header covered by the checksum (everything before the checksum itself,
/// with the session zeroed: the digest of a disk then does not change from one transfer
/// to the next, and a frame with a damaged session is dropped as foreign anyway).
const PROTECTED_LEN: usize = 32;

fn seed_bytes(head: &[u8]) -> [u8; PROTECTED_LEN] {
    let mut seed = [0u8; PROTECTED_LEN];
    seed.copy_from_slice(&head[..PROTECTED_LEN]);
    seed[4..8].fill(0);
    seed
}
pub const ACK_HEADER_LEN: usize = 40;
/// Most missing-frame ranges one ack reports; the rest follow in later acks.
pub const MAX_NACK_RANGES: usize = 64;
/// Largest range one ZERO or TRIM frame may cover.
pub const MAX_ZERO_LEN: u64 = 1 << 30;
/// Length of an END frame's payload: frame digest, frame count, data bytes, zero bytes,
/// content digest, dirty bytes.
pub const END_PAYLOAD_LEN: usize = 16 + 8 * 3 + 16 + 8;
/// Longest text an ABORT or ERROR frame may carry.
pub const MAX_MESSAGE_LEN: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// `length` bytes of data follow the header.
    Data = 1,
    /// The range reads as zeros; no payload. Lands as write-zeroes, a hole, or nothing.
    Zero = 2,
    /// The range may be discarded (contents undefined afterwards); no payload.
    Trim = 3,
    /// No more frames; the payload holds the sender's digest and counters.
    End = 4,
    /// The sender gives up; the payload is a UTF-8 reason.
    Abort = 5,
    /// The sender got DONE; the receiver may stop lingering. No payload.
    Close = 6,
    /// The sender is alive but has nothing to send yet (it re-reads the source to rebuild
    /// the digest of a resumed transfer). No payload.
    Keepalive = 7,
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Data,
            2 => Kind::Zero,
            3 => Kind::Trim,
            4 => Kind::End,
            5 => Kind::Abort,
            6 => Kind::Close,
            7 => Kind::Keepalive,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    pub kind: Kind,
    pub session: u32,
    pub seq: u64,
    pub offset: u64,
    pub length: u64,
    pub checksum: u64,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("bad magic")]
    Magic,
    #[error("protocol version {0} (this build speaks {PROTOCOL_VERSION})")]
    Version(u8),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("payload of {got} bytes where the header says {want}")]
    PayloadLength { got: usize, want: u64 },
    #[error("checksum mismatch")]
    Checksum,
    #[error("malformed {0} payload")]
    Payload(&'static str),
    #[error("a frame compressed with {0} where none was expected")]
    Packed(&'static str),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl ChunkHeader {
    fn write_protected(&self, out: &mut [u8]) {
        out[0..2].copy_from_slice(&CHUNK_MAGIC);
        out[2] = PROTOCOL_VERSION;
        out[3] = self.kind as u8;
        out[4..8].copy_from_slice(&self.session.to_le_bytes());
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..24].copy_from_slice(&self.offset.to_le_bytes());
        out[24..32].copy_from_slice(&self.length.to_le_bytes());
    }

    /// Seal a frame whose payload already sits at `buf[HEADER_LEN..]` (the sender reads
    /// source data straight there), writing header and checksum in place: no copy.
    /// Returns the checksum.
    pub fn seal(mut self, buf: &mut [u8]) -> u64 {
        let (head, payload) = buf.split_at_mut(HEADER_LEN);
        self.write_protected(head);
        self.checksum = frame_checksum(&seed_bytes(head), payload);
        head[32..40].copy_from_slice(&self.checksum.to_le_bytes());
        self.checksum
    }

    /// The checksum this header would carry over `payload` (used to verify a re-read target).
    pub fn checksum_over(&self, payload: &[u8]) -> u64 {
        let mut head = [0u8; PROTECTED_LEN];
        self.write_protected(&mut head);
        frame_checksum(&seed_bytes(&head), payload)
    }

    /// Build a frame with a small payload (ZERO, TRIM, END, ABORT).
    pub fn encode(self, payload: &[u8]) -> (Bytes, u64) {
        let mut buf = BytesMut::zeroed(HEADER_LEN + payload.len());
        buf[HEADER_LEN..].copy_from_slice(payload);
        let sum = self.seal(&mut buf);
        (buf.freeze(), sum)
    }

    /// Parse and verify a chunk frame. The payload is returned as a view of `frame`.
    pub fn decode(frame: &[u8]) -> Result<(ChunkHeader, &[u8]), FrameError> {
        let (header, payload) = ChunkHeader::parse(frame)?;
        if !header.verify(payload) {
            return Err(FrameError::Checksum);
        }
        Ok((header, payload))
    }

    /// True when `payload` matches this header's checksum.
    pub fn verify(&self, payload: &[u8]) -> bool {
        self.checksum_over(payload) == self.checksum
    }

    /// Parse a chunk frame's structure without checking its checksum, so a receiver can
    /// tell which frame was damaged (and ask for it again) when only the data is corrupt.
    /// A compressed frame is refused here: only `parse_packed` hands out its payload.
    pub fn parse(frame: &[u8]) -> Result<(ChunkHeader, &[u8]), FrameError> {
        match ChunkHeader::parse_packed(frame)? {
            (header, Codec::None, payload) => Ok((header, payload)),
            (_, codec, _) => Err(FrameError::Packed(codec.name())),
        }
    }

    /// `parse`, also for a compressed data frame: its codec and compressed payload, which
    /// must be shorter than the plain length the header declares (it is sent compressed only
    /// when that saves). The checksum covers the plain payload, once inflated.
    pub fn parse_packed(frame: &[u8]) -> Result<(ChunkHeader, Codec, &[u8]), FrameError> {
        if frame.len() < HEADER_LEN {
            return Err(FrameError::Short(frame.len()));
        }
        if frame[0..2] != CHUNK_MAGIC {
            return Err(FrameError::Magic);
        }
        if frame[2] != PROTOCOL_VERSION {
            return Err(FrameError::Version(frame[2]));
        }
        let kind = Kind::from_u8(frame[3] & KIND_MASK).ok_or(FrameError::Kind(frame[3]))?;
        let codec = Codec::from_bits(frame[3] >> CODEC_SHIFT).ok_or(FrameError::Kind(frame[3]))?;
        if codec != Codec::None && kind != Kind::Data {
            return Err(FrameError::Kind(frame[3]));
        }
        let header = ChunkHeader {
            kind,
            session: u32_at(frame, 4),
            seq: u64_at(frame, 8),
            offset: u64_at(frame, 16),
            length: u64_at(frame, 24),
            checksum: u64_at(frame, 32),
        };
        let payload = &frame[HEADER_LEN..];
        let expected_payload = match kind {
            Kind::Data if codec != Codec::None => {
                if payload.is_empty() || payload.len() as u64 >= header.length {
                    return Err(FrameError::PayloadLength {
                        got: payload.len(),
                        want: header.length,
                    });
                }
                None
            }
            Kind::Data => Some(header.length),
            Kind::Zero | Kind::Trim | Kind::Close | Kind::Keepalive => Some(0),
            Kind::End => Some(END_PAYLOAD_LEN as u64),
            Kind::Abort => None,
        };
        if let Some(want) = expected_payload {
            if payload.len() as u64 != want {
                return Err(FrameError::PayloadLength {
                    got: payload.len(),
                    want,
                });
            }
        } else if kind == Kind::Abort && payload.len() > MAX_MESSAGE_LEN {
            return Err(FrameError::Payload("abort"));
        }
        Ok((header, codec, payload))
    }
}

/// The kind byte's low bits name the kind; its two high bits the codec of a compressed
/// data frame (`compress::Codec`; 0: not compressed). The checksum never covers them, so a
/// frame's checksum, and every digest, is the same compressed or not.
const KIND_MASK: u8 = 0x3f;
const CODEC_SHIFT: u8 = 6;

/// Mark a sealed data frame (header and compressed payload) as compressed with `codec`.
pub fn set_codec(frame: &mut [u8], codec: Codec) {
    frame[3] = (frame[3] & KIND_MASK) | ((codec as u8) << CODEC_SHIFT);
}

/// What an END frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndSummary {
    /// The frame digest (`checksum::Digest`).
    pub digest: [u8; 16],
    pub frames: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    /// The content digest of the bytes the sender read (`checksum::ContentDigest`); zeros
    /// from a stream of writes, which has none.
    pub content: [u8; 16],
    /// Bytes the source's dirty bitmap marked changed (0 unless a dirty transfer).
    pub dirty_bytes: u64,
}

impl EndSummary {
    pub fn encode(&self) -> [u8; END_PAYLOAD_LEN] {
        let mut out = [0u8; END_PAYLOAD_LEN];
        out[..16].copy_from_slice(&self.digest);
        out[16..24].copy_from_slice(&self.frames.to_le_bytes());
        out[24..32].copy_from_slice(&self.data_bytes.to_le_bytes());
        out[32..40].copy_from_slice(&self.zero_bytes.to_le_bytes());
        out[40..56].copy_from_slice(&self.content);
        out[56..64].copy_from_slice(&self.dirty_bytes.to_le_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Result<EndSummary, FrameError> {
        if b.len() != END_PAYLOAD_LEN {
            return Err(FrameError::Payload("end"));
        }
        let mut digest = [0u8; 16];
        digest.copy_from_slice(&b[..16]);
        let mut content = [0u8; 16];
        content.copy_from_slice(&b[40..56]);
        Ok(EndSummary {
            digest,
            frames: u64_at(b, 16),
            data_bytes: u64_at(b, 24),
            zero_bytes: u64_at(b, 32),
            content,
            dirty_bytes: u64_at(b, 56),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum AckKind {
    /// Progress: every frame below `next_seq` is written to the target; the payload lists
    /// ranges of missing frames below `received` (a selective NACK), possibly none.
    Ack = 1,
    /// Every frame including END is written and flushed; payload: digest and verify flag.
    Done = 2,
    /// The receiver gives up; payload: code and message.
    Error = 3,
}

/// Receiver → sender. Acks are cumulative, so a lost ack is repaired by the next one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub kind: AckKind,
    pub session: u32,
    /// All frames with a smaller sequence number are written to the target.
    pub next_seq: u64,
    /// One past the highest frame the receiver holds: frames below it that it lacks are
    /// listed as missing; frames from it on may still be in flight.
    pub received: u64,
    /// Bytes of the disk those frames cover.
    pub written: u64,
    /// Bytes the sender may have outstanding beyond `next_seq` from now on.
    pub window: u64,
    pub body: AckBody,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AckBody {
    None,
    /// Missing frames as `(first, count)` ranges, at most `MAX_NACK_RANGES`.
    Missing(Vec<(u64, u32)>),
    Done {
        digest: [u8; 16],
        verified: bool,
    },
    Error {
        code: String,
        message: String,
    },
}

impl Ack {
    pub fn encode(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(ACK_HEADER_LEN + 32);
        buf.put_slice(&ACK_MAGIC);
        buf.put_u8(PROTOCOL_VERSION);
        buf.put_u8(self.kind as u8);
        buf.put_u32_le(self.session);
        buf.put_u64_le(self.next_seq);
        buf.put_u64_le(self.received);
        buf.put_u64_le(self.written);
        buf.put_u64_le(self.window);
        match &self.body {
            AckBody::None => {}
            AckBody::Missing(ranges) => {
                for (first, count) in ranges.iter().take(MAX_NACK_RANGES) {
                    buf.put_u64_le(*first);
                    buf.put_u32_le(*count);
                }
            }
            AckBody::Done { digest, verified } => {
                buf.put_slice(digest);
                buf.put_u8(u8::from(*verified));
            }
            AckBody::Error { code, message } => put_failure(&mut buf, code, message),
        }
        buf.freeze()
    }

    pub fn decode(b: &[u8]) -> Result<Ack, FrameError> {
        if b.len() < ACK_HEADER_LEN {
            return Err(FrameError::Short(b.len()));
        }
        if b[0..2] != ACK_MAGIC {
            return Err(FrameError::Magic);
        }
        if b[2] != PROTOCOL_VERSION {
            return Err(FrameError::Version(b[2]));
        }
        let payload = &b[ACK_HEADER_LEN..];
        let (kind, body) = match b[3] {
            1 if payload.is_empty() => (AckKind::Ack, AckBody::None),
            1 => {
                if payload.len() % 12 != 0 || payload.len() / 12 > MAX_NACK_RANGES {
                    return Err(FrameError::Payload("ack"));
                }
                let ranges = payload
                    .chunks_exact(12)
                    .map(|r| (u64_at(r, 0), u32_at(r, 8)))
                    .collect();
                (AckKind::Ack, AckBody::Missing(ranges))
            }
            2 => {
                if payload.len() != 17 {
                    return Err(FrameError::Payload("done"));
                }
                let mut digest = [0u8; 16];
                digest.copy_from_slice(&payload[..16]);
                (
                    AckKind::Done,
                    AckBody::Done {
                        digest,
                        verified: payload[16] != 0,
                    },
                )
            }
            3 => {
                let (code, message) = failure(payload)?;
                (AckKind::Error, AckBody::Error { code, message })
            }
            other => return Err(FrameError::Kind(other)),
        };
        Ok(Ack {
            kind,
            session: u32_at(b, 4),
            next_seq: u64_at(b, 8),
            received: u64_at(b, 16),
            written: u64_at(b, 24),
            window: u64_at(b, 32),
            body,
        })
    }
}

/// Cut a string to at most `max` bytes on a character boundary.
/// A failure as it travels (an ERROR ack's body, an ABORT frame's payload): the code's
/// length (one byte), the code (an error code of `nbdnats/errors.py`), the message.
pub fn put_failure(buf: &mut BytesMut, code: &str, message: &str) {
    let code = truncate(code, 255);
    buf.put_u8(code.len() as u8);
    buf.put_slice(code.as_bytes());
    buf.put_slice(truncate(message, MAX_MESSAGE_LEN).as_bytes());
}

/// The code and message of a failure (`put_failure`).
pub fn failure(payload: &[u8]) -> Result<(String, String), FrameError> {
    let code_len = *payload.first().ok_or(FrameError::Payload("error"))? as usize;
    let code = payload
        .get(1..1 + code_len)
        .ok_or(FrameError::Payload("error"))?;
    let message = &payload[1 + code_len..];
    Ok((
        String::from_utf8_lossy(code).into_owned(),
        String::from_utf8_lossy(message).into_owned(),
    ))
}

pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
impl ChunkHeader {
    /// A header of session 7, frame 3, at offset 4096: for tests.
    pub(crate) fn sample(kind: Kind, length: u64) -> ChunkHeader {
        ChunkHeader {
            kind,
            session: 7,
            seq: 3,
            offset: 4096,
            length,
            checksum: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(kind: Kind, length: u64) -> ChunkHeader {
        ChunkHeader::sample(kind, length)
    }

    #[test]
    fn data_frame_round_trip_in_place() {
        let payload = b"hello block world";
        let mut buf = vec![0u8; HEADER_LEN + payload.len()];
        buf[HEADER_LEN..].copy_from_slice(payload);
        let sum = header(Kind::Data, payload.len() as u64).seal(&mut buf);
        let (h, p) = ChunkHeader::decode(&buf).unwrap();
        assert_eq!(p, payload);
        assert_eq!(h.checksum, sum);
        assert_eq!(
            (h.kind, h.session, h.seq, h.offset),
            (Kind::Data, 7, 3, 4096)
        );
    }

    #[test]
    fn any_flipped_bit_is_rejected() {
        let (frame, _) = header(Kind::Zero, 1 << 20).encode(&[]);
        // Bytes 4..8 are the session: a changed session decodes as another transfer's frame.
        for byte in (0..4).chain(8..frame.len()) {
            let mut bad = frame.to_vec();
            bad[byte] ^= 0x10;
            assert!(
                ChunkHeader::decode(&bad).is_err(),
                "flip in byte {byte} accepted"
            );
        }
    }

    #[test]
    fn checksum_does_not_depend_on_the_session() {
        let a = header(Kind::Zero, 4096);
        let b = ChunkHeader { session: 99, ..a };
        assert_eq!(a.encode(&[]).1, b.encode(&[]).1);
        assert_ne!(a.encode(&[]).1, ChunkHeader { seq: 4, ..a }.encode(&[]).1);
    }

    #[test]
    fn payload_length_must_match_header() {
        let mut buf = vec![0u8; HEADER_LEN + 10];
        header(Kind::Data, 11).seal(&mut buf);
        assert_eq!(
            ChunkHeader::decode(&buf),
            Err(FrameError::PayloadLength { got: 10, want: 11 })
        );
        let (zero_with_payload, _) = header(Kind::Zero, 4096).encode(b"x");
        assert!(matches!(
            ChunkHeader::decode(&zero_with_payload),
            Err(FrameError::PayloadLength { .. })
        ));
    }

    #[test]
    fn wrong_version_and_kind() {
        let (frame, _) = header(Kind::Zero, 1).encode(&[]);
        let mut v = frame.to_vec();
        v[2] = 9;
        assert_eq!(ChunkHeader::decode(&v), Err(FrameError::Version(9)));
        let mut k = frame.to_vec();
        k[3] = 77;
        assert_eq!(ChunkHeader::decode(&k), Err(FrameError::Kind(77)));
        assert_eq!(
            ChunkHeader::decode(&frame[..10]),
            Err(FrameError::Short(10))
        );
    }

    #[test]
    fn compressed_frames_parse_only_as_packed_data() {
        let mut buf = vec![0u8; HEADER_LEN + 10];
        header(Kind::Data, 100).seal(&mut buf);
        set_codec(&mut buf, Codec::Zstd);
        let (h, codec, payload) = ChunkHeader::parse_packed(&buf).unwrap();
        assert_eq!((h.length, codec, payload.len()), (100, Codec::Zstd, 10));
        assert_eq!(ChunkHeader::parse(&buf), Err(FrameError::Packed("zstd")));
        // As long as (or longer than) the plain length: never worth compressing, malformed.
        let mut long = vec![0u8; HEADER_LEN + 100];
        header(Kind::Data, 100).seal(&mut long);
        set_codec(&mut long, Codec::Lz4);
        assert!(ChunkHeader::parse_packed(&long).is_err());
        // Only data is compressed; the reserved codec is nothing.
        let mut zero = header(Kind::Zero, 4096).encode(&[]).0.to_vec();
        set_codec(&mut zero, Codec::Lz4);
        assert!(ChunkHeader::parse_packed(&zero).is_err());
        buf[3] = (Kind::Data as u8) | 0xc0;
        assert!(ChunkHeader::parse_packed(&buf).is_err());
    }

    #[test]
    fn end_summary_round_trip() {
        let s = EndSummary {
            digest: [9; 16],
            frames: 5,
            data_bytes: 6,
            zero_bytes: 7,
            content: [3; 16],
            dirty_bytes: 8,
        };
        let (frame, _) = header(Kind::End, 0).encode(&s.encode());
        let (h, p) = ChunkHeader::decode(&frame).unwrap();
        assert_eq!(h.kind, Kind::End);
        assert_eq!(EndSummary::decode(p).unwrap(), s);
    }

    #[test]
    fn ack_round_trips() {
        for body in [
            AckBody::None,
            AckBody::Missing(vec![(3, 2), (9, 1)]),
            AckBody::Done {
                digest: [1; 16],
                verified: true,
            },
            AckBody::Error {
                code: "endpoint".into(),
                message: "disk full".into(),
            },
        ] {
            let kind = match body {
                AckBody::None | AckBody::Missing(_) => AckKind::Ack,
                AckBody::Done { .. } => AckKind::Done,
                AckBody::Error { .. } => AckKind::Error,
            };
            let ack = Ack {
                kind,
                session: 1,
                next_seq: 2,
                received: 5,
                written: 3,
                window: 4,
                body,
            };
            assert_eq!(Ack::decode(&ack.encode()).unwrap(), ack);
        }
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = ChunkHeader::decode(&bytes);
            let _ = Ack::decode(&bytes);
        }
    }
}
