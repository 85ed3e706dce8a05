//! The Python face of the core: a runtime, a data connection, transfers and their stats.
//!
//! Every call returns at once; the work runs on the core's tokio runtime without the GIL,
//! and finishes by calling `done(ok, value)` from a core thread. The Python layer turns that
//! into an awaitable (`nbdnats/_bridge.py`), so the event loop is never blocked.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyTuple;
use tokio_util::sync::CancellationToken;

use crate::compress::{self, Mode};
use crate::conn::{self, DataConn};
use crate::error::{Error, Result};
use crate::io::{open_sink, open_source, Access};
use crate::link::Subjects;
use crate::recv::RecvOptions;
use crate::relay::{self, BridgeOptions};
use crate::send::SendOptions;
use crate::stats::{Progress, State};
use crate::{stripe, striped};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4)))
            .thread_name("nbdnats-core")
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot start the core's runtime: {e}"))
    })
}

/// Outcomes being delivered to Python right now, and whether Python is going away. A core
/// thread that takes the GIL while the interpreter finalizes aborts the process ("PyGILState_Release:
/// thread state must be current"): a transfer that had finished, and said so, ended in a
/// crash. `shutdown()` (an `atexit` hook, run while the interpreter is whole) stops new
/// deliveries and waits for those under way; both sides hold the same lock.
static DELIVERING: Mutex<(usize, bool)> = Mutex::new((0, false));
static DELIVERED: Condvar = Condvar::new();
/// How long `shutdown()` waits for deliveries under way (each is a short Python call).
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

fn delivering() -> std::sync::MutexGuard<'static, (usize, bool)> {
    DELIVERING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Stop delivering outcomes to Python and wait (without the GIL, at most `SHUTDOWN_WAIT`)
/// for the ones under way; called from `atexit` by `nbdnats._bridge`.
#[pyfunction]
fn shutdown(py: Python<'_>) {
    py.detach(|| {
        let mut state = delivering();
        state.1 = true;
        let deadline = std::time::Instant::now() + SHUTDOWN_WAIT;
        while state.0 > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            state = DELIVERED
                .wait_timeout(state, left)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
        }
    });
}

/// Deliver an outcome to Python's `done(ok, value)`; a failure is `(code, message,
/// from_peer)`: its code, its message, and whether the peer reported it. Nothing is
/// delivered once Python is shutting down (nobody is left to wait for it).
fn settle<T>(done: Py<PyAny>, result: Result<T>)
where
    T: for<'py> IntoPyObject<'py> + Send,
{
    {
        let mut state = delivering();
        if state.1 {
            // `done` (a Python object) is dropped without the GIL: pyo3 defers its decref.
            return;
        }
        state.0 += 1;
    }
    Python::try_attach(|py| {
        let called = match result {
            Ok(v) => done.call1(py, (true, v)),
            Err(e) => {
                let failure = (e.code().to_string(), e.to_string(), e.from_peer());
                done.call1(py, (false, failure))
            }
        };
        if let Err(e) = called {
            e.print(py);
        }
    });
    let mut state = delivering();
    state.0 -= 1;
    DELIVERED.notify_all();
}

fn spawn<T, F>(done: Py<PyAny>, work: F)
where
    T: for<'py> IntoPyObject<'py> + Send + 'static,
    F: Future<Output = Result<T>> + Send + 'static,
{
    runtime().spawn(async move {
        let result = work.await;
        settle(done, result);
    });
}

/// A timeout in seconds as Python gives it; 0 (or less) waits forever. Values that are not
/// a finite number of seconds a `Duration` can hold wait forever too: the Python layer
/// refuses them first, and nothing that reaches the core may panic it.
fn timeout(seconds: f64) -> Option<Duration> {
    (seconds > 0.0)
        .then(|| Duration::try_from_secs_f64(seconds).ok())
        .flatten()
}

/// An expected image digest: `sha256:<64 hex>` (as approvals write it) or the bare hex.
fn parse_sha256(text: &str) -> Result<[u8; 32]> {
    let hex = text.strip_prefix("sha256:").unwrap_or(text);
    let bad = || {
        Error::Usage(format!(
            "{text:?} is not a sha256 digest (sha256:<64 hex digits>)"
        ))
    };
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = hex
            .get(2 * i..2 * i + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .ok_or_else(bad)?;
    }
    Ok(out)
}

fn subjects((open, chunks, acks): (String, String, String)) -> Subjects {
    Subjects {
        open: open.into(),
        chunks: chunks.into(),
        acks: acks.into(),
    }
}

