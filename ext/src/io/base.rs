//! A stream sink that merges a dirty transfer into a base image (`recv - --base FILE`).
//!
//! A dirty transfer carries only the ranges that changed, in increasing offset order. The
//! base holds the previous image, read once from start to end (a file, or a pipe a backup
//! tool's restore writes into). The output is the base with every received range put in
//! its place, written in order as frames come: base bytes up to the next frame, the
//! frame's bytes (the base's under it are read and dropped), and at the end the rest of
//! the base. The output is a whole image, so its content digest is computed here and
//! becomes the transfer's digest. A base shorter or longer than the image fails the
//! transfer: the output would not be the new image.

use std::io::Read;
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::thread;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;

use super::stdio::{call, write_all, Stream};
use super::{blocking, zeros, Sink, SinkCaps, PIPE};
use crate::checksum::ContentDigest;
use crate::error::{Error, Result};

/// Bytes of base read per step.
const STEP: usize = 1 << 20;

type Reply<T> = tokio::sync::oneshot::Sender<Result<T>>;

enum Op {
    Size(u64, Reply<()>),
    Write(u64, Bytes, Reply<()>),
    Zero(u64, u64, Reply<()>),
    Finish(u64, Reply<Option<[u8; 16]>>),
    Flush(Reply<()>),
}

pub struct Merge {
    tx: mpsc::Sender<Op>,
}

/// What the merging thread owns.
struct State {
    out: Stream,
    out_name: String,
    base: std::fs::File,
    base_name: String,
    /// Where the output (and the base) stand.
    pos: u64,
    /// The image's size, once the transfer is open.
    size: Option<u64>,
    digest: ContentDigest,
    buf: Vec<u8>,
}

impl Merge {
    /// Merge into the stream `target` (`-` or `pipe:PATH`) with the base `base` (a file or
    /// `pipe:PATH`, read once in order).
    pub async fn open(target: &str, base: &str) -> Result<Merge> {
        let out = if target == "-" {
            Stream::Std
        } else if let Some(path) = target.strip_prefix(PIPE) {
            let path = path.to_string();
            blocking(move || Stream::open_pipe(&path, true)).await?
        } else {
            return Err(Error::Usage(format!(
                "--base merges into a stream: the target must be '-' or 'pipe:PATH', not {target}"
            )));
        };
        let base_path = base.strip_prefix(PIPE).unwrap_or(base).to_string();
        let base_name = format!("base {base_path}");
        let shown = base_name.clone();
        let file = blocking(move || {
            std::fs::File::open(&base_path)
                .map_err(|e| Error::Endpoint(format!("cannot open {shown}: {e}")))
        })
        .await?;
        let mut state = State {
            out_name: out.name("stdout"),
            out,
            base: file,
            base_name,
            pos: 0,
            size: None,
            digest: ContentDigest::default(),
            buf: vec![0u8; STEP],
        };
        let (tx, rx) = mpsc::channel::<Op>();
        thread::Builder::new()
            .name("base-merge".into())
            .spawn(move || {
                // After a failure nothing more is written: the output is incomplete.
                let mut failed: Option<Error> = None;
                for op in rx {
                    let broken = || {
                        Err(failed.as_ref().map_or_else(
                            || Error::Endpoint("merge failed".into()),
                            |e| Error::Endpoint(e.to_string()),
                        ))
                    };
                    match op {
                        Op::Size(size, reply) => {
                            state.size = Some(size);
                            let _ = reply.send(Ok(()));
                        }
                        Op::Flush(reply) => {
                            let _ = reply.send(if failed.is_some() { broken() } else { Ok(()) });
                        }
                        Op::Write(offset, data, reply) => {
                            let r = match failed {
                                Some(_) => broken(),
                                None => state.put(offset, Some(&data), data.len() as u64),
                            };
                            failed = failed.or_else(|| r.as_ref().err().map(clone_err));
                            let _ = reply.send(r);
                        }
                        Op::Zero(offset, len, reply) => {
                            let r = match failed {
                                Some(_) => broken(),
                                None => state.put(offset, None, len),
                            };
                            failed = failed.or_else(|| r.as_ref().err().map(clone_err));
                            let _ = reply.send(r);
                        }
                        Op::Finish(size, reply) => {
                            let r = match failed {
                                Some(_) => broken().map(|()| None),
                                None => state.finish(size).map(Some),
                            };
                            failed = failed.or_else(|| r.as_ref().err().map(clone_err));
                            let _ = reply.send(r);
                        }
                    }
                }
            })
            .map_err(|e| Error::Endpoint(format!("cannot start the base merge thread: {e}")))?;
        Ok(Merge { tx })
    }
}

