//! How a striped transfer (`--streams N`) cuts a disk: segment `i` (`size` bytes; the last
//! may be shorter) belongs to stripe `i % count`, and stripe `k` is its segments laid end
//! to end. Each stripe travels as a transfer of its own, of a disk that is the stripe: the
//! views below turn its offsets into the disk's, so sending, acks, the journal and resume
//! work on it unchanged.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::FutureExt;

use crate::checksum::{Merger, Tap, CONTENT_BLOCK};
use crate::error::{Error, Result};
use crate::extents::Extent;
use crate::handshake::Stripes;
use crate::io::{Sink, SinkCaps, Source};

/// The most sub-streams one transfer takes (`--streams`).
pub const MAX_STREAMS: u32 = 8;
/// Bytes of a stripe segment: a multiple of the content digest's block, so that each block
/// lies in one stripe, and large enough that a sub-stream reads and writes long runs.
pub const STRIPE_SIZE: u64 = 64 << 20;

/// A disk of `disk` bytes cut as `stripes` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub disk: u64,
    pub count: u64,
    pub size: u64,
}

impl Geometry {
    /// The cut a sender asks for, or a receiver checks: a count within `1..=MAX_STREAMS`
    /// and a segment size that is a whole number of content blocks.
    pub fn new(disk: u64, stripes: Stripes) -> Result<Geometry> {
        let Stripes { count, size } = stripes;
        if !(1..=MAX_STREAMS).contains(&count) {
            return Err(Error::Usage(format!(
                "--streams {count}: give 1 to {MAX_STREAMS} sub-streams"
            )));
        }
        if size == 0 || size % CONTENT_BLOCK as u64 != 0 || size > 1 << 40 {
            return Err(Error::Protocol(format!(
                "stripe segments of {size} bytes: they must be a positive multiple of {CONTENT_BLOCK} bytes"
            )));
        }
        Ok(Geometry {
            disk,
            count: u64::from(count),
            size,
        })
    }

    fn segments(&self) -> u64 {
        self.disk.div_ceil(self.size)
    }

    /// Bytes of stripe `k`.
    pub fn len(&self, k: u64) -> u64 {
        let segs = self.segments();
        if k >= segs {
            return 0;
        }
        let mine = (segs - 1 - k) / self.count + 1;
        let short = match self.disk % self.size {
            r if r != 0 && (segs - 1) % self.count == k => self.size - r,
            _ => 0,
        };
        mine * self.size - short
    }

    /// Where offset `local` of stripe `k` is on the disk, and how many bytes from there on
    /// stay in its segment.
    fn locate(&self, k: u64, local: u64) -> (u64, u64) {
        let (seg, within) = (local / self.size, local % self.size);
        let start = (seg * self.count + k) * self.size;
        let end = (start + self.size).min(self.disk);
        (start + within, end.saturating_sub(start + within))
    }

    /// `[local, local+len)` of stripe `k` as pieces of the disk, in order.
    pub fn pieces(&self, k: u64, local: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        if local.checked_add(len).is_none_or(|end| end > self.len(k)) {
            return Err(Error::Protocol(format!(
                "{len} bytes at {local} are beyond stripe {k} ({} bytes)",
                self.len(k)
            )));
        }
        let mut out = Vec::with_capacity(1);
        let (mut pos, end) = (local, local + len);
        while pos < end {
            let (at, room) = self.locate(k, pos);
            let n = room.min(end - pos);
            if n == 0 {
                return Err(Error::Protocol(format!("no room at {pos} of stripe {k}")));
            }
            out.push((at, n));
            pos += n;
        }
        Ok(out)
    }

    /// Where stripe `k`'s content digest hands its block hashes.
    pub fn tap(&self, k: u64, merger: Arc<Merger>) -> Tap {
        Tap::new(
            merger,
            k,
            self.count,
            self.size / CONTENT_BLOCK as u64,
            self.len(k),
        )
    }
}

/// Stripe `k` of a source, as a disk of its own.
pub struct StripeSource {
    inner: Arc<dyn Source>,
    geometry: Geometry,
    k: u64,
}

impl StripeSource {
    pub fn new(inner: Arc<dyn Source>, geometry: Geometry, k: u64) -> StripeSource {
        StripeSource { inner, geometry, k }
    }
}

