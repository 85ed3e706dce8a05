//! A transfer striped over several sub-streams (`--streams N`, docs/shaping.md "Striping").
//!
//! The transfer's own open asks for `stripes`; a receiver that agrees answers with them and
//! no data flows on the transfer's subjects. Each stripe (`stripe::Geometry`) then travels
//! as a transfer of its own, with its own id, connection (to another server of the list),
//! window, acks, retransmits, journal and sender key, of a disk that is the stripe. Both
//! ends merge the stripes' block hashes into the content digest of the whole image, which
//! is what a one-stream transfer of it reports. Each sub-stream checks its own bytes end to
//! end as any transfer does (frame digest, its stripe's content digest, `--verify`).

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::checksum::{content_hex, Merger};
use crate::conn::DataConn;
use crate::error::{Error, Result};
use crate::handshake::{decode, encode, key_follows, streams_record, OpenReply, OpenRequest};
use crate::io::{Sink, Source};
use crate::link::Subjects;
use crate::recv::{RecvOptions, StripedOpen};
use crate::send::{settle_key, SendOptions};
use crate::stats::{Progress, State};
use crate::stripe::{Geometry, StripeSink, StripeSource};

/// How often the whole transfer's figures are summed from its sub-streams, and a changed
/// rate cap is handed to them.
const TICK: Duration = Duration::from_millis(100);

/// One sub-stream as the caller names it: its transfer id and subjects, and where its end
/// keeps its sender key or journal.
pub struct Child {
    pub id: String,
    pub subjects: Subjects,
    /// Its sender key (sending end) or journal (receiving end).
    pub state: Option<PathBuf>,
}

type Running = FuturesUnordered<tokio::task::JoinHandle<(usize, Result<()>)>>;
/// Starts sub-stream `k` (to be resumed, when `true`).
type Start = Box<dyn Fn(usize, bool) -> tokio::task::JoinHandle<(usize, Result<()>)> + Send>;

/// What a sub-stream of a transfer being resumed does: resume where it left off when it
/// left something (`file`: its key or journal), start afresh when the interruption came
/// before it began.
fn resumes(resume: bool, file: Option<&PathBuf>) -> bool {
    resume && file.is_some_and(|f| f.exists())
}

