//! Sources and sinks: one table of operations, one backend per file (as nbdcopy does).
//!
//! Every call starts its I/O when it is made, not when the returned future is first polled,
//! so requests reach ordered backends (stdin, stdout) in call order.

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;

use crate::error::{Error, Result};
use crate::extents::Extent;

pub mod base;
pub mod file;
pub mod nbd;
pub mod null;
pub mod pattern;
pub mod stdio;

/// What a sink can do; sent to the sender in the handshake reply.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SinkCaps {
    pub can_zero: bool,
    pub can_fast_zero: bool,
    pub can_trim: bool,
    pub can_flush: bool,
    /// Can be read back for `--verify`.
    pub can_read: bool,
    /// Every byte is written in offset order (stdout): zeros must be written out.
    pub sequential: bool,
    /// Writes must cover whole blocks of this many bytes (an NBD server's minimum block
    /// size; 0 or 1: any). The receiver cuts chunks to a multiple of it, so that frames
    /// of data share no block and are written without read-modify-write.
    #[serde(default)]
    pub min_block: u64,
}

impl SinkCaps {
    /// A local target that does everything at once, in any order (a file, a device).
    pub const LOCAL: SinkCaps = SinkCaps {
        can_zero: true,
        can_fast_zero: true,
        can_trim: true,
        can_flush: true,
        can_read: true,
        sequential: false,
        min_block: 0,
    };
}

pub trait Source: Send + Sync {
    fn size(&self) -> u64;
    /// Allocation of `[offset, offset+len)`; may describe less, never more.
    fn extents(&self, offset: u64, len: u64) -> BoxFuture<'static, Result<Vec<Extent>>>;
    /// Read `len` bytes at `offset`, appended to what `buf` already holds (the sender puts
    /// the frame header's room there, so the buffer is sent as it is). The caller owns the
    /// buffer: the sender's come from a pool and go back to it.
    fn read(&self, offset: u64, len: usize, buf: Vec<u8>) -> BoxFuture<'static, Result<Vec<u8>>>;
}

pub trait Sink: Send + Sync {
    /// `None` when the sink has no fixed size (a stream).
    fn size(&self) -> Option<u64>;
    fn caps(&self) -> SinkCaps;
    /// Make room for `size` bytes (create or extend a file) or fail if the sink is smaller.
    fn prepare(&self, size: u64) -> BoxFuture<'static, Result<()>>;
    fn write(&self, offset: u64, data: Bytes) -> BoxFuture<'static, Result<()>>;
    /// Make the range read as zeros; `trim` allows discarding instead (contents undefined).
    fn zero(&self, offset: u64, len: u64, trim: bool) -> BoxFuture<'static, Result<()>>;
    /// Every completed write is durable when this returns.
    fn flush(&self) -> BoxFuture<'static, Result<()>>;
    /// Read back for verification.
    fn read(&self, offset: u64, len: usize) -> BoxFuture<'static, Result<Bytes>>;
    /// Every frame of a `size`-byte image is written: a sink that merges a base
    /// (`base::Merge`) writes the rest of it and returns the content digest of all it
    /// wrote; other sinks have nothing to do.
    fn finish(&self, _size: u64) -> BoxFuture<'static, Result<Option<[u8; 16]>>> {
        futures::future::ready(Ok(None)).boxed()
    }
    /// This sink merges a dirty transfer into a base image (`recv --base`).
    fn merges_base(&self) -> bool {
        false
    }
}

/// How an endpoint is opened: what its spec may name, how long its server may stall.
#[derive(Clone, Copy, Debug, Default)]
pub struct Access {
    /// The spec came from the local user (the command line, the API's direct calls), so an
    /// NBD URI may name local files (`tls-psk-file=`, `tls-certificates=`). Never for a
    /// spec that came in a message.
    pub allow_local_file: bool,
    /// An NBD server that answers none of the requests in flight for this long is taken
    /// for dead; `None` waits forever.
    pub stall: Option<std::time::Duration>,
}

/// The NBD URI schemes libnbd connects to.
const NBD_SCHEMES: [&str; 6] = [
    "nbd://",
    "nbds://",
    "nbd+unix://",
    "nbds+unix://",
    "nbd+vsock://",
    "nbds+vsock://",
];

