//! The migration relay, on top of the bridge's producers: a bridged socket pushed as one
//! transfer and, for a byte stream with a return path, what the far end sends back received
//! into the same connection; on the receiving side, the return stream of a relayed
//! connection pushed home.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::conn::{fit_chunk, DataConn};
use crate::error::{Error, Result};
use crate::io::stdio::{OnConnect, Stdout, Stream};
use crate::io::Sink;
use crate::link::Subjects;
use crate::push::{push, PushOptions};
use crate::recv::{recv, RecvOptions};
use crate::stats::Progress;

/// The range a byte stream's frames may address (its length is not known in advance).
const STREAM_BOUND: u64 = 1 << 62;

/// What a bridge serves and how its frames travel.
pub struct BridgeOptions {
    /// "nbd" (an NBD export of `size` bytes) or "stream" (a byte stream, no size).
    pub kind: String,
    pub size: Option<u64>,
    pub chunk_size: Option<u64>,
    pub window: u64,
    pub timeout: Option<Duration>,
    /// Where what the stream's client is sent back arrives, if anything is.
    pub back: Option<Subjects>,
}

/// Serve the socket bound at `path` for its one producer and push what it writes as the
/// transfer `progress` counts, until the producer ends.
pub async fn bridge(
    conn: Arc<DataConn>,
    listener: std::os::unix::net::UnixListener,
    path: PathBuf,
    subjects: Subjects,
    opts: BridgeOptions,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) -> Result<()> {
    let chunk = fit_chunk(opts.chunk_size, conn.max_payload)?;
    let (items, rx) = tokio::sync::mpsc::channel(2);
    let stop = cancel.child_token();
    let size = match (opts.kind.as_str(), opts.size) {
        ("nbd", Some(size)) => {
            let serve = crate::bridge::serve_nbd(listener, path, size, chunk, items, stop.clone());
            tokio::spawn(serve);
            size
        }
        ("stream", None) => {
            // What the client is sent back is received as a stream of its own and written
            // into the same connection.
            let on_accept = opts.back.map(|back| {
                // Not `stop`: what comes back may still come after our direction ended.
                let (conn, progress, cancel) =
                    (conn.clone(), progress.clone(), cancel.child_token());
                let (window, timeout) = (opts.window, opts.timeout);
                let runtime = Handle::current();
                Box::new(move |fd| {
                    runtime.spawn(receive_back(
                        conn, fd, back, window, timeout, progress, cancel,
                    ));
                }) as OnConnect
            });
            let serve =
                crate::bridge::serve_stream(listener, path, chunk, items, stop.clone(), on_accept);
            tokio::spawn(serve);
            STREAM_BOUND
        }
        (kind, _) => {
            let _ = std::fs::remove_file(&path);
            return Err(Error::Usage(format!(
                "bridge kind {kind:?}: use \"nbd\" with a size or \"stream\" without"
            )));
        }
    };
    let push_opts = PushOptions {
        size,
        chunk_size: Some(chunk),
        window: opts.window,
        timeout: opts.timeout,
    };
    let result = push(&conn, rx, &subjects, &push_opts, &progress, &cancel).await;
    stop.cancel();
    result
}

/// Receive what comes back for a relayed connection into it (`fd`, a second descriptor).
async fn receive_back(
    conn: Arc<DataConn>,
    fd: OwnedFd,
    subjects: Subjects,
    window: u64,
    timeout: Option<Duration>,
    forward: Arc<Progress>,
    cancel: CancellationToken,
) {
    let stream = Stream::Unix {
        path: "(the relayed connection)".into(),
        fd,
    };
    let sink: Arc<dyn Sink> = Arc::new(Stdout::open(stream));
    let progress = Progress::new(&format!("{}-back", forward.transfer_id), "recv");
    let opts = RecvOptions {
        window,
        timeout,
        verify: false,
        target_is_zero: false,
        journal: None,
        resume: false,
        target: "return stream".into(),
        expect_sha256: None,
        can_stripe: false,
        stripe: None,
    };
    let _ = recv(&conn, sink, &subjects, &opts, &progress, &cancel).await;
}

/// The target of a receiver with a return path: the unix socket at `path`, connected when
/// the first frame arrives. What the other end writes back into it goes home as a stream
/// of its own (`back`), from when the connection exists (so that stream does not time out
/// while the forward one has not started). It ends when the connection does; its outcome
/// shows through QEMU, so it is not reported.
pub fn returning_sink(
    conn: &Arc<DataConn>,
    path: &str,
    back: Subjects,
    progress: &Progress,
    opts: &RecvOptions,
    cancel: &CancellationToken,
) -> Result<Arc<dyn Sink>> {
    let chunk = fit_chunk(None, conn.max_payload)?;
    let (conn, cancel) = (conn.clone(), cancel.child_token());
    let id = format!("{}-back", progress.transfer_id);
    let opts = PushOptions {
        size: STREAM_BOUND,
        chunk_size: Some(chunk),
        window: opts.window,
        timeout: opts.timeout,
    };
    let runtime = Handle::current();
    let on_connect: OnConnect = Box::new(move |fd| {
        let (items, rx) = tokio::sync::mpsc::channel(2);
        runtime.spawn(async move {
            let back_progress = Progress::new(&id, "send");
            let _ = push(&conn, rx, &back, &opts, &back_progress, &cancel).await;
        });
        crate::bridge::relay_back(fd, items);
    });
    let stream = Stream::UnixLater {
        path: path.to_string(),
        on_connect: Some(on_connect),
    };
    Ok(Arc::new(Stdout::open(stream)))
}
