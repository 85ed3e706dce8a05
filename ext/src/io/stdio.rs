//! Raw image streams in offset order: stdin and stdout, and `pipe:PATH` (a FIFO or
//! `/proc/self/fd/N`) for a backup tool's pipe that the agent holds.
//!
//! Each has one thread that serves requests strictly in the order they were made; an
//! out-of-order request is a bug in the caller and fails loudly rather than scrambling data.

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc;
use std::thread;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::oneshot;

use super::{all_data, write_zeros, Sink, SinkCaps, Source};
use crate::error::{Error, Result};
use crate::extents::Extent;

type Reply<T> = oneshot::Sender<Result<T>>;

pub(super) fn call<T: Send + 'static, R: Send + 'static>(
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

/// Where a stream goes or comes from: the process's own stdin/stdout, or a pipe or unix
/// socket opened by path.
pub enum Stream {
    Std,
    Pipe {
        path: String,
        fd: OwnedFd,
    },
    Unix {
        path: String,
        fd: OwnedFd,
    },
    /// A unix socket connected to on the first write: its listener sees nothing until
    /// data comes (a QEMU waiting for an incoming migration fails when a connection
    /// closes, but not when none was made). `on_connect` gets a second descriptor of the
    /// connection, to read what the other end writes back.
    UnixLater {
        path: String,
        on_connect: Option<OnConnect>,
    },
}

/// Given a descriptor of a connection once it exists (to read its other direction).
pub type OnConnect = Box<dyn FnOnce(OwnedFd) + Send>;

impl Stream {
    /// Open `pipe:PATH` for reading or writing; it must be a FIFO or a pipe, not a file.
    pub fn open_pipe(path: &str, write: bool) -> Result<Stream> {
        use rustix::fs::{FileType, Mode, OFlags};
        let flags = if write {
            OFlags::WRONLY
        } else {
            OFlags::RDONLY
        } | OFlags::CLOEXEC;
        let fd = rustix::fs::open(path, flags, Mode::empty())
            .map_err(|e| Error::Endpoint(format!("cannot open pipe {path}: {e}")))?;
        let stat =
            rustix::fs::fstat(&fd).map_err(|e| Error::Endpoint(format!("pipe {path}: {e}")))?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::Fifo {
            return Err(Error::Usage(format!(
                "pipe:{path} is not a pipe or FIFO; name a file without 'pipe:'"
            )));
        }
        Ok(Stream::Pipe {
            path: path.to_string(),
            fd,
        })
    }

    /// Connect a `UnixLater` now; nothing for the others.
    pub(super) fn connect(&mut self) -> Result<()> {
        if let Stream::UnixLater { path, on_connect } = self {
            let connected = Stream::connect_unix(path)?;
            if let (Some(hand_over), Stream::Unix { fd, path }) = (on_connect.take(), &connected) {
                let other = fd
                    .try_clone()
                    .map_err(|e| Error::Endpoint(format!("unix socket {path}: {e}")))?;
                hand_over(other);
            }
            *self = connected;
        }
        Ok(())
    }

    /// Connect to a listening unix stream socket (`unix:PATH`), e.g. a QEMU migration
    /// socket, and write the stream into it.
    pub fn connect_unix(path: &str) -> Result<Stream> {
        let sock = std::os::unix::net::UnixStream::connect(path)
            .map_err(|e| Error::Endpoint(format!("cannot connect to unix socket {path}: {e}")))?;
        Ok(Stream::Unix {
            path: path.to_string(),
            fd: OwnedFd::from(sock),
        })
    }

    pub(super) fn name(&self, std: &str) -> String {
        match self {
            Stream::Std => std.to_string(),
            Stream::Pipe { path, .. } => format!("pipe {path}"),
            Stream::Unix { path, .. } | Stream::UnixLater { path, .. } => {
                format!("unix socket {path}")
            }
        }
    }

    pub(super) fn fd(&self) -> Option<&OwnedFd> {
        match self {
            Stream::Std | Stream::UnixLater { .. } => None,
            Stream::Pipe { fd, .. } | Stream::Unix { fd, .. } => Some(fd),
        }
    }
}

struct PipeReader<'a>(&'a OwnedFd);

impl Read for PipeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        rustix::io::read(self.0, buf).map_err(std::io::Error::from)
    }
}

/// A read for the stream's thread: offset, length, the buffer to append to, the answer.
type ReadRequest = (u64, usize, Vec<u8>, Reply<Vec<u8>>);

pub struct Stdin {
    size: u64,
    name: &'static str,
    tx: mpsc::Sender<ReadRequest>,
}