fn clone_err(e: &Error) -> Error {
    Error::Endpoint(e.to_string())
}

impl State {
    /// Fill `buf[..n]` from the base; fails naming the base when it ends first.
    fn read_base(&mut self, n: usize) -> Result<()> {
        let mut got = 0;
        while got < n {
            match self.base.read(&mut self.buf[got..n]) {
                Ok(0) => {
                    let at = self.pos + got as u64;
                    let size = self.size.map_or(String::new(), |s| format!(" {s}"));
                    return Err(Error::Endpoint(format!(
                        "{} ends at byte {at}, short of the image's{size} bytes: it is not the \
                         previous image; merge with the base this dirty bitmap was started on",
                        self.base_name
                    )));
                }
                Ok(k) => got += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::Endpoint(format!(
                        "reading {} at byte {}: {e}",
                        self.base_name,
                        self.pos + got as u64
                    )))
                }
            }
        }
        Ok(())
    }

    fn write_out(&mut self, data: &[u8]) -> Result<()> {
        self.out.connect()?;
        let stdout = std::io::stdout();
        let fd = self.out.fd().map_or(stdout.as_fd(), |fd| fd.as_fd());
        write_all(fd, &self.out_name, data)
    }

    /// Copy the base from `pos` up to `to`.
    fn copy_base(&mut self, to: u64) -> Result<()> {
        while self.pos < to {
            let n = (to - self.pos).min(STEP as u64) as usize;
            self.read_base(n)?;
            let data = std::mem::take(&mut self.buf);
            let written = self.write_out(&data[..n]);
            self.digest.data(&data[..n]);
            self.buf = data;
            written?;
            self.pos += n as u64;
        }
        Ok(())
    }

    /// Put a received range at `offset`: data, or `len` zeros; the base under it is read
    /// and dropped.
    fn put(&mut self, offset: u64, data: Option<&[u8]>, len: u64) -> Result<()> {
        if offset < self.pos {
            return Err(Error::Protocol(format!(
                "a frame at offset {offset} overlaps what the merge already wrote (up to {})",
                self.pos
            )));
        }
        self.copy_base(offset)?;
        let mut skip = len;
        while skip > 0 {
            let n = skip.min(STEP as u64) as usize;
            self.read_base(n)?;
            self.pos += n as u64;
            skip -= n as u64;
        }
        match data {
            Some(d) => {
                self.write_out(d)?;
                self.digest.data(d);
            }
            None => {
                let mut left = len;
                while left > 0 {
                    let piece = zeros(left.min(1 << 20) as usize);
                    self.write_out(&piece)?;
                    left -= piece.len() as u64;
                }
                self.digest.zeros(len);
            }
        }
        Ok(())
    }

    /// Copy the rest of the base, check it ends exactly at `size`, return the content
    /// digest of the whole output.
    fn finish(&mut self, size: u64) -> Result<[u8; 16]> {
        self.size = Some(size);
        self.copy_base(size)?;
        let mut one = [0u8; 1];
        loop {
            match self.base.read(&mut one) {
                Ok(0) => break,
                Ok(_) => {
                    return Err(Error::Endpoint(format!(
                        "{} is longer than the image's {size} bytes: it is not the previous \
                         image; merge with the base this dirty bitmap was started on",
                        self.base_name
                    )))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::Endpoint(format!(
                        "reading {} at its end: {e}",
                        self.base_name
                    )))
                }
            }
        }
        Ok(self.digest.value())
    }
}

impl Sink for Merge {
    fn size(&self) -> Option<u64> {
        None
    }

    fn caps(&self) -> SinkCaps {
        SinkCaps {
            sequential: true,
            ..SinkCaps::default()
        }
    }

