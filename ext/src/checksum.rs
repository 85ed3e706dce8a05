//! Chunk checksums, the frame digest and the content digest.
//!
//! A frame's checksum is XXH3-64 of its payload, seeded with XXH3-64 of the header fields it
//! protects, so a corrupted offset or length fails the check just like corrupted data.
//! The frame digest is XXH3-128 over the frame checksums in sequence order: zero frames cost
//! nothing to digest, and both ends compute it from what they sent or accepted. It depends
//! on how the disk was cut into frames, so it is the transfer's internal check only.
//!
//! The content digest ([`ContentDigest`], [`CONTENT_ALGORITHM`]) names the bytes alone:
//! the same image gives the same value whatever its source, chunk size or holes. It is what
//! a transfer reports and what `nbd-nats digest --algo blk64k-xxh3-128` prints.

// twox-hash picks AVX2 or SSE2 at run time. (xxhash-rust uses only what the build targets,
// SSE2 for a portable x86-64 wheel, which is slower where AVX2 is there.)
use twox_hash::{XxHash3_128, XxHash3_64};

/// Name carried in the handshake so a future algorithm can be negotiated.
pub const CHECKSUM_ALGORITHM: &str = "xxh3-64";
pub const DIGEST_ALGORITHM: &str = "xxh3-128";

/// The content digest, defined once (docs/protocol.md, "Content digest", is its prose
/// twin): cut the image into [`CONTENT_BLOCK`]-byte blocks (the last one may be shorter),
/// hash each with XXH3-128 (16 bytes, canonical big-endian), then hash with XXH3-128 the
/// concatenated block hashes followed by the image length as a little-endian u64.
/// An all-zero block is hashed by a precomputed value, equal to hashing its bytes.
pub const CONTENT_ALGORITHM: &str = "blk64k-xxh3-128";
pub const CONTENT_BLOCK: usize = 64 << 10;

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

/// Text form of a frame digest: `xxh3-128:<32 hex digits>`.
pub fn digest_hex(value: &[u8; 16]) -> String {
    tagged_hex(DIGEST_ALGORITHM, value)
}

/// Text form of a content digest, shown to users and in `--json`:
/// `blk64k-xxh3-128:<32 hex digits>`.
pub fn content_hex(value: &[u8; 16]) -> String {
    tagged_hex(CONTENT_ALGORITHM, value)
}