impl Source for StripeSource {
    fn size(&self) -> u64 {
        self.geometry.len(self.k)
    }

    /// Describes at most the segment `offset` is in (callers ask again from where it ends).
    fn extents(&self, offset: u64, len: u64) -> BoxFuture<'static, Result<Vec<Extent>>> {
        let first = self
            .geometry
            .pieces(self.k, offset, len)
            .map(|p| p.first().copied());
        let inner = self.inner.clone();
        async move {
            let Some((at, n)) = first? else {
                return Ok(Vec::new());
            };
            let mut out = inner.extents(at, n).await?;
            for e in &mut out {
                if e.offset < at || e.end() > at + n {
                    return Err(Error::Endpoint(format!(
                        "source described extent {e:?} outside {n} bytes at {at}"
                    )));
                }
                e.offset = e.offset - at + offset;
            }
            Ok(out)
        }
        .boxed()
    }

    fn read(&self, offset: u64, len: usize, buf: Vec<u8>) -> BoxFuture<'static, Result<Vec<u8>>> {
        let pieces = match self.geometry.pieces(self.k, offset, len as u64) {
            Ok(p) => p,
            Err(e) => return futures::future::ready(Err(e)).boxed(),
        };
        if let [(at, n)] = pieces[..] {
            // The usual case (the sender's pieces never cross a segment): the read starts now.
            return self.inner.read(at, n as usize, buf);
        }
        let inner = self.inner.clone();
        async move {
            let mut buf = buf;
            for (at, n) in pieces {
                buf = inner.read(at, n as usize, buf).await?;
            }
            Ok(buf)
        }
        .boxed()
    }
}

/// Stripe `k` of a sink, as a disk of its own. The whole sink is prepared (created, sized)
/// once by the transfer that stripes it.
pub struct StripeSink {
    inner: Arc<dyn Sink>,
    geometry: Geometry,
    k: u64,
}

impl StripeSink {
    pub fn new(inner: Arc<dyn Sink>, geometry: Geometry, k: u64) -> StripeSink {
        StripeSink { inner, geometry, k }
    }

    fn pieces(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        self.geometry.pieces(self.k, offset, len)
    }
}

