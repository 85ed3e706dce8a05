//! Local files and block devices. Extents come from SEEK_DATA/SEEK_HOLE, zeroing punches
//! holes (falling back to ZERO_RANGE, then to writing zeros), and a file target is created
//! or extended to the source size; the extended part is known to read as zeros.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use rustix::fs::{fallocate, FallocateFlags};

use super::{blocking, read_owned, zeros, Sink, SinkCaps, Source};
use crate::error::{Error, Result};
use crate::extents::{push_merged, Extent};

pub struct File {
    path: Arc<str>,
    /// Opened at once for sources and existing targets; a new target file is only
    /// created by `prepare`, so a transfer that never starts leaves nothing behind.
    file: Arc<OnceLock<std::fs::File>>,
    size: u64,
    block_device: bool,
    /// Bytes from here on are known to read as zeros (a file we created or extended).
    zero_from: Arc<AtomicU64>,
}

fn open_error(role: &str, path: &str, e: std::io::Error) -> Error {
    match e.kind() {
        ErrorKind::NotFound => Error::Endpoint(format!("{role} {path} does not exist")),
        ErrorKind::PermissionDenied => Error::Endpoint(format!("{role} {path}: permission denied")),
        _ => Error::Endpoint(format!("cannot open {role} {path}: {e}")),
    }
}

impl File {
    fn wrap(path: &str, mut file: std::fs::File, role: &str) -> Result<File> {
        let cell = OnceLock::new();
        let meta = file.metadata().map_err(|e| open_error(role, path, e))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            return Err(Error::Endpoint(format!(
                "{role} {path} is a directory; name an image file or device"
            )));
        }
        let block_device = ft.is_block_device();
        let size = if block_device {
            file.seek(SeekFrom::End(0))
                .map_err(|e| open_error(role, path, e))?
        } else {
            meta.len()
        };
        let _ = cell.set(file);
        Ok(File {
            path: path.into(),
            file: Arc::new(cell),
            size,
            block_device,
            zero_from: Arc::new(AtomicU64::new(u64::MAX)),
        })
    }

    pub fn open_source(path: &str) -> Result<File> {
        let file = std::fs::File::open(path).map_err(|e| open_error("source", path, e))?;
        File::wrap(path, file, "source")
    }

    pub fn open_sink(path: &str) -> Result<File> {
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => File::wrap(path, file, "target"),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let parent = Path::new(path)
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                if !parent.is_dir() {
                    return Err(Error::Endpoint(format!(
                        "target directory {} does not exist",
                        parent.display()
                    )));
                }
                Ok(File {
                    path: path.into(),
                    file: Arc::new(OnceLock::new()),
                    size: 0,
                    block_device: false,
                    zero_from: Arc::new(AtomicU64::new(0)),
                })
            }
            Err(e) => Err(open_error("target", path, e)),
        }
    }

    fn handle(&self) -> Result<&std::fs::File> {
        self.file
            .get()
            .ok_or_else(|| Error::Endpoint(format!("target {} was never created", self.path)))
    }

    fn io_error(&self, what: &str, offset: u64, e: std::io::Error) -> Error {
        Error::Endpoint(format!("{} {what} at offset {offset}: {e}", self.path))
    }
}

/// Allocation of `[offset, end)` by SEEK_DATA/SEEK_HOLE; all data where unsupported.
fn seek_extents(file: &std::fs::File, offset: u64, end: u64) -> Vec<Extent> {
    let all_data = vec![Extent {
        offset,
        len: end - offset,
        zero: false,
        skip: false,
    }];
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        let data = match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => end, // only a hole remains
            Err(_) => return all_data,
        };
        if data > pos {
            push_merged(
                &mut out,
                Extent {
                    offset: pos,
                    len: data.min(end) - pos,
                    zero: true,
                    skip: false,
                },
            );
        }
        if data >= end {
            break;
        }
        let hole = match rustix::fs::seek(file, rustix::fs::SeekFrom::Hole(data)) {
            Ok(h) => h.min(end),
            Err(_) => return all_data,
        };
        push_merged(
            &mut out,
            Extent {
                offset: data,
                len: hole - data,
                zero: false,
                skip: false,
            },
        );
        pos = hole;
    }
    out
}