pub fn is_nbd_uri(spec: &str) -> bool {
    NBD_SCHEMES.iter().any(|p| spec.starts_with(p))
}

/// The scheme of a spec that reads as a URI (`scheme://…`, the scheme a letter, then
/// letters, digits, `+`, `-` or `.`, as RFC 3986 has it) that is no NBD URI: `ftp://x`,
/// the typo `nbd+unx:///x`. `None` for NBD URIs and anything else (`./x:y`, `/a://b`).
fn foreign_scheme(spec: &str) -> Option<&str> {
    let (scheme, _) = spec.split_once("://")?;
    let mut chars = scheme.chars();
    let uri_like = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    (uri_like && !is_nbd_uri(spec)).then_some(scheme)
}

/// A spec that reads as a URI of a scheme no endpoint has, unless a file of that name
/// exists (a directory `ftp:` holds it): a usage error naming what is supported, rather
/// than "does not exist".
fn unknown_scheme(spec: &str, role: &str) -> Result<()> {
    let Some(scheme) = foreign_scheme(spec) else {
        return Ok(());
    };
    if std::fs::symlink_metadata(spec).is_ok() {
        return Ok(());
    }
    let streams = if role == "target" {
        "-, pipe:PATH, unix:PATH, null:"
    } else {
        "-, pipe:PATH"
    };
    Err(Error::Usage(format!(
        "unknown scheme '{scheme}' in URI {}: use {}, {streams}, or a file path",
        crate::conn::redact_servers(spec),
        NBD_SCHEMES.join(", "),
    )))
}

/// The prefix of a pipe endpoint (`pipe:PATH`): a FIFO or an inherited pipe, read or
/// written as a stream in offset order.
pub const PIPE: &str = "pipe:";
/// A sink that connects to a listening unix stream socket when the first data comes and
/// writes the stream into it (a QEMU migration socket): `unix:PATH`.
pub const UNIX: &str = "unix:";

/// Open a source: an NBD URI, `-` (stdin) or `pipe:PATH` (both need `size`), or a file or
/// block device. With `dirty_bitmap` only an NBD export offering that bitmap will do: its
/// extents mark what the bitmap does not as unchanged (a dirty transfer).
pub async fn open_source(
    spec: &str,
    size: Option<u64>,
    access: Access,
    dirty_bitmap: Option<&str>,
) -> Result<Arc<dyn Source>> {
    if let Some(bitmap) = dirty_bitmap {
        if !is_nbd_uri(spec) {
            return Err(Error::Usage(format!(
                "--dirty-bitmap {bitmap} needs an NBD source (qemu-nbd -B {bitmap}, or a qcow2 \
                 file holding that bitmap); {} has no dirty bitmap",
                crate::conn::redact_servers(spec)
            )));
        }
        return Ok(Arc::new(nbd::Nbd::open_dirty(spec, access, bitmap).await?));
    }
    if spec == "-" || spec.starts_with(PIPE) {
        let size = size.ok_or_else(|| {
            Error::Usage(format!(
                "reading an image from {spec} needs its size: pass --size BYTES"
            ))
        })?;
        let stream = match spec.strip_prefix(PIPE) {
            Some(path) => {
                let path = path.to_string();
                blocking(move || stdio::Stream::open_pipe(&path, false)).await?
            }
            None => stdio::Stream::Std,
        };
        return Ok(Arc::new(stdio::Stdin::open(size, stream)));
    }
    if size.is_some() {
        return Err(Error::Usage(
            "--size applies only to streams ('-', 'pipe:PATH'); other sources know their size"
                .into(),
        ));
    }
    if is_nbd_uri(spec) {
        return Ok(Arc::new(nbd::Nbd::open(spec, "source", access).await?));
    }
    if spec.starts_with("pattern:") {
        return Ok(Arc::new(pattern::Pattern::parse(spec)?));
    }
    unknown_scheme(spec, "source")?;
    let spec = spec.to_string();
    blocking(move || file::File::open_source(&spec))
        .await
        .map(|f| Arc::new(f) as Arc<dyn Source>)
}