/// A data-plane NATS connection owned by the core.
#[pyclass(frozen, module = "nbdnats._core")]
pub struct DataConnection {
    conn: Arc<DataConn>,
    /// Publishes under way: `flush` waits for them first, so a message published just
    /// before a flush (a transfer's last event, before the process exits) is in it.
    publishing: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

#[pymethods]
impl DataConnection {
    /// The servers this connection was given.
    #[getter]
    fn servers(&self) -> String {
        self.conn.servers.clone()
    }

    /// The server's `max_payload`, from its INFO.
    #[getter]
    fn max_payload(&self) -> u64 {
        self.conn.max_payload
    }

    /// Publish a small message (events) on the data connection; does not wait (`flush`
    /// does).
    fn publish(&self, subject: String, payload: Vec<u8>) {
        let client = self.conn.client.clone();
        let task = runtime().spawn(async move {
            let _ = client.publish(subject, payload.into()).await;
        });
        let mut publishing = self.publishing.lock().unwrap_or_else(|p| p.into_inner());
        publishing.retain(|t| !t.is_finished());
        publishing.push(task);
    }

    /// Flush what is buffered, then call `done(ok, None)`; gives up after a few seconds
    /// (a server that is gone must not hold a closing process).
    fn flush(&self, done: Py<PyAny>) {
        let conn = self.conn.clone();
        let publishing =
            std::mem::take(&mut *self.publishing.lock().unwrap_or_else(|p| p.into_inner()));
        spawn(done, async move {
            let queued = futures::future::join_all(publishing);
            let _ = tokio::time::timeout(conn::TIDY_BOUND, queued).await;
            if conn.flush_within(conn::TIDY_BOUND).await {
                Ok(())
            } else {
                Err(Error::Nats(
                    "the NATS server did not take the last messages (the connection is down)"
                        .into(),
                ))
            }
        });
    }
}

/// A running send or receive.
#[pyclass(frozen, module = "nbdnats._core")]
pub struct Transfer {
    cancel: CancellationToken,
    progress: Arc<Progress>,
}

#[pymethods]
impl Transfer {
    /// Ask the transfer to stop. `resumable`: an interruption (`done` reports `cancelled`;
    /// a receiver keeps its journal, a sender its key, for `--resume`); otherwise it is
    /// cancelled for good (`abandoned`): both ends drop what a resume would need.
    #[pyo3(signature = (resumable=true))]
    fn cancel(&self, resumable: bool) {
        if !resumable {
            self.progress.abandoned.store(true, Relaxed);
        }
        self.cancel.cancel();
    }

    /// Cap the sending end at `bytes_per_s` (0: no cap), from the next data frame on; a
    /// frame waiting for the old cap sees the new one within 0.1 s. A receiving end has
    /// nothing to pace: the cap is kept and shown in its stats only.
    fn set_rate(&self, bytes_per_s: u64) -> PyResult<()> {
        if bytes_per_s > crate::rate::MAX_RATE {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "a rate cap of {bytes_per_s} bytes/s is more than the most a transfer takes, {} bytes/s (1 TiB/s)",
                crate::rate::MAX_RATE
            )));
        }
        self.progress.rate_limit.store(bytes_per_s, Relaxed);
        Ok(())
    }

    /// A snapshot of the transfer's statistics.
    fn stats(&self) -> Stats {
        Stats::from(self.progress.as_ref())
    }

    #[getter]
    fn transfer_id(&self) -> String {
        self.progress.transfer_id.clone()
    }
}

/// Statistics of a transfer at one moment: each field, its type and how it is read from
/// the engine's `Progress`, listed once. `STATS_FIELDS` names them (and the derived
/// `mb_per_s`) for Python.
/// The counters (`u64`, read from `Progress`'s atomic of the same name) sit between the
/// fields read otherwise.
macro_rules! stats {
    ($p:ident =>
     { $($head:ident: $hty:ty = $hget:expr,)* }
     counters [ $($counter:ident),* ]
     { $($tail:ident: $tty:ty = $tget:expr,)* }) => {
        #[pyclass(frozen, get_all, module = "nbdnats._core")]
        pub struct Stats {
            $($head: $hty,)*
            $($counter: u64,)*
            $($tail: $tty,)*
        }

        /// The attributes of a `Stats`, in order.
        pub const STATS_FIELDS: &[&str] = &[
            $(stringify!($head),)* $(stringify!($counter),)* $(stringify!($tail),)* "mb_per_s"
        ];

        impl From<&Progress> for Stats {
            fn from($p: &Progress) -> Stats {
                Stats {
                    $($head: $hget,)*
                    $($counter: $p.$counter.load(Relaxed),)*
                    $($tail: $tget,)*
                }
            }
        }
    };
}

