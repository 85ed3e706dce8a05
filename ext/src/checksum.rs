//! Chunk checksums and the end-of-transfer digest.
//!
//! A frame's checksum is XXH3-64 of its payload, seeded with XXH3-64 of the header fields it
//! protects, so a corrupted offset or length fails the check just like corrupted data.
//! The digest is XXH3-128 over the frame checksums in sequence order: zero frames cost
//! nothing to digest, and both ends compute it from what they sent or accepted.

// twox-hash picks AVX2 or SSE2 at run time. (xxhash-rust uses only what the build targets,
// SSE2 for a portable x86-64 wheel, which is slower where AVX2 is there.)
use twox_hash::{XxHash3_128, XxHash3_64};

/// Name carried in the handshake so a future algorithm can be negotiated.
pub const CHECKSUM_ALGORITHM: &str = "xxh3-64";
pub const DIGEST_ALGORITHM: &str = "xxh3-128";

pub fn frame_checksum(protected_header: &[u8], payload: &[u8]) -> u64 {
    XxHash3_64::oneshot_with_seed(xxh3_64(protected_header), payload)
}

/// XXH3-64 without a seed (the journal's record checksums).
pub fn xxh3_64(data: &[u8]) -> u64 {
    XxHash3_64::oneshot(data)
}

/// Running digest over frame checksums.
#[derive(Clone)]
pub struct Digest {
    hasher: XxHash3_128,
}

impl Default for Digest {
    fn default() -> Self {
        Digest {
            hasher: XxHash3_128::new(),
        }
    }
}

impl Digest {
    pub fn update(&mut self, frame_checksum: u64) {
        self.hasher.write(&frame_checksum.to_le_bytes());
    }

    pub fn value(&self) -> [u8; 16] {
        self.hasher.finish_128().to_be_bytes()
    }
}

/// Text form shown to users and in `--json`: `xxh3-128:<32 hex digits>`.
pub fn digest_hex(value: &[u8; 16]) -> String {
    let mut s = String::with_capacity(DIGEST_ALGORITHM.len() + 33);
    s.push_str(DIGEST_ALGORITHM);
    s.push(':');
    for b in value {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// True when every byte is zero. Works a 64-byte block at a time so the compiler vectorises
/// it, stopping at the first block that holds data (data blocks usually fail on the first).
pub fn is_zero(buf: &[u8]) -> bool {
    let mut blocks = buf.chunks_exact(64);
    for block in &mut blocks {
        if block.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_change_changes_checksum() {
        let data = vec![7u8; 4096];
        assert_ne!(
            frame_checksum(b"header-a", &data),
            frame_checksum(b"header-b", &data)
        );
    }

    /// The wire format fixes the algorithms: these values must never change (a receiver of
    /// another build, or a journal written by one, compares them).
    #[test]
    fn algorithms_match_the_xxh3_specification() {
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        assert_eq!(frame_checksum(&[7u8; 32], &payload), 0x18a0_60ab_5444_e1f7);
        assert_eq!(frame_checksum(&[7u8; 32], &[]), 0x853f_c17c_1cef_52c8);
        let mut d = Digest::default();
        for c in [1u64, 2, 3] {
            d.update(c);
        }
        assert_eq!(
            u128::from_be_bytes(d.value()),
            0xd0d6_6ae2_837a_0117_026f_21f9_c50d_cf1f
        );
    }

    #[test]
    fn digest_depends_on_order() {
        let mut a = Digest::default();
        a.update(1);
        a.update(2);
        let mut b = Digest::default();
        b.update(2);
        b.update(1);
        assert_ne!(a.value(), b.value());
        assert!(digest_hex(&a.value()).starts_with("xxh3-128:"));
        assert_eq!(digest_hex(&a.value()).len(), "xxh3-128:".len() + 32);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&vec![0u8; 1000]));
        for pos in [0usize, 63, 64, 999] {
            let mut v = vec![0u8; 1000];
            v[pos] = 1;
            assert!(!is_zero(&v), "byte {pos}");
        }
    }
}
