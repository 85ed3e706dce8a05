//! Adaptive compression of data frames (docs/protocol.md, "Compression").
//!
//! The sender offers codecs in the open request, the receiver picks the first it can
//! decompress (`OpenReply::compress`; a receiver that does not know the field picks none).
//! A data frame goes out compressed only when that saves at least a tenth of its payload;
//! two bits of its kind byte name the codec, its header still carries the plain length, and
//! its checksum covers the plain bytes, so digests do not change with compression.
//! The receiver inflates a frame into a buffer of exactly the declared length: a frame that
//! would inflate beyond it, or does not inflate, is damaged (counted and sent again).

use crate::error::{Error, Result};
use crate::frame::HEADER_LEN;

/// zstd's level for `zstd` and `auto` (bench/README.md, "Compression"): its fastest
/// positive level; higher ones cost the sender CPU for little more on disk images.
const ZSTD_LEVEL: i32 = 1;
/// Consecutive frames that did not compress before the sender starts skipping frames.
const BACKOFF_AFTER: u32 = 8;
/// The most frames sent without trying, once data keeps not compressing: on random data
/// the sender then tries one frame in this many (its CPU stays near `off`'s), and a
/// compressible stretch is found again within this many frames.
const MAX_SKIP: u32 = 64;

/// A codec as the kind byte of a frame names it (its two high bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum Codec {
    #[default]
    None = 0,
    Lz4 = 1,
    Zstd = 2,
}

/// Every codec this build can compress and decompress, in the order a receiver prefers.
pub const CODECS: [Codec; 2] = [Codec::Zstd, Codec::Lz4];

impl Codec {
    /// The codec named by a kind byte's high bits; `None` for the reserved value.
    pub fn from_bits(bits: u8) -> Option<Codec> {
        Some(match bits {
            0 => Codec::None,
            1 => Codec::Lz4,
            2 => Codec::Zstd,
            _ => return None,
        })
    }

    /// The name the handshake and the command line use ("" for none).
    pub fn name(self) -> &'static str {
        match self {
            Codec::None => "",
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
        }
    }

    pub fn from_name(name: &str) -> Option<Codec> {
        CODECS.into_iter().find(|c| c.name() == name)
    }
}

/// What the user asked for (`--compress`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Off,
    /// This codec or fail: a receiver that cannot decompress it is an error.
    Only(Codec),
    /// Whatever the receiver can do, else nothing.
    Auto,
}

/// `auto` on incompressible data costs the sender less than a tenth more CPU than `off`
/// (the back-off), and on disk images zstd's fastest level halves the bytes on the wire
/// where lz4 saves less for about the same CPU per byte saved (bench/README.md).
pub const DEFAULT_MODE: &str = "off";

impl Mode {
    pub fn parse(text: &str) -> Result<Mode> {
        match text {
            "off" => Ok(Mode::Off),
            "auto" => Ok(Mode::Auto),
            other => Codec::from_name(other).map(Mode::Only).ok_or_else(|| {
                Error::Usage(format!(
                    "unknown --compress {other:?}: use off, zstd, lz4 or auto"
                ))
            }),
        }
    }

    /// The codecs the open request offers, preferred first.
    pub fn offer(self) -> Vec<String> {
        match self {
            Mode::Off => Vec::new(),
            Mode::Only(c) => vec![c.name().into()],
            Mode::Auto => CODECS.iter().map(|c| c.name().into()).collect(),
        }
    }

    /// The codec the transfer uses, given what the receiver picked ("" or an absent field:
    /// none). An explicit codec the receiver cannot do is an error that says what to do.
    pub fn settle(self, picked: &str, id: &str) -> Result<Codec> {
        let codec = match Codec::from_name(picked) {
            Some(c) if self.offer().iter().any(|o| o == picked) => c,
            None if picked.is_empty() => Codec::None,
            _ => {
                return Err(Error::Protocol(format!(
                    "the receiver of transfer {id} picked compression {picked:?}, which was not offered"
                )))
            }
        };
        match (self, codec) {
            (Mode::Only(want), Codec::None) => Err(Error::Usage(format!(
                "the receiver of transfer {id} cannot decompress {} (an older nbd-nats): \
                 use --compress auto or off, or upgrade nbd-nats on the receiving host",
                want.name()
            ))),
            _ => Ok(codec),
        }
    }
}

/// The receiver's pick: the first offered codec it knows.
pub fn pick(offered: &[String]) -> Codec {
    offered
        .iter()
        .find_map(|o| Codec::from_name(o))
        .unwrap_or(Codec::None)
}

