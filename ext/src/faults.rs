//! Test-only fault injection, the one place it lives.
//!
//! Real NATS drops messages only under conditions a test cannot produce on demand
//! (a slow consumer cut off, a server dying at the right moment), and never corrupts them.
//! To test repair, `NBDNATS_FAULTS` makes the core itself drop or damage what it publishes:
//!
//! ```text
//! NBDNATS_FAULTS="drop_chunk=0.01,corrupt_chunk=0.005,drop_ack=0.05,seed=7"
//! ```
//!
//! `corrupt_content=1` makes a sender put a wrong content digest in its END (the bytes it
//! read and the bytes the receiver accepted then disagree), which no network fault can do:
//! every frame is checksummed.
//!
//! `lie_size=P` makes a sender declare, in a compressed data frame, one byte less than the
//! payload inflates to, with a checksum that is right for the bytes declared: only a
//! receiver that bounds decompression by the declared size refuses it (`compress.rs`).
//!
//! `old_peer=1` makes an end behave like an nbd-nats from before compression: a sender
//! offers no codec, a receiver ignores the offer and replies without the `compress` field
//! (both are within protocol 5, so this is the only way to meet such a peer in a test).
//!
//! Unset (always, outside tests) it costs one branch per published message.

use bytes::{Bytes, BytesMut};

use crate::compress::{Codec, Unpacker};
use crate::frame::{ChunkHeader, HEADER_LEN};

/// The compressed frame `frame`, declaring one byte less than it inflates to, with the
/// checksum of the bytes it declares.
fn lie_about_size(frame: &[u8], header: ChunkHeader, codec: Codec, packed: &[u8]) -> Option<Bytes> {
    let mut plain = vec![0u8; header.length as usize];
    if !Unpacker::new().unpack(codec, packed, &mut plain) {
        return None;
    }
    let short = ChunkHeader {
        length: header.length - 1,
        ..header
    };
    let checksum = short.checksum_over(&plain[..plain.len() - 1]);
    let mut lie = BytesMut::from(frame);
    lie[24..32].copy_from_slice(&short.length.to_le_bytes());
    lie[32..40].copy_from_slice(&checksum.to_le_bytes());
    Some(lie.freeze())
}

#[derive(Debug, Default)]
pub struct Faults {
    drop_chunk: f64,
    corrupt_chunk: f64,
    drop_ack: f64,
    corrupt_content: f64,
    lie_size: f64,
    old_peer: bool,
    state: u64,
}

/// What to do with a chunk frame about to be published.
pub enum ChunkFate {
    Send(Bytes),
    Drop,
}

impl Faults {
    pub fn from_env() -> Option<Faults> {
        let spec = std::env::var("NBDNATS_FAULTS").ok()?;
        let mut f = Faults {
            state: 0x9e37_79b9_7f4a_7c15,
            ..Faults::default()
        };
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=')?;
            match key {
                "drop_chunk" => f.drop_chunk = value.parse().ok()?,
                "corrupt_chunk" => f.corrupt_chunk = value.parse().ok()?,
                "drop_ack" => f.drop_ack = value.parse().ok()?,
                "corrupt_content" => f.corrupt_content = value.parse().ok()?,
                "lie_size" => f.lie_size = value.parse().ok()?,
                "old_peer" => f.old_peer = value == "1",
                "seed" => {
                    f.state ^= value
                        .parse::<u64>()
                        .ok()?
                        .wrapping_mul(0x2545_f491_4f6c_dd1d)
                }
                _ => return None,
            }
        }
        Some(f)
    }

    /// xorshift64*: deterministic for a seed, good enough to pick victims.
    fn roll(&mut self, probability: f64) -> bool {
        if probability <= 0.0 {
            return false;
        }
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        let r = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11;
        (r as f64 / (1u64 << 53) as f64) < probability
    }

    pub fn chunk(&mut self, frame: Bytes) -> ChunkFate {
        if self.roll(self.drop_chunk) {
            return ChunkFate::Drop;
        }
        if self.lie_size > 0.0 {
            if let Ok((header, codec, packed)) = ChunkHeader::parse_packed(&frame) {
                if codec != Codec::None && self.roll(self.lie_size) {
                    if let Some(lie) = lie_about_size(&frame, header, codec, packed) {
                        return ChunkFate::Send(lie);
                    }
                }
            }
        }
        if frame.len() > HEADER_LEN && self.roll(self.corrupt_chunk) {
            let mut damaged = BytesMut::from(&frame[..]);
            let at = HEADER_LEN + (self.state as usize % (frame.len() - HEADER_LEN));
            damaged[at] ^= 0x5a;
            return ChunkFate::Send(damaged.freeze());
        }
        ChunkFate::Send(frame)
    }

    pub fn old_peer(&self) -> bool {
        self.old_peer
    }

    pub fn drop_ack(&mut self) -> bool {
        self.roll(self.drop_ack)
    }

    /// The content digest a sender is about to put in END, possibly damaged.
    pub fn content(&mut self, mut digest: [u8; 16]) -> [u8; 16] {
        if self.roll(self.corrupt_content) {
            digest[0] ^= 0x5a;
        }
        digest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_roughly_honoured() {
        let mut f = Faults {
            drop_ack: 0.1,
            state: 42,
            ..Faults::default()
        };
        let dropped = (0..100_000).filter(|_| f.drop_ack()).count();
        assert!((9_000..11_000).contains(&dropped), "{dropped}");
        let mut none = Faults {
            state: 1,
            ..Faults::default()
        };
        assert!(!(0..1000).any(|_| none.drop_ack()));
    }

    #[test]
    fn corruption_hits_the_payload_only() {
        let mut f = Faults {
            corrupt_chunk: 1.0,
            state: 3,
            ..Faults::default()
        };
        let frame = Bytes::from(vec![0u8; HEADER_LEN + 100]);
        match f.chunk(frame.clone()) {
            ChunkFate::Send(d) => {
                assert_eq!(&d[..HEADER_LEN], &frame[..HEADER_LEN]);
                assert_ne!(d, frame);
            }
            ChunkFate::Drop => panic!("dropped"),
        }
    }
}