/// Open a sink: an NBD URI, `-` (stdout), `pipe:PATH`, `unix:PATH`, `null:` or the null
/// device (discard), or a file or block device.
pub async fn open_sink(spec: &str, access: Access) -> Result<Arc<dyn Sink>> {
    if spec == "-" {
        return Ok(Arc::new(stdio::Stdout::open(stdio::Stream::Std)));
    }
    if let Some(path) = spec.strip_prefix(PIPE) {
        let path = path.to_string();
        let stream = blocking(move || stdio::Stream::open_pipe(&path, true)).await?;
        return Ok(Arc::new(stdio::Stdout::open(stream)));
    }
    if let Some(path) = spec.strip_prefix(UNIX) {
        let stream = stdio::Stream::UnixLater {
            path: path.to_string(),
            on_connect: None,
        };
        return Ok(Arc::new(stdio::Stdout::open(stream)));
    }
    if spec == "null:" || null::is_null_device(spec) {
        return Ok(Arc::new(null::Null));
    }
    if is_nbd_uri(spec) {
        let nbd = nbd::Nbd::open(spec, "target", access).await?;
        if nbd.read_only() {
            return Err(Error::Endpoint(format!(
                "NBD target {spec} is read-only; export it writable"
            )));
        }
        return Ok(Arc::new(nbd));
    }
    unknown_scheme(spec, "target")?;
    let spec = spec.to_string();
    blocking(move || file::File::open_sink(&spec))
        .await
        .map(|f| Arc::new(f) as Arc<dyn Sink>)
}

/// Run blocking work on tokio's blocking pool.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Endpoint(format!("I/O task failed: {e}")))?
}

/// The extents of a source that has no holes (a stream, a pattern): all data, to its end.
pub fn all_data(offset: u64, len: u64, size: u64) -> BoxFuture<'static, Result<Vec<Extent>>> {
    let len = len.min(size.saturating_sub(offset));
    futures::future::ready(Ok(vec![Extent {
        offset,
        len,
        zero: false,
        skip: false,
    }]))
    .boxed()
}

/// Zero `[offset, offset+len)` by writing zeros through `write`, a bounded piece at a time,
/// for sinks without a cheaper way (streams, NBD servers without write-zeroes).
pub fn write_zeros(
    offset: u64,
    len: u64,
    mut write: impl FnMut(u64, Bytes) -> BoxFuture<'static, Result<()>>,
) -> BoxFuture<'static, Result<()>> {
    let mut parts = Vec::new();
    let mut pos = offset;
    while pos < offset + len {
        let piece = zeros((offset + len - pos) as usize);
        let n = piece.len() as u64;
        parts.push(write(pos, piece));
        pos += n;
    }
    async move {
        for p in parts {
            p.await?;
        }
        Ok(())
    }
    .boxed()
}

/// One read into a buffer of its own (a sink's read-back for `--verify`, the digest's reads).
pub fn read_owned(
    source: &dyn Source,
    offset: u64,
    len: usize,
) -> BoxFuture<'static, Result<Bytes>> {
    source
        .read(offset, len, Vec::with_capacity(len))
        .map(|r| r.map(Bytes::from))
        .boxed()
}

/// A shared buffer of zeros for sinks that must write zeros out.
pub fn zeros(len: usize) -> Bytes {
    static ZEROS: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    const MAX: usize = 1 << 20;
    ZEROS
        .get_or_init(|| Bytes::from(vec![0u8; MAX]))
        .slice(..len.min(MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_uri_like_specs_of_other_schemes_are_foreign() {
        assert_eq!(foreign_scheme("nbd+unx:///d?socket=/s"), Some("nbd+unx"));
        assert_eq!(foreign_scheme("ftp://host/x"), Some("ftp"));
        assert_eq!(foreign_scheme("s3.x-y://b"), Some("s3.x-y"));
        for spec in [
            "nbd://h/d",
            "nbds+unix:///d?socket=/s",
            "/tmp/a://b",
            "./x:y",
            "x:y",
            "1ftp://x",
            "://x",
            "a b://x",
            "disk.img",
        ] {
            assert_eq!(foreign_scheme(spec), None, "{spec}");
        }
    }
}
