//! NBD backend: one thread owns the libnbd handle and keeps up to `DEPTH` commands in
//! flight on its connection, so reads and writes are pipelined rather than one round trip
//! each. Callers talk to it over a channel and await a oneshot reply.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::oneshot;

use super::{read_owned, write_zeros, Sink, SinkCaps, Source};
use crate::error::{Error, Result};
use crate::extents::{from_block_status, Extent};
use crate::libnbd::{Caps, Command, Completed, Handle};

/// Commands in flight per connection; like nbdcopy's default request depth.
const DEPTH: usize = 16;
/// How long one poll waits before the worker checks whether it is being shut down.
const POLL_MS: i32 = 500;

enum Request {
    Command(Command, oneshot::Sender<Result<Completed, String>>),
    BlockStatus(u64, u64, oneshot::Sender<Result<Vec<(u64, u32)>, String>>),
}

/// A connection to one NBD export; clones share the connection.
#[derive(Clone)]
pub struct Nbd {
    inner: Arc<Inner>,
}

struct Inner {
    uri: String,
    size: u64,
    caps: Caps,
    tx: mpsc::Sender<Request>,
    /// Still worth asking for fast zeroing (cleared after the server refuses it once).
    fast_zero: AtomicBool,
    /// Set when the last clone is dropped: the worker abandons what is still in flight.
    closed: Arc<AtomicBool>,
}

impl Nbd {
    pub async fn open(uri: &str) -> Result<Nbd> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (tx, rx) = mpsc::channel::<Request>();
        let closed = Arc::new(AtomicBool::new(false));
        let worker_closed = closed.clone();
        let worker_uri = uri.to_string();
        thread::Builder::new()
            .name("nbd-io".into())
            .spawn(move || {
                match Handle::connect(&worker_uri).and_then(|h| Ok((h.size()?, h.caps(), h))) {
                    Ok((size, caps, handle)) => {
                        let _ = ready_tx.send(Ok((size, caps)));
                        run(handle, rx, &worker_closed);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| Error::Endpoint(format!("cannot start NBD thread: {e}")))?;
        let (size, caps) = ready_rx
            .await
            .map_err(|_| Error::Endpoint(format!("NBD connection to {uri} ended during setup")))?
            .map_err(|e| Error::Endpoint(format!("cannot connect to NBD {uri}: {e}")))?;
        let fast_zero = AtomicBool::new(caps.can_fast_zero);
        Ok(Nbd {
            inner: Arc::new(Inner {
                uri: uri.to_string(),
                size,
                caps,
                tx,
                fast_zero,
                closed,
            }),
        })
    }

    pub fn read_only(&self) -> bool {
        self.inner.caps.read_only
    }

    fn command(&self, cmd: Command) -> BoxFuture<'static, Result<Completed>> {
        let (tx, rx) = oneshot::channel();
        let sent = self.inner.tx.send(Request::Command(cmd, tx));
        let uri = self.inner.uri.clone();
        async move {
            sent.map_err(|_| Error::Endpoint(format!("NBD connection to {uri} is closed")))?;
            rx.await
                .map_err(|_| Error::Endpoint(format!("NBD connection to {uri} was lost")))?
                .map_err(|e| Error::Endpoint(format!("NBD {uri}: {e}")))
        }
        .boxed()
    }

    fn done(&self, cmd: Command) -> BoxFuture<'static, Result<()>> {
        self.command(cmd).map(|r| r.map(|_| ())).boxed()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}

/// The worker loop: fill up to DEPTH commands, poll, hand back whatever completed.
fn run(mut handle: Handle, rx: mpsc::Receiver<Request>, closed: &AtomicBool) {
    let mut waiting: std::collections::HashMap<u64, oneshot::Sender<Result<Completed, String>>> =
        std::collections::HashMap::new();
    let mut disconnected = false;
    loop {
        while waiting.len() < DEPTH && !disconnected {
            let next = if waiting.is_empty() {
                rx.recv().map_err(|_| mpsc::TryRecvError::Disconnected)
            } else {
                rx.try_recv()
            };
            match next {
                Ok(Request::Command(cmd, reply)) => match handle.submit(cmd) {
                    Ok(cookie) => {
                        waiting.insert(cookie, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                },
                Ok(Request::BlockStatus(offset, len, reply)) => {
                    // Synchronous: let earlier commands finish first.
                    let _ = reply.send(
                        drain(&mut handle, &mut waiting)
                            .and_then(|()| handle.block_status(offset, len)),
                    );
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => disconnected = true,
            }
        }
        if waiting.is_empty() {
            if disconnected {
                return;
            }
            continue;
        }
        if let Err(e) = handle.poll(POLL_MS) {
            for (_, reply) in waiting.drain() {
                let _ = reply.send(Err(e.clone()));
            }
            return;
        }
        deliver(&mut handle, &mut waiting);
        if closed.load(Ordering::Relaxed) {
            // Owner is gone; abandon whatever the server has not answered.
            return;
        }
    }
}

fn deliver(
    handle: &mut Handle,
    waiting: &mut std::collections::HashMap<u64, oneshot::Sender<Result<Completed, String>>>,
) {
    while let Some((cookie, result)) = handle.retire() {
        if let Some(reply) = waiting.remove(&cookie) {
            let _ = reply.send(result);
        }
    }
}

fn drain(
    handle: &mut Handle,
    waiting: &mut std::collections::HashMap<u64, oneshot::Sender<Result<Completed, String>>>,
) -> Result<(), String> {
    while !waiting.is_empty() {
        handle.poll(POLL_MS)?;
        deliver(handle, waiting);
    }
    Ok(())
}

impl Source for Nbd {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn extents(&self, offset: u64, len: u64) -> BoxFuture<'static, Result<Vec<Extent>>> {
        let end = offset.saturating_add(len).min(self.inner.size);
        if !self.inner.caps.has_allocation {
            return futures::future::ready(Ok(vec![Extent {
                offset,
                len: end - offset,
                zero: false,
            }]))
            .boxed();
        }
        let (tx, rx) = oneshot::channel();
        let sent = self
            .inner
            .tx
            .send(Request::BlockStatus(offset, end - offset, tx));
        let uri = self.inner.uri.clone();
        async move {
            sent.map_err(|_| Error::Endpoint(format!("NBD connection to {uri} is closed")))?;
            let entries = rx
                .await
                .map_err(|_| Error::Endpoint(format!("NBD connection to {uri} was lost")))?
                .map_err(|e| Error::Endpoint(format!("NBD {uri}: block status: {e}")))?;
            let got = from_block_status(offset, end, &entries);
            if got.is_empty() {
                return Err(Error::Endpoint(format!(
                    "NBD {uri}: block status described nothing at {offset}"
                )));
            }
            Ok(got)
        }
        .boxed()
    }

    fn read(&self, offset: u64, len: usize, buf: Vec<u8>) -> BoxFuture<'static, Result<Vec<u8>>> {
        // libnbd reads straight into the buffer's spare capacity, not zeroed first.
        self.command(Command::Read { offset, buf, len })
            .map(|r| match r? {
                Completed::Read(buf) => Ok(buf),
                Completed::Other => Err(Error::Endpoint("NBD read returned no buffer".into())),
            })
            .boxed()
    }
}

impl Sink for Nbd {
    fn size(&self) -> Option<u64> {
        Some(self.inner.size)
    }

    fn caps(&self) -> SinkCaps {
        SinkCaps {
            can_zero: self.inner.caps.can_zero,
            can_fast_zero: self.inner.caps.can_fast_zero,
            can_trim: self.inner.caps.can_trim,
            can_flush: self.inner.caps.can_flush,
            can_read: true,
            sequential: false,
        }
    }

    fn prepare(&self, size: u64) -> BoxFuture<'static, Result<()>> {
        let result = if size > self.inner.size {
            Err(Error::TargetTooSmall(format!(
                "NBD target {} holds {} bytes but the source has {size}; grow it first (qemu-img resize)",
                self.inner.uri, self.inner.size
            )))
        } else {
            Ok(())
        };
        futures::future::ready(result).boxed()
    }

    fn write(&self, offset: u64, data: Bytes) -> BoxFuture<'static, Result<()>> {
        self.done(Command::Write { offset, data })
    }