/// Run `ops` one after another (rare: only a range that crosses a segment has several).
fn all(ops: Vec<BoxFuture<'static, Result<()>>>) -> BoxFuture<'static, Result<()>> {
    async move {
        for r in futures::future::join_all(ops).await {
            r?;
        }
        Ok(())
    }
    .boxed()
}

impl Sink for StripeSink {
    fn size(&self) -> Option<u64> {
        Some(self.geometry.len(self.k))
    }

    fn caps(&self) -> SinkCaps {
        self.inner.caps()
    }

    fn prepare(&self, size: u64) -> BoxFuture<'static, Result<()>> {
        let own = self.geometry.len(self.k);
        let r = if size == own {
            Ok(())
        } else {
            Err(Error::Protocol(format!(
                "sub-stream {} is of {own} bytes, not {size}",
                self.k
            )))
        };
        futures::future::ready(r).boxed()
    }

    fn write(&self, offset: u64, data: Bytes) -> BoxFuture<'static, Result<()>> {
        match self.pieces(offset, data.len() as u64) {
            Ok(p) if p.len() == 1 => self.inner.write(p[0].0, data),
            Ok(p) => {
                let mut done = 0usize;
                let ops = p
                    .into_iter()
                    .map(|(at, n)| {
                        let part = data.slice(done..done + n as usize);
                        done += n as usize;
                        self.inner.write(at, part)
                    })
                    .collect();
                all(ops)
            }
            Err(e) => futures::future::ready(Err(e)).boxed(),
        }
    }

    fn zero(&self, offset: u64, len: u64, trim: bool) -> BoxFuture<'static, Result<()>> {
        match self.pieces(offset, len) {
            Ok(p) => all(p
                .into_iter()
                .map(|(at, n)| self.inner.zero(at, n, trim))
                .collect()),
            Err(e) => futures::future::ready(Err(e)).boxed(),
        }
    }

    fn flush(&self) -> BoxFuture<'static, Result<()>> {
        self.inner.flush()
    }

    fn read(&self, offset: u64, len: usize) -> BoxFuture<'static, Result<Bytes>> {
        let pieces = match self.pieces(offset, len as u64) {
            Ok(p) => p,
            Err(e) => return futures::future::ready(Err(e)).boxed(),
        };
        if let [(at, n)] = pieces[..] {
            return self.inner.read(at, n as usize);
        }
        let reads: Vec<_> = pieces
            .into_iter()
            .map(|(at, n)| self.inner.read(at, n as usize))
            .collect();
        async move {
            let mut out = BytesMut::with_capacity(len);
            for r in futures::future::join_all(reads).await {
                out.extend_from_slice(&r?);
            }
            Ok(out.freeze())
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(disk: u64, count: u32, size: u64) -> Geometry {
        Geometry::new(disk, Stripes { count, size }).unwrap()
    }

    /// Every byte of the disk is in exactly one stripe, once, and each stripe's pieces
    /// are in increasing order.
    #[test]
    fn stripes_cover_the_disk_once() {
        let block = CONTENT_BLOCK as u64;
        for (disk, count, size) in [
            (0, 3, block),
            (1, 3, block),
            (10 * block, 3, block),
            (10 * block + 7, 3, block),
            (10 * block + 7, 4, 2 * block),
            (5 * block, 8, block),
            (64 * block - 1, 2, 4 * block),
            (3 * block, 1, block),
        ] {
            let geo = g(disk, count, size);
            let mut owner = vec![u8::MAX; disk as usize];
            let mut total = 0;
            for k in 0..u64::from(count) {
                let len = geo.len(k);
                total += len;
                let mut last = None;
                for (at, n) in geo.pieces(k, 0, len).unwrap() {
                    assert!(last.is_none_or(|l| at >= l), "order");
                    last = Some(at + n);
                    for b in at..at + n {
                        assert_eq!(owner[b as usize], u8::MAX, "byte {b} twice");
                        owner[b as usize] = k as u8;
                        assert_eq!((b / size) % u64::from(count), k);
                    }
                }
                assert!(geo.pieces(k, len, 1).is_err(), "beyond the stripe");
            }
            assert_eq!(total, disk);
            assert!(owner.iter().all(|&o| o != u8::MAX));
        }
    }

    #[test]
    fn bad_geometries_are_refused() {
        let s = |count, size| Geometry::new(1 << 30, Stripes { count, size });
        assert!(s(0, STRIPE_SIZE).is_err());
        assert!(s(MAX_STREAMS + 1, STRIPE_SIZE).is_err());
        assert!(s(2, 0).is_err());
        assert!(s(2, 4096).is_err());
        assert!(s(2, STRIPE_SIZE).is_ok());
    }

    /// The merged block hashes of the stripes give the whole image's content digest.
    #[test]
    fn merged_stripes_give_the_image_digest() {
        use crate::checksum::ContentDigest;
        let block = CONTENT_BLOCK as u64;
        for (disk, count, size) in [(10 * block + 777, 3, block), (9 * block, 2, 2 * block)] {
            let image: Vec<u8> = (0..disk).map(|i| (i * 31 % 251) as u8).collect();
            let mut whole = ContentDigest::default();
            whole.data(&image);
            let geo = g(disk, count, size);
            let merger = Arc::new(Merger::new());
            // Stripes fed in reverse order, in pieces of odd sizes.
            for k in (0..u64::from(count)).rev() {
                let mut part = ContentDigest::tapped(Some(geo.tap(k, merger.clone())));
                for (at, n) in geo.pieces(k, 0, geo.len(k)).unwrap() {
                    for piece in image[at as usize..(at + n) as usize].chunks(5000) {
                        part.data(piece);
                    }
                }
            }
            assert_eq!(merger.value(disk), Some(whole.value()));
        }
    }

    #[test]
    fn a_missing_block_gives_no_digest() {
        let merger = Merger::new();
        merger.push(0, [1; 16]);
        merger.push(2, [2; 16]);
        assert_eq!(merger.value(3 * CONTENT_BLOCK as u64), None);
        merger.push(1, [3; 16]);
        assert!(merger.value(3 * CONTENT_BLOCK as u64).is_some());
    }
}