/// The sender's side: one compression context, and the back-off that keeps incompressible
/// data cheap.
pub struct Packer {
    codec: Codec,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    /// lz4's output buffer, reused.
    scratch: Vec<u8>,
    misses: u32,
    skip: u32,
    until_try: u32,
}

impl Packer {
    pub fn new(codec: Codec) -> Result<Packer> {
        let zstd = match codec {
            Codec::Zstd => Some(
                zstd::bulk::Compressor::new(ZSTD_LEVEL)
                    .map_err(|e| Error::Endpoint(format!("zstd: {e}")))?,
            ),
            _ => None,
        };
        Ok(Packer {
            codec,
            zstd,
            scratch: Vec::new(),
            misses: 0,
            skip: 1,
            until_try: 0,
        })
    }

    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Whether this frame is worth a try (the back-off); counts it either way.
    fn due(&mut self) -> bool {
        if self.until_try > 0 {
            self.until_try -= 1;
            return false;
        }
        true
    }

    fn outcome(&mut self, saved: bool) {
        if saved {
            self.misses = 0;
            self.skip = 1;
        } else {
            self.misses += 1;
            if self.misses >= BACKOFF_AFTER {
                self.skip = (self.skip * 2).min(MAX_SKIP);
            }
        }
        self.until_try = if self.misses >= BACKOFF_AFTER {
            self.skip - 1
        } else {
            0
        };
    }

    /// The compressed twin of a sealed data frame (`frame`: header and plain payload),
    /// or `None` when it is not worth it: compression saved less than a tenth, or the
    /// back-off skips this frame.
    pub fn pack(&mut self, frame: &[u8]) -> Option<Vec<u8>> {
        if self.codec == Codec::None || frame.len() <= HEADER_LEN || !self.due() {
            return None;
        }
        let plain = &frame[HEADER_LEN..];
        // Room for at most 90% of the payload: a codec that needs more gives up early.
        let room = plain.len() - plain.len().div_ceil(10);
        let mut out = vec![0u8; HEADER_LEN + room];
        let n = match (self.codec, self.zstd.as_mut()) {
            (Codec::Zstd, Some(z)) => z.compress_to_buffer(plain, &mut out[HEADER_LEN..]).ok(),
            (Codec::Lz4, _) => {
                // lz4_flex wants room for the worst case: compress into a kept scratch
                // buffer, then take the result if it fits.
                let worst = lz4_flex::block::get_maximum_output_size(plain.len());
                if self.scratch.len() < worst {
                    self.scratch.resize(worst, 0);
                }
                let n = lz4_flex::block::compress_into(plain, &mut self.scratch).ok();
                n.filter(|&n| n <= room).inspect(|&n| {
                    out[HEADER_LEN..HEADER_LEN + n].copy_from_slice(&self.scratch[..n]);
                })
            }
            _ => None,
        };
        let n = n.filter(|&n| n > 0 && n <= room);
        self.outcome(n.is_some());
        let n = n?;
        out.truncate(HEADER_LEN + n);
        out[..HEADER_LEN].copy_from_slice(&frame[..HEADER_LEN]);
        crate::frame::set_codec(&mut out, self.codec);
        Some(out)
    }
}

/// The receiver's side: inflate `packed` into `out`, which is exactly as long as the
/// header declares. Anything else (corrupt input, more or fewer bytes) is an error.
pub struct Unpacker {
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl Unpacker {
    pub fn new() -> Unpacker {
        Unpacker { zstd: None }
    }

    pub fn unpack(&mut self, codec: Codec, packed: &[u8], out: &mut [u8]) -> bool {
        let n = match codec {
            Codec::None => return false,
            Codec::Lz4 => lz4_flex::block::decompress_into(packed, out).ok(),
            Codec::Zstd => {
                if self.zstd.is_none() {
                    self.zstd = zstd::bulk::Decompressor::new().ok();
                }
                self.zstd
                    .as_mut()
                    .and_then(|z| z.decompress_to_buffer(packed, out).ok())
            }
        };
        n == Some(out.len())
    }
}

impl Default for Unpacker {
    fn default() -> Self {
        Unpacker::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{ChunkHeader, Kind};

    fn sealed(payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; HEADER_LEN + payload.len()];
        buf[HEADER_LEN..].copy_from_slice(payload);
        ChunkHeader::sample(Kind::Data, payload.len() as u64).seal(&mut buf);
        buf
    }

    fn text(n: usize) -> Vec<u8> {
        b"block devices over nats, compressed when it pays. "
            .iter()
            .cycle()
            .take(n)
            .copied()
            .collect()
    }

    fn random(n: usize, mut s: u64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect()
    }