impl Stdin {
    pub fn open(size: u64, stream: Stream) -> Stdin {
        let (tx, rx) = mpsc::channel::<ReadRequest>();
        let name = stream.name("stdin");
        let label: &'static str = if matches!(stream, Stream::Std) {
            "stdin"
        } else {
            "pipe"
        };
        thread::spawn(move || {
            let mut pos = 0u64;
            let serve = |input: &mut dyn Read| {
                for (offset, len, buf, reply) in rx {
                    let r = read_next(input, &name, &mut pos, size, offset, len, buf);
                    let _ = reply.send(r);
                }
            };
            match stream.fd() {
                None => serve(&mut std::io::stdin().lock()),
                Some(fd) => serve(&mut PipeReader(fd)),
            }
        });
        Stdin {
            size,
            name: label,
            tx,
        }
    }
}

fn read_next(
    input: &mut dyn Read,
    name: &str,
    pos: &mut u64,
    size: u64,
    offset: u64,
    len: usize,
    mut buf: Vec<u8>,
) -> Result<Vec<u8>> {
    if offset != *pos {
        return Err(Error::Endpoint(format!(
            "{name} read at {offset} but the stream is at {pos}"
        )));
    }
    let start = buf.len();
    buf.resize(start + len, 0);
    let mut filled = 0;
    while filled < len {
        match input.read(&mut buf[start + filled..]) {
            Ok(0) => {
                let said = if name == "stdin" {
                    "--size says"
                } else {
                    "the image is"
                };
                return Err(Error::Endpoint(format!(
                    "{name} ended after {} bytes but {said} {size}",
                    *pos + filled as u64
                )));
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Endpoint(format!("reading {name}: {e}"))),
        }
    }
    *pos += len as u64;
    if *pos == size {
        let mut extra = [0u8; 1];
        if matches!(input.read(&mut extra), Ok(n) if n > 0) {
            return Err(Error::Endpoint(format!(
                "{name} holds more than the {size} bytes of the image"
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

    fn read(&self, offset: u64, len: usize, buf: Vec<u8>) -> BoxFuture<'static, Result<Vec<u8>>> {
        call(&self.tx, |r| (offset, len, buf, r), self.name)
    }
}

enum Out {
    Write(u64, Bytes, Reply<()>),
    Flush(Reply<()>),
}

pub struct Stdout {
    name: &'static str,
    tx: mpsc::Sender<Out>,
}

impl Stdout {
    pub fn open(stream: Stream) -> Stdout {
        let (tx, rx) = mpsc::channel::<Out>();
        let name = stream.name("stdout");
        let label: &'static str = if matches!(stream, Stream::Std) {
            "stdout"
        } else {
            "pipe"
        };
        thread::spawn(move || {
            let stdout = std::io::stdout();
            let mut stream = stream;
            let mut pos = 0u64;
            for req in rx {
                match req {
                    Out::Write(offset, data, reply) => {
                        let r = if offset != pos {
                            Err(Error::Endpoint(format!(
                                "{name} write at {offset} but the stream is at {pos}"
                            )))
                        } else {
                            stream.connect().and_then(|()| {
                                let out = stream.fd().map_or(stdout.as_fd(), |fd| fd.as_fd());
                                write_all(out, &name, &data).map(|()| pos += data.len() as u64)
                            })
                        };
                        let _ = reply.send(r);
                    }
                    Out::Flush(reply) => {
                        let _ = reply.send(Ok(()));
                    }
                }
            }
        });
        Stdout { name: label, tx }
    }
}

/// Write straight to the descriptor, past Rust's line buffering.
pub(super) fn write_all(
    out: std::os::fd::BorrowedFd<'_>,
    name: &str,
    mut data: &[u8],
) -> Result<()> {
    while !data.is_empty() {
        match rustix::io::write(out, data) {
            Ok(n) => data = &data[n..],
            Err(rustix::io::Errno::INTR) => {}
            // A descriptor shared with an async reader is non-blocking: wait until the
            // socket takes more.
            Err(rustix::io::Errno::AGAIN) => {
                let mut ready = [rustix::event::PollFd::new(
                    &out,
                    rustix::event::PollFlags::OUT,
                )];
                let _ = rustix::event::poll(&mut ready, None);
            }
            Err(rustix::io::Errno::PIPE) => {
                return Err(Error::Endpoint(format!(
                    "{name} was closed by the program reading it (broken pipe)"
                )))
            }
            Err(e) => return Err(Error::Endpoint(format!("writing {name}: {e}"))),
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
        call(&self.tx, |r| Out::Write(offset, data, r), self.name)
    }

    fn zero(&self, offset: u64, len: u64, _trim: bool) -> BoxFuture<'static, Result<()>> {
        // A stream has no holes: zeros are written out.
        let (tx, name) = (self.tx.clone(), self.name);
        write_zeros(offset, len, move |at, piece| {
            call(&tx, |r| Out::Write(at, piece, r), name)
        })
    }

    fn flush(&self) -> BoxFuture<'static, Result<()>> {
        call(&self.tx, Out::Flush, self.name)
    }

    fn read(&self, _offset: u64, _len: usize) -> BoxFuture<'static, Result<Bytes>> {
        futures::future::ready(Err(Error::Usage(
            "a stream cannot be read back; drop --verify".into(),
        )))
        .boxed()
    }
}
