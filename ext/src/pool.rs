//! Reused frame buffers of one size, for the sender. Its frames live from their read until
//! async-nats has written them, on other threads; handing the same few buffers round again
//! (the one freed last first, so it is likely still in cache) keeps the memory they take at
//! what the read-ahead and the window hold. Fresh allocations of every frame's size, freed
//! on other threads, let the allocator's footprint grow well past that (bench/README.md,
//! "Measured before 2026-12").

use std::sync::{Arc, Mutex};

use bytes::Bytes;

#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    size: usize,
    /// Free buffers kept for reuse beyond this many are freed.
    keep: usize,
    free: Mutex<Vec<Vec<u8>>>,
}

/// A pool buffer lent to a `Bytes`: it comes back when the last clone is dropped.
struct Lent {
    buf: Vec<u8>,
    pool: Arc<Inner>,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.buf);
        if buf.capacity() < self.pool.size {
            return; // not one of ours (or shrunk): let it go
        }
        buf.clear();
        if let Ok(mut free) = self.pool.free.lock() {
            if free.len() < self.pool.keep {
                free.push(buf);
            }
        }
    }
}

impl Pool {
    /// A pool of `size`-byte buffers that keeps at most `keep` of them idle.
    pub fn new(size: usize, keep: usize) -> Pool {
        Pool {
            inner: Arc::new(Inner {
                size,
                keep,
                free: Mutex::new(Vec::new()),
            }),
        }
    }

    /// An empty buffer with room for `size` bytes: an idle one, or a new one.
    pub fn take(&self) -> Vec<u8> {
        let reused = self.inner.free.lock().ok().and_then(|mut f| f.pop());
        reused.unwrap_or_else(|| Vec::with_capacity(self.inner.size))
    }

    /// Hand back a buffer that was taken but not shared.
    pub fn put(&self, buf: Vec<u8>) {
        drop(Lent {
            buf,
            pool: self.inner.clone(),
        });
    }

    /// `buf` as `Bytes`; it comes back to the pool when the last clone is dropped.
    pub fn share(&self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Lent {
            buf,
            pool: self.inner.clone(),
        })
    }

    #[cfg(test)]
    fn idle(&self) -> usize {
        self.inner.free.lock().map_or(0, |f| f.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(pool: &Pool, data: &[u8]) -> Bytes {
        let mut buf = pool.take();
        buf.extend_from_slice(data);
        pool.share(buf)
    }

    #[test]
    fn buffers_come_back_and_are_reused() {
        let pool = Pool::new(4096, 2);
        let a = copy(&pool, b"hello");
        let b = a.slice(1..3);
        assert_eq!(&a[..], b"hello");
        drop(a);
        assert_eq!(pool.idle(), 0, "a clone still holds it");
        drop(b);
        assert_eq!(pool.idle(), 1);
        let c = copy(&pool, b"xy");
        assert_eq!((&c[..], pool.idle()), (&b"xy"[..], 0));
    }

    #[test]
    fn taken_buffers_are_shared_or_put_back() {
        let pool = Pool::new(64, 4);
        let mut buf = pool.take();
        assert!(buf.capacity() >= 64 && buf.is_empty());
        buf.extend_from_slice(b"frame");
        let shared = pool.share(buf);
        assert_eq!(&shared[..], b"frame");
        drop(shared);
        let unused = pool.take();
        assert_eq!(pool.idle(), 0);
        pool.put(unused);
        assert_eq!(pool.idle(), 1);
    }

    #[test]
    fn idle_buffers_are_bounded() {
        let pool = Pool::new(64, 2);
        let held: Vec<Bytes> = (0..5).map(|i| copy(&pool, &[i; 10])).collect();
        drop(held);
        assert_eq!(pool.idle(), 2);
    }
}