impl Source for File {
    fn size(&self) -> u64 {
        self.size
    }

    fn extents(&self, offset: u64, len: u64) -> BoxFuture<'static, Result<Vec<Extent>>> {
        let this = self.clone_handle();
        let end = offset.saturating_add(len).min(self.size);
        blocking(move || Ok(seek_extents(this.handle()?, offset, end))).boxed()
    }

    fn read(
        &self,
        offset: u64,
        len: usize,
        mut buf: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>>> {
        let this = self.clone_handle();
        blocking(move || {
            let start = buf.len();
            buf.resize(start + len, 0);
            this.handle()?
                .read_exact_at(&mut buf[start..], offset)
                .map_err(|e| this.io_error("read", offset, e))?;
            Ok(buf)
        })
        .boxed()
    }
}

impl Sink for File {
    fn size(&self) -> Option<u64> {
        Some(self.size)
    }

    fn caps(&self) -> SinkCaps {
        SinkCaps::LOCAL
    }

    fn prepare(&self, size: u64) -> BoxFuture<'static, Result<()>> {
        let this = self.clone_handle();
        blocking(move || {
            let (path, current) = (&this.path, this.size);
            if this.file.get().is_none() {
                let created = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&*this.path)
                    .map_err(|e| open_error("target", path, e))?;
                let _ = this.file.set(created);
            }
            let file = this.handle()?;
            if this.block_device {
                if size > current {
                    return Err(Error::TargetTooSmall(format!(
                        "target device {path} holds {current} bytes but the source has {size}"
                    )));
                }
                return Ok(());
            }
            if current < size {
                file.set_len(size).map_err(|e| {
                    Error::Endpoint(format!("cannot extend target {path} to {size} bytes: {e}"))
                })?;
            }
            this.zero_from.store(current, Ordering::Relaxed);
            Ok(())
        })
        .boxed()
    }

    fn write(&self, offset: u64, data: Bytes) -> BoxFuture<'static, Result<()>> {
        let this = self.clone_handle();
        blocking(move || {
            this.handle()?
                .write_all_at(&data, offset)
                .map_err(|e| this.io_error("write", offset, e))
        })
        .boxed()
    }

    fn zero(&self, offset: u64, len: u64, _trim: bool) -> BoxFuture<'static, Result<()>> {
        let end = offset
            + len.min(
                self.zero_from
                    .load(Ordering::Relaxed)
                    .saturating_sub(offset),
            );
        if end <= offset {
            return futures::future::ready(Ok(())).boxed();
        }
        let this = self.clone_handle();
        blocking(move || {
            let len = end - offset;
            let file = this.handle()?;
            for flags in [
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
            ] {
                if fallocate(file, flags, offset, len).is_ok() {
                    return Ok(());
                }
            }
            let mut pos = offset;
            while pos < end {
                let chunk = zeros((end - pos) as usize);
                file.write_all_at(&chunk, pos)
                    .map_err(|e| this.io_error("write", pos, e))?;
                pos += chunk.len() as u64;
            }
            Ok(())
        })
        .boxed()
    }

    fn flush(&self) -> BoxFuture<'static, Result<()>> {
        let this = self.clone_handle();
        blocking(move || {
            this.handle()?
                .sync_data()
                .map_err(|e| this.io_error("flush", 0, e))
        })
        .boxed()
    }

    fn read(&self, offset: u64, len: usize) -> BoxFuture<'static, Result<Bytes>> {
        read_owned(self, offset, len)
    }
}

impl File {
    fn clone_handle(&self) -> File {
        File {
            path: self.path.clone(),
            file: self.file.clone(),
            size: self.size,
            block_device: self.block_device,
            zero_from: self.zero_from.clone(),
        }
    }
}
