//! `null:` — a sink that discards everything (benchmarks, dry runs), like nbdcopy's. The
//! null device (`/dev/null`, or any name for it) is the same sink, as with nbdcopy: it
//! takes writes of any size and keeps nothing.

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;

use super::{Sink, SinkCaps};
use crate::error::{Error, Result};

pub struct Null;

/// Whether `path` names the null device (the character device `/dev/null` is).
pub fn is_null_device(path: &str) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let (Ok(this), Ok(null)) = (std::fs::metadata(path), std::fs::metadata("/dev/null")) else {
        return false;
    };
    this.file_type().is_char_device()
        && null.file_type().is_char_device()
        && this.rdev() == null.rdev()
}

fn ok() -> BoxFuture<'static, Result<()>> {
    futures::future::ready(Ok(())).boxed()
}

impl Sink for Null {
    fn size(&self) -> Option<u64> {
        None
    }
    fn caps(&self) -> SinkCaps {
        // Nothing to read back: what was written is gone.
        SinkCaps {
            can_read: false,
            ..SinkCaps::LOCAL
        }
    }
    fn prepare(&self, _size: u64) -> BoxFuture<'static, Result<()>> {
        ok()
    }
    fn write(&self, _offset: u64, _data: Bytes) -> BoxFuture<'static, Result<()>> {
        ok()
    }
    fn zero(&self, _offset: u64, _len: u64, _trim: bool) -> BoxFuture<'static, Result<()>> {
        ok()
    }
    fn flush(&self) -> BoxFuture<'static, Result<()>> {
        ok()
    }
    fn read(&self, _offset: u64, _len: usize) -> BoxFuture<'static, Result<Bytes>> {
        futures::future::ready(Err(Error::Usage(
            "null: cannot be read back; drop --verify".into(),
        )))
        .boxed()
    }
}
