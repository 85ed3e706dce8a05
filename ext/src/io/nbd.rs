//! NBD backend: one thread owns the libnbd handle and keeps up to `DEPTH` commands in
//! flight on its connection, so reads and writes are pipelined rather than one round trip
//! each. Callers talk to it over a channel and await a oneshot reply.
//!
//! Requests obey the server's block size constraints, as nbdcopy's do: offsets and lengths
//! are multiples of its minimum block size (a compressing qemu-nbd asks 64 KiB) and reads
//! and writes are cut at its maximum. Callers may ask for any range: a read reads the
//! blocks around it; the parts of a block that several writes or zeroings cover are
//! gathered and the block written once, whole, or, when the rest does not come, read,
//! patched and written (read-modify-write, one at a time per block). An export
//! whose size is not a multiple of the minimum ends in a partial block, which is asked for
//! as it is; a server that refuses it is reported as such.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::oneshot;

use super::{read_owned, write_zeros, zeros, Access, Sink, SinkCaps, Source};
use crate::error::{Error, Result};
use crate::extents::{from_block_status, with_dirty, Extent};
use crate::libnbd::{
    list_dirty_bitmaps, list_exports, Caps, Command, Completed, ConnectError, Handle,
};

/// Commands in flight per connection; like nbdcopy's default request depth.
const DEPTH: usize = 16;
/// How long one poll waits before the worker checks whether it is being shut down.
const POLL_MS: i32 = 500;
/// The largest minimum block size the NBD protocol allows.
const MAX_MIN_BLOCK: u64 = 64 << 10;
/// The request size used when the server names no maximum: "some NBD servers will abruptly
/// disconnect if a transaction involves more than 32M" (libnbd).
const DEFAULT_MAX_REQUEST: u64 = 32 << 20;
/// libnbd's own limit on one read or write.
const LIBNBD_MAX_REQUEST: u64 = 64 << 20;
/// Locks serialising read-modify-writes of blocks, by block number modulo this.
const RMW_LOCKS: usize = 64;
/// How long the first part of a block waits for the rest before it is read-modify-written.
const GATHER_WAIT: Duration = Duration::from_millis(250);
/// How long a server that has no such export may take to list the exports it has.
const LIST_WAIT: Duration = Duration::from_secs(5);
/// At most this many of a server's exports are named in a message.
const EXPORTS_SHOWN: usize = 10;

/// A command for the worker and where its outcome goes.
type Request = (Command, Reply);
type Reply = oneshot::Sender<Result<Completed, String>>;

/// A connection to one NBD export; clones share the connection.
#[derive(Clone)]
pub struct Nbd {
    inner: Arc<Inner>,
}

struct Inner {
    uri: String,
    /// "source" or "target", for messages.
    role: &'static str,
    size: u64,
    caps: Caps,
    blocks: Blocks,
    /// Two read-modify-writes of one block must not interleave, or one undoes the other.
    rmw: Vec<tokio::sync::Mutex<()>>,
    /// Partial blocks whose other parts are awaited, by block start.
    gathering: std::sync::Mutex<HashMap<u64, Partial>>,
    tx: mpsc::Sender<Request>,
    /// Still worth asking for fast zeroing (cleared after the server refuses it once).
    fast_zero: AtomicBool,
    /// Set when the last clone is dropped: the worker abandons what is still in flight.
    closed: Arc<AtomicBool>,
}

/// The server's block size constraints as this client obeys them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Blocks {
    /// Every offset and length is a multiple of this (1 when the server names none).
    min: u64,
    /// No read or write is longer than this; a multiple of `min`.
    max: u64,
    /// The export's size: a request may end here even when it is not a multiple of `min`.
    size: u64,
}

impl Blocks {
    fn new(caps: &Caps, size: u64) -> std::result::Result<Blocks, String> {
        let min = caps.block_min.max(1);
        if !min.is_power_of_two() || min > MAX_MIN_BLOCK {
            return Err(format!(
                "the server advertises a minimum block size of {min} bytes, not a power of \
                 two up to {MAX_MIN_BLOCK}"
            ));
        }
        let max = match caps.block_max {
            0 => DEFAULT_MAX_REQUEST,
            m => m.min(LIBNBD_MAX_REQUEST),
        } / min
            * min;
        if max == 0 {
            return Err(format!(
                "the server advertises a maximum request of {} bytes, below its minimum \
                 block size of {min}",
                caps.block_max
            ));
        }
        Ok(Blocks { min, max, size })
    }