    fn zero(&self, offset: u64, len: u64, trim: bool) -> BoxFuture<'static, Result<()>> {
        if trim && self.inner.caps.can_trim {
            return self.done(Command::Trim { offset, len });
        }
        if !self.inner.caps.can_zero {
            let this = self.clone();
            return write_zeros(offset, len, move |at, data| {
                this.done(Command::Write { offset: at, data })
            });
        }
        if !self.inner.fast_zero.load(Ordering::Relaxed) {
            return self.done(Command::Zero {
                offset,
                len,
                fast: false,
            });
        }
        // Fast zero fails at once where the server could only zero by writing. Then a
        // plain write-zeroes still saves sending the zeros, and we stop asking for fast.
        let fast = self.command(Command::Zero {
            offset,
            len,
            fast: true,
        });
        let this = self.clone();
        async move {
            match fast.await {
                Ok(_) => Ok(()),
                Err(_) => {
                    this.inner.fast_zero.store(false, Ordering::Relaxed);
                    this.done(Command::Zero {
                        offset,
                        len,
                        fast: false,
                    })
                    .await
                }
            }
        }
        .boxed()
    }

    fn flush(&self) -> BoxFuture<'static, Result<()>> {
        if !self.inner.caps.can_flush {
            return futures::future::ready(Ok(())).boxed();
        }
        self.done(Command::Flush)
    }

    fn read(&self, offset: u64, len: usize) -> BoxFuture<'static, Result<Bytes>> {
        read_owned(self, offset, len)
    }
}