stats! { p =>
    {
        transfer_id: String = p.transfer_id.clone(),
        role: String = p.role.to_string(),
        state: String = p.state().name().to_string(),
    }
    counters [
        size, done_bytes, data_bytes, zero_bytes, frames, bad_frames, duplicate_frames,
        corrupt_frames, retransmits, resumes, sent_bytes, chunk_size, window, dirty_bytes,
        rate_limit, wire_bytes, streams
    ]
    {
        seconds: f64 = p.seconds(),
        digest: Option<String> = p.digest(),
        verified: bool = p.verified.load(Relaxed),
    }
}

#[pymethods]
impl Stats {
    /// Throughput over the disk bytes moved, in MB/s (10^6 bytes): a dirty transfer's over
    /// the bytes its bitmap marked, not over the whole disk it left alone.
    #[getter]
    fn mb_per_s(&self) -> f64 {
        let moved = if self.dirty_bytes > 0 {
            self.dirty_bytes
        } else {
            self.done_bytes
        };
        if self.seconds > 0.0 {
            moved as f64 / self.seconds / 1e6
        } else {
            0.0
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "Stats(transfer_id={:?}, role={:?}, state={:?}, done_bytes={}, size={}, digest={:?})",
            self.transfer_id, self.role, self.state, self.done_bytes, self.size, self.digest
        )
    }
}

/// Connect to the data plane; `done(True, DataConnection)` or `done(False, failure)`.
/// Credentials come from the URLs (`user:password@`, `token@`), or `creds` (a `.creds`
/// file) or `nkey` (a file holding an NKey seed); `tls_cert` and `tls_key` present a
/// client certificate, `tls_ca` verifies servers instead of the system's CAs.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (servers, name, done, *, creds=None, nkey=None, tls_cert=None, tls_key=None, tls_ca=None))]
fn connect(
    servers: String,
    name: String,
    done: Py<PyAny>,
    creds: Option<PathBuf>,
    nkey: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
) {
    spawn(done, async move {
        let login = conn::Login {
            creds,
            nkey,
            tls_cert,
            tls_key,
            tls_ca,
        };
        let conn = conn::connect(&servers, &name, &login).await?;
        Ok(DataConnection {
            conn: Arc::new(conn),
            publishing: Mutex::new(Vec::new()),
        })
    });
}

fn start(
    role: &'static str,
    transfer_id: String,
    rate: Option<u64>,
    done: Py<PyAny>,
    work: impl FnOnce(
        Arc<Progress>,
        CancellationToken,
    ) -> futures::future::BoxFuture<'static, Result<()>>,
) -> Transfer {
    let progress = Arc::new(Progress::new(&transfer_id, role));
    let rate = rate.unwrap_or(0).min(crate::rate::MAX_RATE);
    progress.rate_limit.store(rate, Relaxed);
    let cancel = CancellationToken::new();
    let fut = work(progress.clone(), cancel.clone());
    let finished = progress.clone();
    spawn(done, async move {
        let result = fut.await;
        finished.set_state(if result.is_ok() {
            State::Done
        } else {
            State::Failed
        });
        result.map(|()| Stats::from(finished.as_ref()))
    });
    Transfer { cancel, progress }
}

/// A sub-stream as Python names it: its transfer id and its (open, chunks, acks) subjects.
type StripeTransfer = (String, (String, String, String));

/// The stripes a sender asks for: none for one stream, or a source read in order (stdin,
/// a pipe or socket), which cannot be read at several places at once.
fn ask_stripes(
    streams: u32,
    src: &str,
    named: Option<&Vec<StripeTransfer>>,
) -> Result<Option<crate::handshake::Stripes>> {
    if !(1..=stripe::MAX_STREAMS).contains(&streams) {
        return Err(Error::Usage(format!(
            "--streams {streams}: give 1 to {} sub-streams",
            stripe::MAX_STREAMS
        )));
    }
    if streams > 1 && named.is_none_or(|n| n.len() < streams as usize) {
        return Err(Error::Usage(format!(
            "--streams {streams} needs the ids of {streams} sub-streams (a shorter --id)"
        )));
    }
    let in_order =
        src == "-" || src.starts_with(crate::io::PIPE) || src.starts_with(crate::io::UNIX);
    Ok(
        (streams > 1 && !in_order).then_some(crate::handshake::Stripes {
            count: streams,
            size: stripe::STRIPE_SIZE,
        }),
    )
}