    fn down(&self, x: u64) -> u64 {
        x / self.min * self.min
    }

    /// The end of the block holding `x`.
    fn block_end(&self, x: u64) -> u64 {
        (self.down(x) + self.min).min(self.size)
    }

    /// Where a request may start or end: block boundaries and the export's end.
    fn boundary(&self, x: u64) -> bool {
        x % self.min == 0 || x == self.size
    }

    /// `[start, end)` (both boundaries) cut into requests of at most `max` bytes.
    fn split(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> {
        let max = self.max;
        (start..end)
            .step_by(usize::try_from(max).unwrap_or(usize::MAX))
            .map(move |o| (o, max.min(end - o)))
    }

    /// Cut a write or zeroing of `[offset, end)` into the partial block at its head, the
    /// whole blocks between (`[start, end)`, possibly empty) and the partial block at its
    /// tail. A partial block is `(block start, block end)`.
    fn cut(&self, offset: u64, end: u64) -> Cut {
        let mut cut = Cut {
            head: None,
            whole: (offset, end),
            tail: None,
        };
        if !self.boundary(offset) {
            let block = (self.down(offset), self.block_end(offset));
            cut.head = Some(block);
            if end <= block.1 {
                cut.whole = (end, end);
                return cut;
            }
            cut.whole.0 = block.1;
        }
        if !self.boundary(end) {
            let block = (self.down(end), self.block_end(end));
            cut.tail = Some(block);
            cut.whole.1 = block.0;
        }
        cut
    }

    /// Whether `[offset, end)` touches the export's final block when that is partial.
    fn in_partial_tail(&self, offset: u64, end: u64) -> bool {
        self.size % self.min != 0 && end > self.down(self.size) && offset < self.size
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Cut {
    head: Option<(u64, u64)>,
    whole: (u64, u64),
    tail: Option<(u64, u64)>,
}

impl Nbd {
    /// Connect to `uri`, the `role` ("source" or "target") it plays.
    pub async fn open(uri: &str, role: &'static str, access: Access) -> Result<Nbd> {
        Nbd::connect(uri, role, access, None).await
    }

    /// Connect to `uri` as a source whose extents say what dirty bitmap `bitmap` marks
    /// unchanged (`Extent::skip`). An export that does not offer it is refused, naming the
    /// bitmaps it offers, or saying how to add one.
    pub async fn open_dirty(uri: &str, access: Access, bitmap: &str) -> Result<Nbd> {
        let nbd = Nbd::connect(uri, "source", access, Some(bitmap.to_string())).await?;
        if nbd.inner.caps.has_dirty {
            return Ok(nbd);
        }
        let (list_uri, allow) = (uri.to_string(), access.allow_local_file);
        let offered =
            tokio::task::spawn_blocking(move || list_dirty_bitmaps(&list_uri, allow, LIST_WAIT))
                .await
                .ok()
                .flatten();
        Err(Error::Usage(missing_bitmap(&nbd.name(), bitmap, offered)))
    }

    async fn connect(
        uri: &str,
        role: &'static str,
        access: Access,
        bitmap: Option<String>,
    ) -> Result<Nbd> {
        let allow_local_file = access.allow_local_file;
        let (ready_tx, ready_rx) = oneshot::channel();
        let (tx, rx) = mpsc::channel::<Request>();
        let closed = Arc::new(AtomicBool::new(false));
        let worker_closed = closed.clone();
        let worker_uri = uri.to_string();
        thread::Builder::new()
            .name("nbd-io".into())
            .spawn(move || {
                let connected = Handle::connect(
                    &worker_uri,
                    allow_local_file,
                    access.stall,
                    bitmap.as_deref(),
                )
                .and_then(|h| Ok((h.size()?, h.caps(), h)));
                match connected {
                    Ok((size, caps, handle)) => {
                        let _ = ready_tx.send(Ok((size, caps)));
                        run(handle, rx, &worker_closed, access.stall);
                    }
                    Err(e) => {
                        // The server answered, but has no such export: ask what it has.
                        let exports = no_such_export(&e)
                            .then(|| list_exports(&worker_uri, allow_local_file, LIST_WAIT))
                            .flatten();
                        let _ = ready_tx.send(Err((e, exports)));
                    }
                }
            })
            .map_err(|e| Error::Endpoint(format!("cannot start NBD thread: {e}")))?;
        let (size, caps) = ready_rx
            .await
            .map_err(|_| {
                Error::Endpoint(format!("NBD {role} {uri}: connection ended during setup"))
            })?
            .map_err(|(e, exports)| {
                Error::Endpoint(connect_error(role, uri, &e, exports, allow_local_file))
            })?;
        let blocks = Blocks::new(&caps, size)
            .map_err(|e| Error::Endpoint(format!("NBD {role} {uri}: {e}")))?;
        let fast_zero = AtomicBool::new(caps.can_fast_zero);
        Ok(Nbd {
            inner: Arc::new(Inner {
                uri: uri.to_string(),
                role,
                size,
                caps,
                blocks,
                rmw: (0..RMW_LOCKS)
                    .map(|_| tokio::sync::Mutex::new(()))
                    .collect(),
                gathering: std::sync::Mutex::new(HashMap::new()),
                tx,
                fast_zero,
                closed,
            }),
        })
    }

    pub fn read_only(&self) -> bool {
        self.inner.caps.read_only
    }

    /// What to call this endpoint in a message: "NBD source nbd://…".
    fn name(&self) -> String {
        format!("NBD {} {}", self.inner.role, self.inner.uri)
    }

    /// Send one request as it is: the callers below align it.
    fn command(&self, cmd: Command) -> BoxFuture<'static, Result<Completed>> {
        let span = match &cmd {
            Command::Read { offset, len, .. } => Some((*offset, *offset + *len as u64)),
            Command::Write { offset, data } => Some((*offset, *offset + data.len() as u64)),
            Command::Zero { offset, len, .. } | Command::Trim { offset, len } => {
                Some((*offset, *offset + *len))
            }
            Command::Flush | Command::BlockStatus { .. } => None,
        };
        let (tx, rx) = oneshot::channel();
        let sent = self.inner.tx.send((cmd, tx));
        let name = self.name();
        let blocks = self.inner.blocks;
        async move {
            sent.map_err(|_| Error::Endpoint(format!("{name}: the connection is closed")))?;
            rx.await
                .map_err(|_| Error::Endpoint(format!("{name}: the connection was lost")))?
                .map_err(|e| {
                    let hint = match span {
                        Some((o, end)) if blocks.in_partial_tail(o, end) => format!(
                            " (its size, {}, is not a multiple of its minimum block size \
                             {}: the server refuses its last {} bytes)",
                            blocks.size,
                            blocks.min,
                            blocks.size % blocks.min
                        ),
                        _ => String::new(),
                    };
                    Error::Endpoint(format!("{name}: {e}{hint}"))
                })
        }
        .boxed()
    }

    fn done(&self, cmd: Command) -> BoxFuture<'static, Result<()>> {
        self.command(cmd).map(|r| r.map(|_| ())).boxed()
    }

    /// Read `[offset, offset+len)` appended to `buf`: one request when it is aligned and
    /// small enough, otherwise the whole blocks around it in requests of at most the
    /// maximum, copied out.
    fn read_range(
        &self,
        offset: u64,
        len: usize,
        mut buf: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>>> {
        let b = self.inner.blocks;
        let end = offset.saturating_add(len as u64);
        if end > b.size {
            let msg = format!(
                "{}: read of {len} bytes at {offset} is past its end",
                self.name()
            );
            return futures::future::ready(Err(Error::Endpoint(msg))).boxed();
        }
        if b.boundary(offset) && b.boundary(end) && len as u64 <= b.max {
            // libnbd reads straight into the buffer's spare capacity, not zeroed first.
            return self
                .command(Command::Read { offset, buf, len })
                .map(|r| match r? {
                    Completed::Read(buf) => Ok(buf),
                    _ => Err(Error::Endpoint("NBD read returned no buffer".into())),
                })
                .boxed();
        }
        let start = b.down(offset);
        let stop = if b.boundary(end) {
            end
        } else {
            b.block_end(end)
        };
        let parts: Vec<_> = b
            .split(start, stop)
            .map(|(at, n)| (at, self.read_range(at, n as usize, Vec::new())))
            .collect();
        async move {
            buf.reserve(len);
            for (at, part) in parts {
                let part = part.await?;
                let lo = offset.max(at);
                let hi = end.min(at + part.len() as u64);
                if lo < hi {
                    buf.extend_from_slice(&part[(lo - at) as usize..(hi - at) as usize]);
                }
            }
            Ok(buf)
        }
        .boxed()
    }

    /// Write the whole blocks `[offset, offset+data.len())` in requests of at most the maximum.
    fn write_whole(&self, offset: u64, data: Bytes) -> BoxFuture<'static, Result<()>> {
        let parts: Vec<_> = self
            .inner
            .blocks
            .split(offset, offset + data.len() as u64)
            .map(|(at, n)| {
                let lo = (at - offset) as usize;
                self.done(Command::Write {
                    offset: at,
                    data: data.slice(lo..lo + n as usize),
                })
            })
            .collect();
        all(parts).boxed()
    }

    /// Put `patch` at `at` inside the block `[start, end)`. Frames come in offset order, so
    /// the rest of the block usually comes with the next write (or zeroing): the parts are
    /// gathered and the block is written once, whole, without reading it (a qcow2 cluster
    /// behind qemu's compress driver can be written only once). When the rest does not
    /// come within `GATHER_WAIT`, the block is read, patched with what came, and written
    /// (read-modify-write), holding the block's lock. Every part's future ends with the
    /// block's write.
    fn patch_block(
        &self,
        (start, end): (u64, u64),
        at: u64,
        patch: Bytes,
    ) -> BoxFuture<'static, Result<()>> {
        let (tx, mut rx) = oneshot::channel();
        let whole = {
            let mut gathering = self.gathering();
            let n = (end - start) as usize;
            let part = gathering.entry(start).or_insert_with(|| Partial {
                buf: vec![0; n],
                filled: Vec::new(),
                waiters: Vec::new(),
            });
            let lo = (at - start) as usize;
            part.buf[lo..lo + patch.len()].copy_from_slice(&patch);
            part.fill(lo, lo + patch.len());
            part.waiters.push(tx);
            if part.filled == [(0, n)] {
                gathering.remove(&start)
            } else {
                None
            }
        };
        if let Some(part) = whole {
            // Whole: write it (the command is sent now) and answer every part, even if
            // this future is dropped, so no part is left without its outcome.
            let write = self.done(Command::Write {
                offset: start,
                data: Bytes::from(part.buf),
            });
            tokio::spawn(async move { settle(part.waiters, write.await) });
        }
        let this = self.clone();
        async move {
            if let Ok(r) = tokio::time::timeout(GATHER_WAIT, &mut rx).await {
                return r.map_err(|_| this.lost())?.map_err(Error::Endpoint);
            }
            // The rest did not come: write what did. (Unless another part already took
            // the block; then its write answers this one too.)
            if let Some(part) = this.gathering().remove(&start) {
                tokio::spawn(this.clone().read_modify_write((start, end), part));
            }
            rx.await.map_err(|_| this.lost())?.map_err(Error::Endpoint)
        }
        .boxed()
    }