    fn prepare(&self, size: u64) -> BoxFuture<'static, Result<()>> {
        call(&self.tx, |r| Op::Size(size, r), "base merge")
    }

    fn write(&self, offset: u64, data: Bytes) -> BoxFuture<'static, Result<()>> {
        call(&self.tx, |r| Op::Write(offset, data, r), "base merge")
    }

    fn zero(&self, offset: u64, len: u64, _trim: bool) -> BoxFuture<'static, Result<()>> {
        call(&self.tx, |r| Op::Zero(offset, len, r), "base merge")
    }

    fn flush(&self) -> BoxFuture<'static, Result<()>> {
        call(&self.tx, Op::Flush, "base merge")
    }

    fn read(&self, _offset: u64, _len: usize) -> BoxFuture<'static, Result<Bytes>> {
        futures::future::ready(Err(Error::Usage(
            "a merged stream cannot be read back; drop --verify".into(),
        )))
        .boxed()
    }

    fn finish(&self, size: u64) -> BoxFuture<'static, Result<Option<[u8; 16]>>> {
        call(&self.tx, |r| Op::Finish(size, r), "base merge")
    }

    fn merges_base(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    const SIZE: u64 = 300_000;

    fn base_file(tag: &str, len: usize) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("nbdnats-base-{tag}-{}", std::process::id()));
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(&bytes))
            .unwrap();
        path
    }

    /// Merge into a pipe whose other end a thread reads to the end.
    async fn merged(
        base: &std::path::Path,
        ops: impl FnOnce(&Merge) -> BoxFuture<'static, Result<Option<[u8; 16]>>>,
    ) -> (Result<Option<[u8; 16]>>, Vec<u8>) {
        let (mut rd, wr) = std::io::pipe().unwrap();
        let reader = std::thread::spawn(move || {
            let mut out = Vec::new();
            rd.read_to_end(&mut out).unwrap();
            out
        });
        let target = format!("pipe:/proc/self/fd/{}", wr.as_raw_fd());
        let merge = Merge::open(&target, base.to_str().unwrap()).await.unwrap();
        drop(wr); // the merge holds its own descriptor of the pipe
        let result = ops(&merge).await;
        drop(merge);
        (result, reader.join().unwrap())
    }

    #[tokio::test]
    async fn received_ranges_replace_the_base_and_the_rest_is_copied() {
        let base = base_file("ok", SIZE as usize);
        let (result, out) = merged(&base, |m| {
            let steps = vec![
                m.prepare(SIZE),
                m.write(1000, Bytes::from(vec![0xaa; 500])),
                m.zero(200_000, 70_000, false),
            ];
            let finish = m.finish(SIZE);
            async move {
                for s in steps {
                    s.await?;
                }
                finish.await
            }
            .boxed()
        })
        .await;
        let mut want: Vec<u8> = (0..SIZE as usize).map(|i| (i % 251) as u8).collect();
        want[1000..1500].fill(0xaa);
        want[200_000..270_000].fill(0);
        assert_eq!(out, want);
        let mut digest = ContentDigest::default();
        digest.data(&want);
        assert_eq!(result.unwrap(), Some(digest.value()));
        std::fs::remove_file(base).unwrap();
    }

    #[tokio::test]
    async fn a_base_of_another_size_fails_naming_it() {
        for (tag, len, why) in [
            ("short", SIZE as usize - 1, "ends at byte 299999"),
            (
                "long",
                SIZE as usize + 1,
                "is longer than the image's 300000 bytes",
            ),
        ] {
            let base = base_file(tag, len);
            let (result, _) = merged(&base, |m| {
                let (size, finish) = (m.prepare(SIZE), m.finish(SIZE));
                async move {
                    size.await?;
                    finish.await
                }
                .boxed()
            })
            .await;
            let err = result.unwrap_err().to_string();
            assert!(err.contains(&format!("base {}", base.display())), "{err}");
            assert!(err.contains(why), "{err}");
            std::fs::remove_file(base).unwrap();
        }
    }

    #[tokio::test]
    async fn an_overlapping_frame_fails_and_nothing_more_is_written() {
        let base = base_file("overlap", SIZE as usize);
        let (result, out) = merged(&base, |m| {
            let first = m.write(100, Bytes::from(vec![1; 100]));
            let second = m.write(150, Bytes::from(vec![2; 10]));
            let finish = m.finish(SIZE);
            async move {
                first.await?;
                assert!(second.await.unwrap_err().to_string().contains("overlaps"));
                finish.await
            }
            .boxed()
        })
        .await;
        assert!(result.is_err());
        assert_eq!(out.len(), 200);
        std::fs::remove_file(base).unwrap();
    }
}