/// The sub-streams Python named, with where each keeps its key or journal.
fn children(
    named: Option<Vec<StripeTransfer>>,
    state_dir: Option<&std::path::Path>,
    file: impl Fn(&std::path::Path, &str) -> std::path::PathBuf,
) -> Vec<striped::Child> {
    named
        .unwrap_or_default()
        .into_iter()
        .map(|(id, subs)| striped::Child {
            state: state_dir.map(|d| file(d, &id)),
            subjects: subjects(subs),
            id,
        })
        .collect()
}

/// Send `src` as transfer `transfer_id`; see `_core.pyi` for the arguments.
#[pyfunction]
#[pyo3(signature = (conn, src, transfer_id, subjects_, done, *, size=None, chunk_size=None, window=crate::window::DEFAULT_WINDOW, timeout_s=crate::conn::DEFAULT_TIMEOUT_S, verify=false, resume=false, state_dir=None, allow_local_file=false, dirty_bitmap=None, rate=None, compress=None, streams=1, stripe_transfers=None))]
#[allow(clippy::too_many_arguments)]
fn start_send(
    conn: &DataConnection,
    src: String,
    transfer_id: String,
    subjects_: (String, String, String),
    done: Py<PyAny>,
    size: Option<u64>,
    chunk_size: Option<u64>,
    window: u64,
    timeout_s: f64,
    verify: bool,
    resume: bool,
    state_dir: Option<std::path::PathBuf>,
    allow_local_file: bool,
    dirty_bitmap: Option<String>,
    rate: Option<u64>,
    compress: Option<String>,
    streams: u32,
    stripe_transfers: Option<Vec<StripeTransfer>>,
) -> Transfer {
    let conn = conn.conn.clone();
    let subjects = subjects(subjects_);
    let stripes = ask_stripes(streams, &src, stripe_transfers.as_ref());
    let children = children(stripe_transfers, state_dir.as_deref(), |d, id| {
        crate::handshake::key_path(d, id)
    });
    let mode = Mode::parse(compress.as_deref().unwrap_or(compress::DEFAULT_MODE));
    let (compress, bad_compress) = match mode {
        Ok(m) => (m, None),
        Err(e) => (Mode::Off, Some(e)),
    };
    let opts = SendOptions {
        compress,
        dirty: dirty_bitmap.is_some(),
        chunk_size,
        window,
        timeout: timeout(timeout_s),
        verify,
        resume,
        key_file: state_dir.map(|d| crate::handshake::key_path(&d, &transfer_id)),
        stripes: None,
        tap: None,
    };
    start("send", transfer_id, rate, done, move |progress, cancel| {
        async move {
            let access = Access {
                allow_local_file,
                stall: opts.timeout,
            };
            if let Some(e) = bad_compress {
                return Err(e);
            }
            let opts = SendOptions {
                stripes: stripes?,
                ..opts
            };
            let source = open_source(&src, size, access, dirty_bitmap.as_deref()).await?;
            striped::send(
                &conn, source, &subjects, children, &opts, &progress, &cancel,
            )
            .await
        }
        .boxed_send()
    })
}