fn tagged_hex(algorithm: &str, value: &[u8; 16]) -> String {
    let mut s = String::with_capacity(algorithm.len() + 33);
    s.push_str(algorithm);
    s.push(':');
    for b in value {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn block_hash(block: &[u8]) -> [u8; 16] {
    XxHash3_128::oneshot(block).to_be_bytes()
}

/// The hash of an all-zero block, computed once.
fn zero_block_hash() -> [u8; 16] {
    static ZERO: std::sync::OnceLock<[u8; 16]> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| block_hash(&vec![0u8; CONTENT_BLOCK]))
}

/// The content digest of an image fed in offset order, as pieces of data and runs of
/// zeros of any length and alignment. Whole zero blocks cost one 16-byte update each and
/// are never materialised; a block split across pieces is gathered in a buffer.
#[derive(Clone)]
pub struct ContentDigest {
    outer: XxHash3_128,
    /// The current block's first bytes, when pieces did not end on a block boundary.
    partial: Vec<u8>,
    len: u64,
    /// A sub-stream of a striped transfer also hands each block hash to the whole image's
    /// digest.
    tap: Option<Tap>,
}

impl Default for ContentDigest {
    fn default() -> Self {
        ContentDigest {
            outer: XxHash3_128::new(),
            partial: Vec::new(),
            len: 0,
            tap: None,
        }
    }
}

/// Where a sub-stream's block hashes go: the whole image's [`Merger`], block `j` of stripe
/// `index` being block `(j / per * count + index) * per + j % per` of the image (`per`
/// blocks to a stripe segment). The stripe is `len` bytes; its last block may be short only
/// when it is the image's last.
#[derive(Clone)]
pub struct Tap {
    pub merger: std::sync::Arc<Merger>,
    pub index: u64,
    pub count: u64,
    pub per: u64,
    pub len: u64,
    /// Block hashes handed over so far.
    emitted: u64,
}

impl Tap {
    pub fn new(merger: std::sync::Arc<Merger>, index: u64, count: u64, per: u64, len: u64) -> Tap {
        Tap {
            merger,
            index,
            count,
            per: per.max(1),
            len,
            emitted: 0,
        }
    }

    fn block(&mut self, hash: [u8; 16]) {
        let j = self.emitted;
        self.emitted += 1;
        let global = (j / self.per * self.count + self.index) * self.per + j % self.per;
        self.merger.push(global, hash);
    }
}

/// The content digest of a whole image whose blocks' hashes arrive in any order, from the
/// sub-streams of a striped transfer: each is folded in once all blocks before it came.
/// Blocks that arrive early wait here (16 bytes and a map entry each: a sub-stream running
/// 1 GiB ahead of another holds about 1 MiB).
pub struct Merger {
    state: std::sync::Mutex<MergeState>,
}

struct MergeState {
    outer: XxHash3_128,
    next: u64,
    pending: std::collections::BTreeMap<u64, [u8; 16]>,
    /// A block came twice with different hashes (never, unless the code is wrong).
    conflict: bool,
}

impl Merger {
    pub fn new() -> Merger {
        Merger {
            state: std::sync::Mutex::new(MergeState {
                outer: XxHash3_128::new(),
                next: 0,
                pending: std::collections::BTreeMap::new(),
                conflict: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MergeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Block `index` of the image hashes to `hash`.
    pub fn push(&self, index: u64, hash: [u8; 16]) {
        let mut s = self.lock();
        if index < s.next {
            return; // folded in already (a sub-stream that re-read it)
        }
        if let Some(old) = s.pending.insert(index, hash) {
            s.conflict |= old != hash;
        }
        let s = &mut *s;
        while let Some(h) = s.pending.remove(&s.next) {
            s.outer.write(&h);
            s.next += 1;
        }
    }

    /// The digest of the `len`-byte image, once every block of it came; `None` before.
    pub fn value(&self, len: u64) -> Option<[u8; 16]> {
        let s = self.lock();
        let blocks = len.div_ceil(CONTENT_BLOCK as u64);
        if s.conflict || s.next != blocks || !s.pending.is_empty() {
            return None;
        }
        let mut outer = s.outer.clone();
        outer.write(&len.to_le_bytes());
        Some(outer.finish_128().to_be_bytes())
    }
}

impl Default for Merger {
    fn default() -> Self {
        Merger::new()
    }
}

impl ContentDigest {
    /// A content digest that also hands its block hashes to `tap`.
    pub fn tapped(tap: Option<Tap>) -> ContentDigest {
        ContentDigest {
            tap,
            ..ContentDigest::default()
        }
    }

    /// Fold one block hash in (and hand it on).
    fn fold(&mut self, h: [u8; 16]) {
        self.outer.write(&h);
        if let Some(t) = self.tap.as_mut() {
            t.block(h);
        }
    }

    /// A stripe's short last block is whole once all its bytes came.
    fn tail(&mut self) {
        if let Some(t) = self.tap.as_mut() {
            if self.len == t.len && !self.partial.is_empty() {
                t.block(block_hash(&self.partial));
            }
        }
    }
    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Hash the gathered block once it is whole.
    fn full_block(&mut self) {
        if self.partial.len() == CONTENT_BLOCK {
            let h = block_hash(&self.partial);
            self.fold(h);
            self.partial.clear();
        }
    }

    /// The next bytes of the image.
    pub fn data(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if !self.partial.is_empty() {
            let take = (CONTENT_BLOCK - self.partial.len()).min(data.len());
            let (head, rest) = data.split_at(take);
            self.partial.extend_from_slice(head);
            self.full_block();
            data = rest;
        }
        let mut blocks = data.chunks_exact(CONTENT_BLOCK);
        for block in &mut blocks {
            self.fold(block_hash(block));
        }
        let rest = blocks.remainder();
        if !rest.is_empty() {
            self.partial.reserve_exact(CONTENT_BLOCK);
            self.partial.extend_from_slice(rest);
        }
        self.tail();
    }

    /// The next `n` bytes of the image read as zeros.
    pub fn zeros(&mut self, mut n: u64) {
        self.len += n;
        if !self.partial.is_empty() {
            let take = ((CONTENT_BLOCK - self.partial.len()) as u64).min(n);
            self.partial.resize(self.partial.len() + take as usize, 0);
            self.full_block();
            n -= take;
        }
        if n == 0 {
            self.tail();
            return;
        }
        let zero = zero_block_hash();
        for _ in 0..n / CONTENT_BLOCK as u64 {
            self.fold(zero);
        }
        let rest = (n % CONTENT_BLOCK as u64) as usize;
        if rest > 0 {
            self.partial.reserve_exact(CONTENT_BLOCK);
            self.partial.resize(rest, 0);
        }
        self.tail();
    }

    /// The digest of everything fed so far (feeding may go on).
    pub fn value(&self) -> [u8; 16] {
        let mut outer = self.outer.clone();
        if !self.partial.is_empty() {
            outer.write(&block_hash(&self.partial));
        }
        outer.write(&self.len.to_le_bytes());
        outer.finish_128().to_be_bytes()
    }
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

    /// The definition, spelled out on a whole buffer (what docs/protocol.md describes).
    fn content_of(buf: &[u8]) -> [u8; 16] {
        let mut outer = XxHash3_128::new();
        for block in buf.chunks(CONTENT_BLOCK) {
            outer.write(&XxHash3_128::oneshot(block).to_be_bytes());
        }
        outer.write(&(buf.len() as u64).to_le_bytes());
        outer.finish_128().to_be_bytes()
    }

    fn next(rng: &mut u64) -> u64 {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *rng
    }

    /// An image with data, long zero runs and zero bytes inside data, cut at random into
    /// data pieces and zero runs (misaligned, crossing blocks, a zero run fed as data or as
    /// a run): every cut gives the digest of the whole buffer.
    #[test]
    fn content_digest_ignores_how_the_image_is_cut() {
        let mut rng = 0x1234_5678_9abc_def1u64;
        let mut image = vec![0u8; 5 * CONTENT_BLOCK + 12_345];
        for (i, b) in image.iter_mut().enumerate() {
            // Data, then a zero stretch of a block and a half, then data again.
            let in_hole =
                (CONTENT_BLOCK + 1000..2 * CONTENT_BLOCK + CONTENT_BLOCK / 2 + 1000).contains(&i);
            if !in_hole && i % 997 != 0 {
                *b = (i % 251) as u8 + 1;
            }
        }
        image[4 * CONTENT_BLOCK..4 * CONTENT_BLOCK + CONTENT_BLOCK].fill(0);
        let want = content_of(&image);
        for round in 0..300 {
            let mut d = ContentDigest::default();
            let mut pos = 0usize;
            while pos < image.len() {
                let max = match round % 3 {
                    0 => 700,
                    1 => CONTENT_BLOCK + 3000,
                    _ => 3 * CONTENT_BLOCK,
                };
                let n = ((next(&mut rng) % max as u64) as usize + 1).min(image.len() - pos);
                let piece = &image[pos..pos + n];
                if is_zero(piece) && next(&mut rng) % 2 == 0 {
                    d.zeros(n as u64);
                } else {
                    d.data(piece);
                }
                pos += n;
            }
            assert_eq!(d.len(), image.len() as u64);
            assert_eq!(d.value(), want, "round {round}");
        }
        // A zero block fed as a run hashes like a zero block fed as bytes.
        let mut a = ContentDigest::default();
        a.zeros(3 * CONTENT_BLOCK as u64 + 5);
        let mut b = ContentDigest::default();
        b.data(&vec![0u8; 3 * CONTENT_BLOCK + 5]);
        assert_eq!(a.value(), b.value());
        assert_eq!(zero_block_hash(), block_hash(&[0u8; CONTENT_BLOCK]));
    }

    /// The length is part of the digest: trailing zeros change it, an empty image has one.
    #[test]
    fn content_digest_counts_the_length() {
        let mut a = ContentDigest::default();
        a.data(b"abc");
        let mut b = a.clone();
        b.zeros(1);
        assert_ne!(a.value(), b.value());
        assert_eq!(a.value(), content_of(b"abc"));
        assert_eq!(ContentDigest::default().value(), content_of(&[]));
        assert!(content_hex(&a.value()).starts_with("blk64k-xxh3-128:"));
    }

    /// The algorithm is fixed (both ends, `nbd-nats digest` and other implementations
    /// compare its values): these must never change.
    #[test]
    fn content_digest_matches_its_definition() {
        // Values from libxxhash's XXH3_128bits, following docs/protocol.md.
        let mut d = ContentDigest::default();
        d.zeros(1 << 20);
        assert_eq!(
            u128::from_be_bytes(d.value()),
            0xc758_65dc_e1bd_2b42_6bf8_1c48_154e_aa99
        );
        let mut e = ContentDigest::default();
        e.data(b"nbdnats");
        assert_eq!(
            u128::from_be_bytes(e.value()),
            0xed59_1554_d7ff_689e_ce09_0d30_be36_3a8b
        );
        assert_eq!(
            u128::from_be_bytes(ContentDigest::default().value()),
            0x2c0a_8a99_dc14_7d54_45c3_b49d_0356_65b2
        );
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