    #[test]
    fn each_codec_round_trips_and_keeps_the_plain_checksum() {
        for codec in CODECS {
            let frame = sealed(&text(1 << 20));
            let packed = Packer::new(codec).unwrap().pack(&frame).unwrap();
            assert!(
                packed.len() < frame.len() / 10,
                "{codec:?}: {}",
                packed.len()
            );
            let (header, got, body) = ChunkHeader::parse_packed(&packed).unwrap();
            assert_eq!(got, codec);
            let mut out = vec![0u8; header.length as usize];
            assert!(Unpacker::new().unpack(codec, body, &mut out));
            assert_eq!(out, frame[HEADER_LEN..]);
            assert!(header.verify(&out), "the checksum covers the plain bytes");
        }
    }

    #[test]
    fn a_frame_that_saves_less_than_a_tenth_goes_plain() {
        let mut data = random(1 << 16, 5);
        // About 8% of it compressible: not enough.
        data[..5000].fill(b'a');
        for codec in CODECS {
            assert!(Packer::new(codec).unwrap().pack(&sealed(&data)).is_none());
        }
        // About a fifth: enough.
        data[..13_000].fill(b'a');
        for codec in CODECS {
            assert!(Packer::new(codec).unwrap().pack(&sealed(&data)).is_some());
        }
    }

    #[test]
    fn inflating_beyond_the_declared_length_is_refused() {
        for codec in CODECS {
            let frame = sealed(&text(1 << 16));
            let packed = Packer::new(codec).unwrap().pack(&frame).unwrap();
            let (_, _, body) = ChunkHeader::parse_packed(&packed).unwrap();
            let mut short = vec![0u8; (1 << 16) - 1];
            assert!(
                !Unpacker::new().unpack(codec, body, &mut short),
                "{codec:?}"
            );
            let mut long = vec![0u8; (1 << 16) + 1];
            assert!(!Unpacker::new().unpack(codec, body, &mut long), "{codec:?}");
        }
    }

    #[test]
    fn a_corrupt_payload_is_refused_or_fails_its_checksum() {
        for codec in CODECS {
            let frame = sealed(&text(1 << 16));
            let packed = Packer::new(codec).unwrap().pack(&frame).unwrap();
            for at in HEADER_LEN..packed.len() {
                let mut bad = packed.clone();
                bad[at] ^= 0x5a;
                let (header, _, body) = ChunkHeader::parse_packed(&bad).unwrap();
                let mut out = vec![0u8; header.length as usize];
                let ok = Unpacker::new().unpack(codec, body, &mut out) && header.verify(&out);
                assert!(!ok, "{codec:?}: flip at {at} accepted");
            }
        }
    }

    #[test]
    fn garbage_never_panics_the_unpacker() {
        let mut u = Unpacker::new();
        for seed in 1..300u64 {
            let junk = random((seed * 7 % 200) as usize, seed);
            let mut out = vec![0u8; 4096];
            for codec in CODECS {
                let _ = u.unpack(codec, &junk, &mut out);
            }
        }
    }

    #[test]
    fn incompressible_data_backs_off_and_compressible_data_is_found_again() {
        let mut p = Packer::new(Codec::Lz4).unwrap();
        let noise = sealed(&random(1 << 16, 9));
        let tried = |p: &mut Packer| {
            let before = p.until_try;
            let _ = p.pack(&noise);
            before == 0
        };
        let tries = (0..1000).filter(|_| tried(&mut p)).count();
        assert!(
            tries < 1000 / 20,
            "tried {tries} of 1000 incompressible frames"
        );
        let good = sealed(&text(1 << 16));
        let found = (0..=MAX_SKIP).position(|_| p.pack(&good).is_some());
        assert!(found.is_some_and(|i| i < MAX_SKIP as usize));
        assert!(
            p.pack(&good).is_some(),
            "every frame is tried again after a hit"
        );
    }

    #[test]
    fn negotiation_settles_on_what_both_can_do() {
        assert_eq!(pick(&["brotli".into(), "lz4".into()]), Codec::Lz4);
        assert_eq!(pick(&[]), Codec::None);
        let auto = Mode::parse("auto").unwrap();
        assert_eq!(auto.settle("", "t").unwrap(), Codec::None);
        assert_eq!(auto.settle("zstd", "t").unwrap(), Codec::Zstd);
        let zstd = Mode::parse("zstd").unwrap();
        let err = zstd.settle("", "t").unwrap_err().to_string();
        assert!(
            err.contains("cannot decompress zstd") && !err.contains('\n'),
            "{err}"
        );
        assert!(Mode::parse("lz4").unwrap().settle("zstd", "t").is_err());
        assert_eq!(Mode::parse("off").unwrap().offer(), Vec::<String>::new());
        assert!(Mode::parse("gzip").is_err());
    }
}