/// Receive transfer `transfer_id` into `dst`; see `_core.pyi` for the arguments.
#[pyfunction]
#[pyo3(signature = (conn, dst, transfer_id, subjects_, done, *, window=crate::window::DEFAULT_WINDOW, timeout_s=crate::conn::DEFAULT_TIMEOUT_S, verify=false, target_is_zero=false, state_dir=None, resume=false, return_subjects=None, expect_sha256=None, allow_local_file=false, base=None, stripe_transfers=None))]
#[allow(clippy::too_many_arguments)]
fn start_recv(
    conn: &DataConnection,
    dst: String,
    transfer_id: String,
    subjects_: (String, String, String),
    done: Py<PyAny>,
    window: u64,
    timeout_s: f64,
    verify: bool,
    target_is_zero: bool,
    state_dir: Option<std::path::PathBuf>,
    resume: bool,
    return_subjects: Option<(String, String, String)>,
    expect_sha256: Option<String>,
    allow_local_file: bool,
    base: Option<String>,
    stripe_transfers: Option<Vec<StripeTransfer>>,
) -> Transfer {
    let conn = conn.conn.clone();
    let subjects = subjects(subjects_);
    let back = return_subjects.map(self::subjects);
    let target = dst.clone();
    let expected = expect_sha256.as_deref().map(parse_sha256);
    // Streams cannot be resumed, so they keep no journal.
    let streaming = dst == "-"
        || dst == "null:"
        || crate::io::null::is_null_device(&dst)
        || dst.starts_with(crate::io::PIPE)
        || dst.starts_with(crate::io::UNIX);
    let state_dir = state_dir.filter(|_| !streaming);
    let can_stripe = stripe_transfers.is_some() && !streaming && back.is_none() && base.is_none();
    let children = children(stripe_transfers, state_dir.as_deref(), |d, id| {
        crate::journal::path_for(d, id)
    });
    let journal = state_dir.map(|d| crate::journal::path_for(&d, &transfer_id));
    let opts = RecvOptions {
        window,
        timeout: timeout(timeout_s),
        verify,
        target_is_zero,
        journal,
        resume,
        target,
        expect_sha256: None,
        can_stripe,
        stripe: None,
    };
    start("recv", transfer_id, None, done, move |progress, cancel| {
        async move {
            let opts = RecvOptions {
                expect_sha256: expected.transpose()?,
                ..opts
            };
            let sink = match (back, dst.strip_prefix(crate::io::UNIX)) {
                (None, _) if base.is_some() => {
                    let base = base.as_deref().unwrap_or_default();
                    Arc::new(crate::io::base::Merge::open(&dst, base).await?)
                        as Arc<dyn crate::io::Sink>
                }
                (Some(back), Some(path)) => {
                    // What the other end writes back goes home as a stream of its own.
                    relay::returning_sink(&conn, path, back, &progress, &opts, &cancel)?
                }
                (Some(_), None) => {
                    return Err(Error::Usage(
                        "a return stream needs a unix:PATH target".into(),
                    ))
                }
                (None, _) => {
                    let access = Access {
                        allow_local_file,
                        stall: opts.timeout,
                    };
                    open_sink(&dst, access).await?
                }
            };
            striped::recv(&conn, sink, &subjects, children, &opts, &progress, &cancel).await
        }
        .boxed_send()
    })
}

/// Serve a local unix socket for one producer and push what it writes as transfer
/// `transfer_id`: `kind` "nbd" (an NBD export of `size` bytes that QEMU's mirror writes
/// into) or "stream" (a byte stream, such as QEMU's outgoing migration). The socket exists
/// when this returns; see `_core.pyi`.
#[pyfunction]
#[pyo3(signature = (conn, kind, listen, transfer_id, subjects_, done, *, window=crate::window::DEFAULT_WINDOW, timeout_s=crate::conn::DEFAULT_TIMEOUT_S, size=None, chunk_size=None, return_subjects=None, rate=None))]
#[allow(clippy::too_many_arguments)]
fn start_bridge(
    conn: &DataConnection,
    kind: String,
    listen: String,
    transfer_id: String,
    subjects_: (String, String, String),
    done: Py<PyAny>,
    window: u64,
    timeout_s: f64,
    size: Option<u64>,
    chunk_size: Option<u64>,
    return_subjects: Option<(String, String, String)>,
    rate: Option<u64>,
) -> Transfer {
    let conn = conn.conn.clone();
    let subjects = subjects(subjects_);
    let path = std::path::PathBuf::from(&listen);
    let bound = crate::bridge::bind(&path);
    let opts = BridgeOptions {
        kind,
        size,
        chunk_size,
        window,
        timeout: timeout(timeout_s),
        back: return_subjects.map(self::subjects),
    };
    start("send", transfer_id, rate, done, move |progress, cancel| {
        async move {
            let listener = bound?;
            relay::bridge(conn, listener, path, subjects, opts, progress, cancel).await
        }
        .boxed_send()
    })
}

/// The digest (`algo`: `sha256` or the content digest's name) of a source's first `length`
/// bytes (default: all of it), as `done(True, ("<algo>:<hex>", length))`. Holes are hashed
/// as zeros without reading them.
#[pyfunction]
#[pyo3(signature = (src, done, *, length=None, size=None, allow_local_file=false, algo="sha256"))]
fn image_digest(
    src: String,
    done: Py<PyAny>,
    length: Option<u64>,
    size: Option<u64>,
    allow_local_file: bool,
    algo: &str,
) {
    let algo = algo.to_string();
    spawn(done, async move {
        let access = Access {
            allow_local_file,
            // A source that answers nothing for the transfers' default timeout is dead.
            stall: timeout(conn::DEFAULT_TIMEOUT_S),
        };
        let source = open_source(&src, size, access, None).await?;
        crate::digest::image(source, length, &algo).await
    });
}