    /// Write the parts of block `[start, end)` that came into it as it is, holding the
    /// block's lock, and answer every part.
    async fn read_modify_write(self, (start, end): (u64, u64), part: Partial) {
        let stripe = ((start / self.inner.blocks.min) % RMW_LOCKS as u64) as usize;
        let _held = self.inner.rmw[stripe].lock().await;
        let n = (end - start) as usize;
        let written = match self.read_range(start, n, Vec::with_capacity(n)).await {
            Ok(mut block) => {
                for &(lo, hi) in &part.filled {
                    block[lo..hi].copy_from_slice(&part.buf[lo..hi]);
                }
                self.done(Command::Write {
                    offset: start,
                    data: Bytes::from(block),
                })
                .await
            }
            Err(e) => Err(e),
        };
        settle(part.waiters, written);
    }

    fn gathering(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Partial>> {
        self.inner
            .gathering
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lost(&self) -> Error {
        Error::Endpoint(format!(
            "{}: a partial block's write was abandoned",
            self.name()
        ))
    }

    /// Zero whole blocks `[offset, offset+len)` the cheapest way the server offers.
    fn zero_whole(&self, offset: u64, len: u64, trim: bool) -> BoxFuture<'static, Result<()>> {
        if len == 0 {
            return futures::future::ready(Ok(())).boxed();
        }
        if trim && self.inner.caps.can_trim {
            return self.done(Command::Trim { offset, len });
        }
        if !self.inner.caps.can_zero {
            let this = self.clone();
            return write_zeros(offset, len, move |at, data| this.write_whole(at, data));
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

    fn out_of_bounds(&self, what: &str, offset: u64, len: u64) -> Option<Error> {
        (offset.checked_add(len)? > self.inner.size).then(|| {
            Error::Endpoint(format!(
                "{}: {what} of {len} bytes at {offset} is past its end ({} bytes)",
                self.name(),
                self.inner.size
            ))
        })
    }
}

/// Whether a connection failed because the server has no export of the URI's name.
/// The one line for an export without the dirty bitmap asked for: the ones it offers, or
/// how to add one when it offers none (or cannot say).
fn missing_bitmap(name: &str, bitmap: &str, offered: Option<Vec<String>>) -> String {
    match offered.filter(|o| !o.is_empty()) {
        Some(names) => format!(
            "{name} offers no dirty bitmap '{bitmap}'; it offers: {}",
            shown_names(&names)
        ),
        None => format!(
            "{name} offers no dirty bitmap '{bitmap}' (it offers none); add one with \
             `qemu-img bitmap --add FILE {bitmap}` and export it with `qemu-nbd -B {bitmap}`, \
             or with QEMU's block-export-add \"bitmaps\": [\"{bitmap}\"]"
        ),
    }
}

fn no_such_export(e: &ConnectError) -> bool {
    e.message.contains("server has no export named")
}

/// A connection failure, with what to do about it: start the server, fix the export name
/// (from the exports the server lists, when it does), fix the TLS parameters, or give a
/// URI that names local files only where that is allowed.
fn connect_error(
    role: &str,
    uri: &str,
    e: &ConnectError,
    exports: Option<Vec<String>>,
    allow_local_file: bool,
) -> String {
    let hint = connect_hint(uri, e, exports, allow_local_file);
    format!("cannot connect to NBD {role} {uri}: {}{hint}", e.message)
}

fn connect_hint(
    uri: &str,
    e: &ConnectError,
    exports: Option<Vec<String>>,
    allow_local_file: bool,
) -> String {
    let msg = e.message.as_str();
    let tls = uri.starts_with("nbds");
    if !allow_local_file && msg.contains("local file") {
        return "; only an endpoint the local user gives (on the command line, or with \
                allow_local_file in the API) may name local files, never one from a ctl message"
            .into();
    }
    if no_such_export(e) {
        return match exports {
            Some(names) => format!("; the server's exports are {}", shown_names(&names)),
            None => "; check the export name (the URI's path)".into(),
        };
    }
    if msg.contains("server requires TLS") {
        return "; the server requires TLS: use nbds:// or nbds+unix:// with tls-psk-file= \
                or tls-certificates="
            .into();
    }
    if msg.contains("server refused TLS") {
        return "; the server does not offer TLS: use nbd:// or nbd+unix://, or start the \
                server with TLS"
            .into();
    }
    if tls && (msg.contains("gnutls") || msg.contains("PSK") || msg.contains("psk")) {
        return "; check the URI's TLS parameters (tls-psk-file=, the user name, \
                tls-certificates=) against the server's"
            .into();
    }
    let at = server_address(uri);
    match e.errno {
        libc::ENOENT | libc::ECONNREFUSED if msg.contains("connect:") => {
            format!("; is the NBD server running at {at}?")
        }
        libc::EACCES if msg.contains("connect:") => {
            format!("; this user may not connect to {at}: check the socket's permissions")
        }
        libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ETIMEDOUT => {
            format!("; is {at} reachable from here?")
        }
        _ if msg.contains("getaddrinfo") => "; check the host name in the URI".into(),
        _ => String::new(),
    }
}

/// Where an NBD URI's server is, for a message: the unix socket's path, or host:port
/// (the port defaults to 10809).
fn server_address(uri: &str) -> String {
    let (scheme, rest) = uri.split_once("://").unwrap_or(("", uri));
    if scheme.ends_with("+unix") {
        let query = rest.split('#').next().unwrap_or("");
        let socket = query.split_once('?').and_then(|(_, q)| {
            q.split(['&', ';'])
                .filter_map(|p| p.strip_prefix("socket="))
                .next_back()
        });
        return match socket {
            Some(path) => format!("socket {}", percent_decode(path)),
            None => "its socket".into(),
        };
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let has_port = match host.rfind(']') {
        Some(end) => host[end..].contains(':'),
        None => host.contains(':'),
    };
    if has_port {
        host.to_string()
    } else {
        format!("{host}:10809")
    }
}

/// `%XX` escapes decoded, as libnbd reads a URI's query values.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Export names a server gave, for one line: control characters replaced, each bounded,
/// at most `EXPORTS_SHOWN` of them; the default export (no name) as `''`.
fn shown_names(names: &[String]) -> String {
    let one = |n: &String| -> String {
        if n.is_empty() {
            return "'' (the default export)".into();
        }
        let clean: String = n
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .take(64)
            .collect();
        if n.chars().count() > 64 {
            format!("{clean}…")
        } else {
            clean
        }
    };
    let mut shown: Vec<String> = names.iter().take(EXPORTS_SHOWN).map(one).collect();
    if names.len() > EXPORTS_SHOWN {
        shown.push(format!("… ({} more)", names.len() - EXPORTS_SHOWN));
    }
    shown.join(", ")
}

/// A block being gathered from the parts of several writes.
struct Partial {
    /// The block, as far as its parts came (zeros elsewhere).
    buf: Vec<u8>,
    /// The ranges that came, sorted and merged.
    filled: Vec<(usize, usize)>,
    /// The futures of the parts, answered when the block is written.
    waiters: Vec<oneshot::Sender<std::result::Result<(), String>>>,
}

impl Partial {
    fn fill(&mut self, lo: usize, hi: usize) {
        self.filled.push((lo, hi));
        self.filled.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(self.filled.len());
        for &(a, b) in &self.filled {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        self.filled = merged;
    }
}

/// Answer every part of a block with the outcome of its write.
fn settle(waiters: Vec<oneshot::Sender<std::result::Result<(), String>>>, written: Result<()>) {
    let shared = written.map_err(|e| e.to_string());
    for w in waiters {
        let _ = w.send(shared.clone());
    }
}

/// Run the futures together; the first failure wins.
async fn all(parts: Vec<BoxFuture<'static, Result<()>>>) -> Result<()> {
    futures::future::try_join_all(parts).await.map(|_| ())
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}

/// The worker loop: fill up to DEPTH commands, poll, hand back whatever completed. When
/// commands are in flight and the server answers none of them for `stall`, it is taken
/// for dead (stopped, hung, or gone without a word): every command fails and the
/// connection ends, rather than waiting forever.
fn run(
    mut handle: Handle,
    rx: mpsc::Receiver<Request>,
    closed: &AtomicBool,
    stall: Option<Duration>,
) {
    let mut waiting: HashMap<u64, Reply> = HashMap::new();
    let mut disconnected = false;
    // The last answer from the server, or when it was last asked with nothing in flight.
    let mut heard = Instant::now();
    loop {
        while waiting.len() < DEPTH && !disconnected {
            let next = if waiting.is_empty() {
                rx.recv().map_err(|_| mpsc::TryRecvError::Disconnected)
            } else {
                rx.try_recv()
            };
            match next {
                Ok((cmd, reply)) => {
                    if waiting.is_empty() {
                        heard = Instant::now();
                    }
                    match handle.submit(cmd) {
                        Ok(cookie) => {
                            waiting.insert(cookie, reply);
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
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
            fail_all(&mut waiting, &e);
            return;
        }
        if deliver(&mut handle, &mut waiting) {
            heard = Instant::now();
        }
        if closed.load(Ordering::Relaxed) {
            // Owner is gone; abandon whatever the server has not answered.
            return;
        }
        if let Some(limit) = stall.filter(|l| !waiting.is_empty() && heard.elapsed() >= *l) {
            let e = format!(
                "the server answered none of {} requests for {} s (stopped or hung?)",
                waiting.len(),
                limit.as_secs()
            );
            fail_all(&mut waiting, &e);
            return;
        }
    }
}

fn fail_all(waiting: &mut HashMap<u64, Reply>, e: &str) {
    for (_, reply) in waiting.drain() {
        let _ = reply.send(Err(e.to_string()));
    }
}

/// Hand back every retired command; whether there was any.
fn deliver(handle: &mut Handle, waiting: &mut HashMap<u64, Reply>) -> bool {
    let mut any = false;
    while let Some((cookie, result)) = handle.retire() {
        any = true;
        if let Some(reply) = waiting.remove(&cookie) {
            let _ = reply.send(result);
        }
    }
    any
}

impl Source for Nbd {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn extents(&self, offset: u64, len: u64) -> BoxFuture<'static, Result<Vec<Extent>>> {
        let end = offset.saturating_add(len).min(self.inner.size);
        let dirty = self.inner.caps.has_dirty;
        if !self.inner.caps.has_allocation && !dirty {
            return futures::future::ready(Ok(vec![Extent {
                offset,
                len: end - offset,
                zero: false,
                skip: false,
            }]))
            .boxed();
        }
        // Ask for the whole blocks around the range; keep what lies inside it.
        let b = self.inner.blocks;
        let start = b.down(offset);
        let stop = if b.boundary(end) {
            end
        } else {
            b.block_end(end)
        };
        let status = self.command(Command::BlockStatus {
            offset: start,
            len: stop - start,
        });
        let name = self.name();
        let has_allocation = self.inner.caps.has_allocation;
        async move {
            let status = match status.await? {
                Completed::Extents(status) => status,
                _ => {
                    return Err(Error::Endpoint(format!(
                        "{name}: block status returned nothing"
                    )))
                }
            };
            let mut allocation = status.allocation;
            if allocation.is_empty() && !has_allocation {
                allocation.push((end - start, 0)); // all data, as far as we know
            }
            let mut got = from_block_status(start, end, &allocation);
            if dirty {
                got = with_dirty(start, &got, &status.dirty);
            }
            let got = clip_front(got, offset);
            if got.is_empty() {
                return Err(Error::Endpoint(format!(
                    "{name}: block status described nothing at {offset}"
                )));
            }
            Ok(got)
        }
        .boxed()
    }

    fn read(&self, offset: u64, len: usize, buf: Vec<u8>) -> BoxFuture<'static, Result<Vec<u8>>> {
        self.read_range(offset, len, buf)
    }
}

/// Drop what lies before `offset`.
fn clip_front(extents: Vec<Extent>, offset: u64) -> Vec<Extent> {
    extents
        .into_iter()
        .filter(|e| e.end() > offset)
        .map(|e| {
            let skip = offset.saturating_sub(e.offset);
            Extent {
                offset: e.offset + skip,
                len: e.len - skip,
                zero: e.zero,
                skip: e.skip,
            }
        })
        .collect()
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
            min_block: self.inner.blocks.min,
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
        let len = data.len() as u64;
        if let Some(e) = self.out_of_bounds("write", offset, len) {
            return futures::future::ready(Err(e)).boxed();
        }
        if len == 0 {
            return futures::future::ready(Ok(())).boxed();
        }
        let cut = self.inner.blocks.cut(offset, offset + len);
        let piece =
            |from: u64, to: u64| data.slice((from - offset) as usize..(to - offset) as usize);
        let mut parts = Vec::new();
        if let Some(block) = cut.head {
            let to = block.1.min(offset + len);
            parts.push(self.patch_block(block, offset, piece(offset, to)));
        }
        let (from, to) = cut.whole;
        if from < to {
            parts.push(self.write_whole(from, piece(from, to)));
        }
        if let Some(block) = cut.tail {
            parts.push(self.patch_block(block, block.0, piece(block.0, offset + len)));
        }
        all(parts).boxed()
    }

    fn zero(&self, offset: u64, len: u64, trim: bool) -> BoxFuture<'static, Result<()>> {
        if let Some(e) = self.out_of_bounds("zeroing", offset, len) {
            return futures::future::ready(Err(e)).boxed();
        }
        if len == 0 {
            return futures::future::ready(Ok(())).boxed();
        }
        let end = offset + len;
        let cut = self.inner.blocks.cut(offset, end);
        let mut parts = Vec::new();
        if let Some(block) = cut.head {
            let to = block.1.min(end);
            parts.push(self.patch_block(block, offset, zeros((to - offset) as usize)));
        }
        let (from, to) = cut.whole;
        parts.push(self.zero_whole(from, to - from, trim));
        if let Some(block) = cut.tail {
            parts.push(self.patch_block(block, block.0, zeros((end - block.0) as usize)));
        }
        all(parts).boxed()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_is_named_by_its_socket_or_host_and_port() {
        let at = server_address;
        assert_eq!(
            at("nbd+unix:///d?socket=/run/a%20b.sock"),
            "socket /run/a b.sock"
        );
        assert_eq!(
            at("nbds+unix://u@/d?tls-psk-file=/k&socket=/s#x"),
            "socket /s"
        );
        assert_eq!(at("nbd+unix:///d"), "its socket");
        assert_eq!(at("nbd://10.0.0.5/d"), "10.0.0.5:10809");
        assert_eq!(at("nbds://alice@h:7000/d?tls-psk-file=/k"), "h:7000");
        assert_eq!(at("nbd://[::1]/d"), "[::1]:10809");
        assert_eq!(at("nbd://[::1]:7/"), "[::1]:7");
    }

    #[test]
    fn a_servers_export_names_are_bounded_and_cleaned() {
        let names: Vec<String> = (0..12).map(|i| format!("e{i}")).collect();
        assert_eq!(
            shown_names(&names),
            "e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, … (2 more)"
        );
        let odd = vec![String::new(), "a\nb".into(), "x".repeat(70)];
        let long = format!("{}…", "x".repeat(64));
        assert_eq!(
            shown_names(&odd),
            format!("'' (the default export), a?b, {long}")
        );
    }

    fn blocks(min: u64, max: u64, size: u64) -> Blocks {
        let caps = Caps {
            block_min: min,
            block_max: max,
            ..Caps::default()
        };
        Blocks::new(&caps, size).expect("valid constraints")
    }

    #[test]
    fn unconstrained_requests_are_never_cut() {
        let b = blocks(0, 0, 1 << 20);
        assert_eq!(b.min, 1);
        assert_eq!(b.max, DEFAULT_MAX_REQUEST);
        let cut = b.cut(3, 1000);
        assert_eq!((cut.head, cut.whole, cut.tail), (None, (3, 1000), None));
    }

    #[test]
    fn partial_blocks_at_both_ends_are_patched() {
        let b = blocks(65536, 0, 1 << 20);
        let cut = b.cut(4096, 200_000);
        assert_eq!(cut.head, Some((0, 65536)));
        assert_eq!(cut.whole, (65536, 196_608));
        assert_eq!(cut.tail, Some((196_608, 262_144)));
    }

    #[test]
    fn a_write_inside_one_block_is_one_patch() {
        let b = blocks(65536, 0, 1 << 20);
        let cut = b.cut(70_000, 80_000);
        assert_eq!(cut.head, Some((65536, 131_072)));
        assert_eq!(cut.whole, (80_000, 80_000));
        assert_eq!(cut.tail, None);
    }

    #[test]
    fn the_final_partial_block_ends_at_the_export_end() {
        let size = (1 << 20) + 1000;
        let b = blocks(65536, 0, size);
        // Ending at the export's end is aligned enough: asked for as it is.
        let cut = b.cut(1 << 20, size);
        assert_eq!(
            (cut.head, cut.whole, cut.tail),
            (None, ((1 << 20), size), None)
        );
        let cut = b.cut((1 << 20) + 10, size);
        assert_eq!(cut.head, Some((1 << 20, size)));
        assert!(b.in_partial_tail((1 << 20) + 10, size));
        assert!(!b.in_partial_tail(0, 1 << 20));
    }

    #[test]
    fn requests_are_split_at_the_maximum() {
        let b = blocks(4096, 3 * 65536 + 100, 1 << 30);
        assert_eq!(b.max, 3 * 65536);
        let parts: Vec<_> = b.split(0, 400_000).collect();
        assert_eq!(
            parts,
            vec![(0, 196_608), (196_608, 196_608), (393_216, 6784)]
        );
    }

    #[test]
    fn invalid_constraints_are_refused() {
        for (min, max) in [(3, 0), (1 << 17, 0), (65536, 4096)] {
            let caps = Caps {
                block_min: min,
                block_max: max,
                ..Caps::default()
            };
            assert!(Blocks::new(&caps, 1 << 20).is_err(), "{min} {max}");
        }
    }

    #[test]
    fn parts_of_a_block_are_merged_until_it_is_whole() {
        let mut p = Partial {
            buf: vec![0; 100],
            filled: Vec::new(),
            waiters: Vec::new(),
        };
        p.fill(60, 100);
        p.fill(0, 20);
        assert_eq!(p.filled, vec![(0, 20), (60, 100)]);
        p.fill(10, 30); // a part sent again overlaps
        p.fill(30, 60);
        assert_eq!(p.filled, vec![(0, 100)]);
    }

    #[test]
    fn extents_before_the_asked_offset_are_dropped() {
        let got = clip_front(
            vec![
                Extent {
                    offset: 0,
                    len: 100,
                    zero: true,
                    skip: false,
                },
                Extent {
                    offset: 100,
                    len: 50,
                    zero: false,
                    skip: false,
                },
            ],
            120,
        );
        assert_eq!(
            got,
            vec![Extent {
                offset: 120,
                len: 30,
                zero: false,
                skip: false,
            }]
        );
    }
}