/// Once the whole transfer is done, or can no longer be continued: the sub-streams' keys
/// or journals go.
fn settle_children<T>(files: &[PathBuf], result: &Result<T>) {
    if !result.as_ref().err().is_some_and(Error::resumable) {
        for f in files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// What the sub-streams share while they run: their figures, cancellation and digest.
struct Stripes {
    geometry: Geometry,
    merger: Arc<Merger>,
    progress: Vec<Arc<Progress>>,
    cancel: CancellationToken,
    running: Running,
    /// Sub-streams that ended well (a resumed sender may ask for them again).
    finished: Vec<bool>,
    start: Option<Start>,
}

impl Stripes {
    fn new(geometry: Geometry, children: &[Child], role: &'static str) -> Result<Stripes> {
        if children.len() < geometry.count as usize {
            return Err(Error::Usage(format!(
                "{} sub-streams were agreed but only {} are named",
                geometry.count,
                children.len()
            )));
        }
        Ok(Stripes {
            geometry,
            merger: Arc::new(Merger::new()),
            progress: children[..geometry.count as usize]
                .iter()
                .map(|c| Arc::new(Progress::new(&c.id, role)))
                .collect(),
            cancel: CancellationToken::new(),
            running: FuturesUnordered::new(),
            finished: vec![false; geometry.count as usize],
            start: None,
        })
    }

    /// Start every sub-stream, each with its share of the cap from its first frame.
    fn launch(&mut self, parent: &Progress, start: Start, resume: bool) {
        self.sum(parent);
        for k in 0..self.progress.len() {
            self.running.push(start(k, resume));
        }
        self.start = Some(start);
    }

    /// A resumed sender asks again for every sub-stream, also those that ended well here
    /// (it may not have heard their DONE): they run again from their journals.
    fn restart_finished(&mut self) {
        let Some(start) = self.start.as_ref() else {
            return;
        };
        for (k, done) in self.finished.iter_mut().enumerate() {
            if std::mem::take(done) {
                self.running.push(start(k, true));
            }
        }
    }

    /// The whole transfer's figures from its sub-streams' (and its cap handed to them).
    fn sum(&self, parent: &Progress) {
        let n = self.progress.len() as u64;
        let total = |f: fn(&Progress) -> &std::sync::atomic::AtomicU64| {
            self.progress
                .iter()
                .map(|p| f(p).load(Relaxed))
                .sum::<u64>()
        };
        parent.done_bytes.store(total(|p| &p.done_bytes), Relaxed);
        parent.data_bytes.store(total(|p| &p.data_bytes), Relaxed);
        parent.zero_bytes.store(total(|p| &p.zero_bytes), Relaxed);
        parent.frames.store(total(|p| &p.frames), Relaxed);
        parent.bad_frames.store(total(|p| &p.bad_frames), Relaxed);
        parent
            .duplicate_frames
            .store(total(|p| &p.duplicate_frames), Relaxed);
        parent
            .corrupt_frames
            .store(total(|p| &p.corrupt_frames), Relaxed);
        parent.retransmits.store(total(|p| &p.retransmits), Relaxed);
        parent.sent_bytes.store(total(|p| &p.sent_bytes), Relaxed);
        parent.wire_bytes.store(total(|p| &p.wire_bytes), Relaxed);
        parent.resumes.store(total(|p| &p.resumes), Relaxed);
        parent.window.store(total(|p| &p.window), Relaxed);
        let chunk = self
            .progress
            .iter()
            .map(|p| p.chunk_size.load(Relaxed))
            .max();
        parent.chunk_size.store(chunk.unwrap_or(0), Relaxed);
        // The cap is shared by the sub-streams that still have bytes to send.
        let busy = |p: &Progress| {
            let size = p.size.load(Relaxed);
            size == 0 || p.done_bytes.load(Relaxed) < size
        };
        let left = self.progress.iter().filter(|p| busy(p)).count() as u64;
        let cap = parent.rate_limit.load(Relaxed).div_ceil(left.clamp(1, n));
        for p in &self.progress {
            p.rate_limit.store(cap, Relaxed);
        }
        if self.progress.iter().any(|p| p.state() == State::Running) {
            parent.set_state(State::Running);
        }
    }

    /// Wait for every sub-stream, summing figures; `on_open` answers the transfer's own
    /// subject meanwhile. The first failure stops the others (resumably: each keeps what a
    /// resume needs) and is the result.
    async fn wait(
        &mut self,
        parent: &Progress,
        cancel: &CancellationToken,
        mut opens: Option<&mut async_nats::Subscriber>,
        mut on_open: impl FnMut(async_nats::Message) -> (BoxFuture<'static, ()>, bool),
    ) -> Result<()> {
        let mut tick = tokio::time::interval(TICK);
        let mut first: Option<Error> = None;
        while !self.running.is_empty() {
            tokio::select! {
                _ = cancel.cancelled(), if !self.cancel.is_cancelled() => {
                    // For good or not, as the whole transfer was cancelled.
                    for p in &self.progress {
                        p.abandoned.store(parent.abandoned.load(Relaxed), Relaxed);
                    }
                    self.cancel.cancel();
                }
                Some(done) = self.running.next() => {
                    let r = match done {
                        Ok((k, r)) => {
                            self.finished[k] = r.is_ok();
                            r
                        }
                        Err(e) => Err(Error::Endpoint(format!("a sub-stream stopped: {e}"))),
                    };
                    if let Err(e) = r {
                        // A sub-stream cancelled because another failed says less than that.
                        if first.as_ref().is_none_or(|f| f.code() == "cancelled") {
                            first = Some(e);
                        }
                        self.cancel.cancel();
                    }
                }
                Some(msg) = async { match opens.as_mut() { Some(o) => o.next().await, None => None } } => {
                    let (answer, resumed) = on_open(msg);
                    if resumed && !self.cancel.is_cancelled() {
                        self.restart_finished();
                    }
                    answer.await;
                }
                _ = tick.tick() => self.sum(parent),
            }
        }
        self.sum(parent);
        if cancel.is_cancelled() && first.as_ref().is_none_or(|f| f.code() == "cancelled") {
            return Err(Error::Cancelled);
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// After every sub-stream succeeded: the whole image's digest, and whether every
    /// sub-stream was verified.
    fn settle(&self, parent: &Progress) -> Result<()> {
        let digest = self.merger.value(self.geometry.disk).ok_or_else(|| {
            Error::Integrity(
                "the sub-streams did not cover the whole image: the transfer is not complete"
                    .into(),
            )
        })?;
        parent.set_digest(content_hex(&digest));
        let verified = self.progress.iter().all(|p| p.verified.load(Relaxed));
        parent.verified.store(verified, Relaxed);
        parent.done_bytes.store(self.geometry.disk, Relaxed);
        Ok(())
    }
}

/// Send `source` as `opts` says; striped over `children` when `opts.stripes` asks for it and
/// the receiver agrees, else as one stream.
pub async fn send(
    conn: &DataConn,
    source: Arc<dyn Source>,
    subjects: &Subjects,
    children: Vec<Child>,
    opts: &SendOptions,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<()> {
    let record = opts.key_file.as_deref().map(streams_record);
    check_resume(opts, record.as_deref(), &progress.transfer_id)?;
    if let Some(stale) = record.as_ref().filter(|_| !opts.resume) {
        let _ = std::fs::remove_file(stale); // of an earlier transfer of this id
    }
    let Some(stripes) =
        crate::send::send(conn, source.clone(), subjects, opts, progress, cancel).await?
    else {
        return Ok(());
    };
    if let Some(path) = &record {
        std::fs::write(path, format!("{}\n", stripes.count))
            .map_err(|e| Error::Endpoint(format!("cannot write {}: {e}", path.display())))?;
    }
    let keys: Vec<PathBuf> = children.iter().filter_map(|c| c.state.clone()).collect();
    let result = async {
        let geometry = Geometry::new(source.size(), stripes)?;
        let mut run = Stripes::new(geometry, &children, "send")?;
        progress.streams.store(geometry.count, Relaxed);
        progress.set_state(State::Running);
        let mut ends = Vec::new();
        for (k, child) in children.into_iter().take(run.progress.len()).enumerate() {
            let conn = Arc::new(conn.sibling(k).await?);
            let source: Arc<dyn Source> =
                Arc::new(StripeSource::new(source.clone(), geometry, k as u64));
            ends.push((
                conn,
                source,
                child,
                geometry.tap(k as u64, run.merger.clone()),
            ));
        }
        let (window, timeout, verify) = (opts.window, opts.timeout, opts.verify);
        let (compress, chunk_size) = (opts.compress, opts.chunk_size);
        let (progress_of, stop) = (run.progress.clone(), run.cancel.clone());
        let start: Start = Box::new(move |k, resume| {
            let (conn, source, child, tap) = &ends[k];
            let opts = SendOptions {
                chunk_size,
                window,
                timeout,
                verify,
                resume: resumes(resume, child.state.as_ref()),
                key_file: child.state.clone(),
                dirty: false,
                compress,
                stripes: None,
                tap: Some(tap.clone()),
            };
            let (conn, source, subjects) = (conn.clone(), source.clone(), child.subjects.clone());
            let (p, stop) = (progress_of[k].clone(), stop.clone());
            tokio::spawn(async move {
                let r = crate::send::send(&conn, source, &subjects, &opts, &p, &stop).await;
                (k, r.map(|_| ()))
            })
        });
        run.launch(progress, start, opts.resume);
        let quiet = |_| -> (BoxFuture<'static, ()>, bool) { (Box::pin(async {}), false) };
        run.wait(progress, cancel, None, quiet).await?;
        run.settle(progress)
    }
    .await
    .map_err(|e| progress.cause(e));
    settle_children(&keys, &result);
    settle_key(opts.key_file.as_deref(), &result);
    if let Some(path) = record.filter(|_| !opts.key_file.as_ref().is_some_and(|k| k.exists())) {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// A resume asks for the sub-streams the transfer was started with: the sender recorded
/// how many beside its key once the receiver agreed to them. Another count is refused
/// before anything is asked or changed, so the right resume can still follow.
fn check_resume(opts: &SendOptions, record: Option<&std::path::Path>, id: &str) -> Result<()> {
    let Some(path) = record.filter(|_| opts.resume) else {
        return Ok(());
    };
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(()); // started as one stream, or stopped before its sub-streams began
    };
    let started: u32 = text.trim().parse().map_err(|_| {
        Error::Usage(format!(
            "{} does not hold a number of sub-streams",
            path.display()
        ))
    })?;
    let asked = opts.stripes.map_or(1, |s| s.count);
    if asked != started {
        return Err(Error::Usage(format!(
            "transfer {id} was started as {started} sub-streams: resume it with --streams {started}"
        )));
    }
    Ok(())
}

/// Receive into `sink` as `opts` says; when the sender asks to stripe the transfer and this
/// end agrees (`RecvOptions::can_stripe`), run the sub-streams `children`.
pub async fn recv(
    conn: &DataConn,
    sink: Arc<dyn Sink>,
    subjects: &Subjects,
    children: Vec<Child>,
    opts: &RecvOptions,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<()> {
    let Some(open) =
        crate::recv::recv(conn, sink.clone(), subjects, opts, progress, cancel).await?
    else {
        return Ok(());
    };
    let StripedOpen {
        stripes,
        request,
        reply,
        mut opens,
        mut journal,
    } = open;
    let journals: Vec<PathBuf> = children.iter().filter_map(|c| c.state.clone()).collect();
    let result = async {
        let geometry = Geometry::new(request.size, stripes)?;
        let mut run = Stripes::new(geometry, &children, "recv")?;
        progress.size.store(request.size, Relaxed);
        progress.streams.store(geometry.count, Relaxed);
        progress.set_state(State::Running);
        let mut ends = Vec::new();
        for (k, child) in children.into_iter().take(run.progress.len()).enumerate() {
            let conn = Arc::new(conn.sibling(k).await?);
            let sink: Arc<dyn Sink> = Arc::new(StripeSink::new(sink.clone(), geometry, k as u64));
            let label = format!(
                "stripe {k} of {}, {}-byte segments",
                geometry.count, geometry.size
            );
            let tap = geometry.tap(k as u64, run.merger.clone());
            ends.push((conn, sink, child, label, tap));
        }
        let (window, timeout, verify) = (opts.window, opts.timeout, opts.verify);
        let (target_is_zero, target) = (opts.target_is_zero, opts.target.clone());
        let (progress_of, stop) = (run.progress.clone(), run.cancel.clone());
        let start: Start = Box::new(move |k, resume| {
            let (conn, sink, child, label, tap) = &ends[k];
            let opts = RecvOptions {
                window,
                timeout,
                verify,
                target_is_zero,
                journal: child.state.clone(),
                resume: resumes(resume, child.state.as_ref()),
                target: target.clone(),
                expect_sha256: None,
                can_stripe: false,
                stripe: Some((label.clone(), tap.clone())),
            };
            let (conn, sink, subjects) = (conn.clone(), sink.clone(), child.subjects.clone());
            let (p, stop) = (progress_of[k].clone(), stop.clone());
            tokio::spawn(async move {
                let r = match crate::recv::recv(&conn, sink, &subjects, &opts, &p, &stop).await {
                    Ok(None) => Ok(()),
                    Ok(Some(_)) => Err(Error::Protocol(
                        "a sub-stream asked to be striped again".into(),
                    )),
                    Err(e) => Err(e),
                };
                (k, r)
            })
        });
        run.launch(progress, start, opts.resume);
        // A sender that did not hear our yes asks again (the same key), or comes back
        // after a restart (the next key of its chain): it gets the same answer, and every
        // sub-stream runs again for it.
        let mut key = request.key.clone();
        let client = conn.client.clone();
        let id = progress.transfer_id.clone();
        let answer = move |msg: async_nats::Message| {
            let req: Option<OpenRequest> = decode("open request", &msg.payload).ok();
            let again = req.as_ref().is_some_and(|r| {
                !r.probe && (r.key == key || (r.resume && key_follows(&r.key, &key)))
            });
            let mut resumed = false;
            let answer = if again {
                if let Some(r) = req.filter(|r| r.key != key) {
                    key = r.key;
                    resumed = true;
                }
                reply.clone()
            } else {
                OpenReply::refuse(&Error::Busy(format!(
                    "transfer {id} is running striped; only its sender may continue it"
                )))
            };
            let client = client.clone();
            let send: BoxFuture<'static, ()> = Box::pin(async move {
                if let Some(to) = msg.reply {
                    let _ = tokio::time::timeout(
                        crate::conn::TIDY_BOUND,
                        client.publish(to, encode(&answer)),
                    )
                    .await;
                }
            });
            (send, resumed)
        };
        run.wait(progress, cancel, Some(&mut opens), answer).await?;
        run.settle(progress)
    }
    .await
    .map_err(|e| progress.cause(e));
    // The sub-streams' journals, and the one of the whole transfer that names it striped
    // for a restarted receiver, are kept while it may still be continued.
    settle_children(&journals, &result);
    if let Some(j) = journal.take() {
        if !result.as_ref().err().is_some_and(Error::resumable) {
            let _ = j.remove();
        }
    }
    result
}
