//! stdin and stdout as raw image streams in offset order (for `restic`/`kopia` pipes).
//!
//! Each has one thread that serves requests strictly in the order they were made; an
//! out-of-order request is a bug in the caller and fails loudly rather than scrambling data.

use std::io::Read;
use std::sync::mpsc;
use std::thread;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::oneshot;

use super::{all_data, write_zeros, Sink, SinkCaps, Source};
use crate::error::{Error, Result};
use crate::extents::Extent;

type Reply<T> = oneshot::Sender<Result<T>>;

fn call<T: Send + 'static, R: Send + 'static>(
    tx: &mpsc::Sender<R>,
    make: impl FnOnce(Reply<T>) -> R,
    what: &'static str,
) -> BoxFuture<'static, Result<T>> {
    let (reply, rx) = oneshot::channel();
    let sent = tx.send(make(reply));
    async move {
        sent.map_err(|_| Error::Endpoint(format!("{what} is closed")))?;
        rx.await
            .map_err(|_| Error::Endpoint(format!("{what} stopped")))?
    }
    .boxed()
}

pub struct Stdin {
    size: u64,
    tx: mpsc::Sender<(u64, usize, usize, Reply<BytesMut>)>,
}

impl Stdin {
    pub fn open(size: u64) -> Stdin {
        let (tx, rx) = mpsc::channel::<(u64, usize, usize, Reply<BytesMut>)>();
        thread::spawn(move || {
            let mut input = std::io::stdin().lock();
            let mut pos = 0u64;
            for (offset, len, headroom, reply) in rx {
                let _ = reply.send(read_next(&mut input, &mut pos, size, offset, len, headroom));
            }
        });
        Stdin { size, tx }
    }
}

fn read_next(
    input: &mut impl Read,
    pos: &mut u64,
    size: u64,
    offset: u64,
    len: usize,
    headroom: usize,
) -> Result<BytesMut> {
    if offset != *pos {
        return Err(Error::Endpoint(format!(
            "stdin read at {offset} but the stream is at {pos}"
        )));
    }
    let mut buf = BytesMut::zeroed(headroom + len);
    let mut filled = 0;
    while filled < len {
        match input.read(&mut buf[headroom + filled..]) {
            Ok(0) => {
                return Err(Error::Endpoint(format!(
                    "stdin ended after {} bytes but --size says {size}",
                    *pos + filled as u64
                )))
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Endpoint(format!("reading stdin: {e}"))),
        }
    }
    *pos += len as u64;
    if *pos == size {
        let mut extra = [0u8; 1];
        if matches!(input.read(&mut extra), Ok(n) if n > 0) {
            return Err(Error::Endpoint(format!(
                "stdin holds more than the {size} bytes --size gives"
            )));
        }
    }
    Ok(buf)
}

impl Source for Stdin {
    fn size(&self) -> u64 {
        self.size
    }

    fn extents(&self, offset: u64, len: u64) -> BoxFuture<'static, Result<Vec<Extent>>> {
        all_data(offset, len, self.size)
    }

    fn read(
        &self,
        offset: u64,
        len: usize,
        headroom: usize,
    ) -> BoxFuture<'static, Result<BytesMut>> {
        call(&self.tx, |r| (offset, len, headroom, r), "stdin")
    }
}

enum Out {
    Write(u64, Bytes, Reply<()>),
    Flush(Reply<()>),
}

pub struct Stdout {
    tx: mpsc::Sender<Out>,
}

impl Stdout {
    pub fn open() -> Stdout {
        let (tx, rx) = mpsc::channel::<Out>();
        thread::spawn(move || {
            let out = std::io::stdout();
            let mut pos = 0u64;
            for req in rx {
                match req {
                    Out::Write(offset, data, reply) => {
                        let r = if offset != pos {
                            Err(Error::Endpoint(format!(
                                "stdout write at {offset} but the stream is at {pos}"
                            )))
                        } else {
                            write_all(&out, &data).map(|()| pos += data.len() as u64)
                        };
                        let _ = reply.send(r);
                    }
                    Out::Flush(reply) => {
                        let _ = reply.send(Ok(()));
                    }
                }
            }
        });
        Stdout { tx }
    }
}

/// Write straight to fd 1, past Rust's line buffering.
fn write_all(out: &std::io::Stdout, mut data: &[u8]) -> Result<()> {
    use std::os::fd::AsFd;
    while !data.is_empty() {
        match rustix::io::write(out.as_fd(), data) {
            Ok(n) => data = &data[n..],
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::PIPE) => {
                return Err(Error::Endpoint(
                    "stdout was closed by the program reading it (broken pipe)".into(),
                ))
            }
            Err(e) => return Err(Error::Endpoint(format!("writing stdout: {e}"))),
        }
    }
    Ok(())
}

impl Sink for Stdout {
    fn size(&self) -> Option<u64> {
        None
    }

    fn caps(&self) -> SinkCaps {
        SinkCaps {
            sequential: true,
            ..SinkCaps::default()
        }
    }

    fn prepare(&self, _size: u64) -> BoxFuture<'static, Result<()>> {
        futures::future::ready(Ok(())).boxed()
    }

    fn write(&self, offset: u64, data: Bytes) -> BoxFuture<'static, Result<()>> {
        call(&self.tx, |r| Out::Write(offset, data, r), "stdout")
    }

    fn zero(&self, offset: u64, len: u64, _trim: bool) -> BoxFuture<'static, Result<()>> {
        // A stream has no holes: zeros are written out.
        let tx = self.tx.clone();
        write_zeros(offset, len, move |at, piece| {
            call(&tx, |r| Out::Write(at, piece, r), "stdout")
        })
    }

    fn flush(&self) -> BoxFuture<'static, Result<()>> {
        call(&self.tx, Out::Flush, "stdout")
    }

    fn read(&self, _offset: u64, _len: usize) -> BoxFuture<'static, Result<Bytes>> {
        futures::future::ready(Err(Error::Usage(
            "stdout cannot be read back; drop --verify".into(),
        )))
        .boxed()
    }
}
