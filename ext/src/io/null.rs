//! `null:` — a sink that discards everything (benchmarks, dry runs), like nbdcopy's.

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;

use super::{Sink, SinkCaps};
use crate::error::{Error, Result};

pub struct Null;

fn ok() -> BoxFuture<'static, Result<()>> {
    futures::future::ready(Ok(())).boxed()
}

impl Sink for Null {
    fn size(&self) -> Option<u64> {
        None
    }
    fn caps(&self) -> SinkCaps {
        SinkCaps {
            can_zero: true,
            can_fast_zero: true,
            can_trim: true,
            can_flush: true,
            can_read: false,
            sequential: false,
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