/// One file of a state dir's journals folder (`journal::Listed`).
#[pyclass(frozen, get_all, module = "nbdnats._core")]
pub struct JournalEntry {
    file: String,
    role: Option<String>,
    transfer_id: Option<String>,
    target: Option<String>,
    size: Option<u64>,
    done_bytes: Option<u64>,
    modified: Option<f64>,
    running: bool,
    error: Option<String>,
}

impl From<crate::journal::Listed> for JournalEntry {
    fn from(l: crate::journal::Listed) -> JournalEntry {
        JournalEntry {
            file: l.file,
            role: l.role.map(str::to_string),
            transfer_id: l.transfer_id,
            target: l.target,
            size: l.size,
            done_bytes: l.done_bytes,
            modified: l.modified,
            running: l.running,
            error: l.error,
        }
    }
}

/// What interrupted transfers left in `state_dir`: `done(True, [JournalEntry, ...])`.
#[pyfunction]
fn list_journals(state_dir: std::path::PathBuf, done: Py<PyAny>) {
    spawn(done, async move {
        let listed = crate::journal::list(&state_dir)?;
        Ok(listed
            .into_iter()
            .map(JournalEntry::from)
            .collect::<Vec<_>>())
    });
}

/// Remove transfer `transfer_id`'s journal and sender key from `state_dir`:
/// `done(True, [path, ...])`, the files removed.
#[pyfunction]
fn discard_journal(state_dir: std::path::PathBuf, transfer_id: String, done: Py<PyAny>) {
    spawn(done, async move {
        let removed = crate::journal::discard(&state_dir, &transfer_id)?;
        Ok(removed
            .into_iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>())
    });
}

trait BoxedSend: Future + Send + Sized + 'static {
    fn boxed_send(self) -> futures::future::BoxFuture<'static, Self::Output> {
        Box::pin(self)
    }
}
impl<F: Future + Send + 'static> BoxedSend for F {}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("PROTOCOL_VERSION", crate::frame::PROTOCOL_VERSION)?;
    m.add("HEADER_LEN", crate::frame::HEADER_LEN)?;
    m.add("DEFAULT_WINDOW", crate::window::DEFAULT_WINDOW)?;
    m.add("MAX_WINDOW", crate::window::MAX_WINDOW)?;
    m.add("MIN_WINDOW", crate::window::MIN_FRAME_COST)?;
    m.add("DEFAULT_TIMEOUT", conn::DEFAULT_TIMEOUT_S)?;
    m.add("DEFAULT_CHUNK", conn::DEFAULT_CHUNK)?;
    m.add("MIN_CHUNK", conn::MIN_CHUNK)?;
    m.add("MAX_CHUNK", conn::MAX_CHUNK)?;
    m.add("MAX_RATE", crate::rate::MAX_RATE)?;
    m.add("ERROR_CODES", PyTuple::new(m.py(), crate::error::CODES)?)?;
    m.add("STATS_FIELDS", PyTuple::new(m.py(), STATS_FIELDS)?)?;
    m.add("CONTENT_ALGORITHM", crate::checksum::CONTENT_ALGORITHM)?;
    m.add("DEFAULT_COMPRESS", compress::DEFAULT_MODE)?;
    m.add("MAX_STREAMS", stripe::MAX_STREAMS)?;
    m.add("STRIPE_SIZE", stripe::STRIPE_SIZE)?;
    m.add(
        "DIGEST_ALGORITHMS",
        PyTuple::new(m.py(), crate::digest::ALGORITHMS)?,
    )?;
    m.add_class::<DataConnection>()?;
    m.add_class::<Transfer>()?;
    m.add_class::<Stats>()?;
    m.add_class::<JournalEntry>()?;
    m.add_function(wrap_pyfunction!(connect, m)?)?;
    m.add_function(wrap_pyfunction!(shutdown, m)?)?;
    m.add_function(wrap_pyfunction!(start_send, m)?)?;
    m.add_function(wrap_pyfunction!(start_recv, m)?)?;
    m.add_function(wrap_pyfunction!(image_digest, m)?)?;
    m.add_function(wrap_pyfunction!(start_bridge, m)?)?;
    m.add_function(wrap_pyfunction!(list_journals, m)?)?;
    m.add_function(wrap_pyfunction!(discard_journal, m)?)?;
    Ok(())
}
