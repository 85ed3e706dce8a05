//! `pattern:SIZE` — a source with no I/O: every read is a copy of one pre-filled, non-zero
//! buffer. It measures the raw NATS ceiling of the transport (`bench/`); the copy stands in
//! for the copy the kernel makes when an NBD read lands in our buffer.

use futures::future::BoxFuture;
use futures::FutureExt;

use super::{all_data, Source};
use crate::conn::MAX_CHUNK;
use crate::error::{Error, Result};
use crate::extents::Extent;

pub struct Pattern {
    size: u64,
    fill: Vec<u8>,
}

impl Pattern {
    pub fn parse(spec: &str) -> Result<Pattern> {
        let size = spec
            .strip_prefix("pattern:")
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| Error::Usage(format!("invalid source {spec:?}: use pattern:BYTES")))?;
        // Bytes 1..=251 repeating: never all-zero, so no chunk is sent as a zero frame. No
        // read is longer than the image or a chunk, so the fill need not be either.
        let len = (size.min(MAX_CHUNK) as usize).max(251);
        let fill = (1..=251u8).cycle().take(len).collect();
        Ok(Pattern { size, fill })
    }
}

impl Source for Pattern {
    fn size(&self) -> u64 {
        self.size
    }

    fn extents(&self, offset: u64, len: u64) -> BoxFuture<'static, Result<Vec<Extent>>> {
        all_data(offset, len, self.size)
    }

    fn read(
        &self,
        _offset: u64,
        len: usize,
        mut buf: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>>> {
        let end = buf.len() + len;
        while buf.len() < end {
            let n = self.fill.len().min(end - buf.len());
            buf.extend_from_slice(&self.fill[..n]);
        }
        futures::future::ready(Ok(buf)).boxed()
    }
}
