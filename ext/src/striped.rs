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

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::checksum::{content_hex, Merger};
use crate::conn::DataConn;
use crate::error::{Error, Result};
use crate::handshake::{decode, encode, key_follows, OpenReply, OpenRequest};
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
    pub key_file: Option<PathBuf>,
    pub journal: Option<PathBuf>,
}

type Running = FuturesUnordered<tokio::task::JoinHandle<Result<()>>>;

/// What the sub-streams share while they run: their figures, cancellation and digest.
struct Stripes {
    geometry: Geometry,
    merger: Arc<Merger>,
    progress: Vec<Arc<Progress>>,
    cancel: CancellationToken,
    running: Running,
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
        })
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
        let cap = parent.rate_limit.load(Relaxed).div_ceil(n);
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
        mut on_open: impl FnMut(async_nats::Message) -> futures::future::BoxFuture<'static, ()>,
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
                    let r = done.map_err(|e| Error::Endpoint(format!("a sub-stream stopped: {e}")))
                        .and_then(|r| r);
                    if let Err(e) = r {
                        // A sub-stream cancelled because another failed says less than that.
                        if first.as_ref().is_none_or(|f| f.code() == "cancelled") {
                            first = Some(e);
                        }
                        self.cancel.cancel();
                    }
                }
                Some(msg) = async { match opens.as_mut() { Some(o) => o.next().await, None => None } } => {
                    on_open(msg).await;
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
#[allow(clippy::too_many_arguments)]
pub async fn send(
    conn: &DataConn,
    source: Arc<dyn Source>,
    subjects: &Subjects,
    children: Vec<Child>,
    opts: &SendOptions,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<()> {
    let Some(stripes) =
        crate::send::send(conn, source.clone(), subjects, opts, progress, cancel).await?
    else {
        return Ok(());
    };
    let result = async {
        let geometry = Geometry::new(source.size(), stripes)?;
        let mut run = Stripes::new(geometry, &children, "send")?;
        progress.streams.store(geometry.count, Relaxed);
        progress.set_state(State::Running);
        for (k, child) in children
            .into_iter()
            .take(geometry.count as usize)
            .enumerate()
        {
            let conn = conn.sibling(k).await?;
            let source: Arc<dyn Source> =
                Arc::new(StripeSource::new(source.clone(), geometry, k as u64));
            let child_opts = SendOptions {
                chunk_size: opts.chunk_size,
                window: opts.window,
                timeout: opts.timeout,
                verify: opts.verify,
                resume: opts.resume,
                key_file: child.key_file,
                dirty: false,
                compress: opts.compress,
                stripes: None,
                tap: Some(geometry.tap(k as u64, run.merger.clone())),
            };
            let p = run.progress[k].clone();
            let stop = run.cancel.clone();
            let subjects = child.subjects;
            run.running.push(tokio::spawn(async move {
                crate::send::send(&conn, source, &subjects, &child_opts, &p, &stop)
                    .await
                    .map(|_| ())
            }));
        }
        run.wait(progress, cancel, None, |_| Box::pin(async {}))
            .await?;
        run.settle(progress)
    }
    .await
    .map_err(|e| progress.cause(e));
    settle_key(opts.key_file.as_deref(), &result);
    result
}

/// Receive into `sink` as `opts` says; when the sender asks to stripe the transfer and this
/// end agrees (`RecvOptions::can_stripe`), run the sub-streams `children`.
#[allow(clippy::too_many_arguments)]
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
    let result = async {
        let geometry = Geometry::new(request.size, stripes)?;
        let mut run = Stripes::new(geometry, &children, "recv")?;
        progress.size.store(request.size, Relaxed);
        progress.streams.store(geometry.count, Relaxed);
        progress.set_state(State::Running);
        for (k, child) in children
            .into_iter()
            .take(geometry.count as usize)
            .enumerate()
        {
            let conn = conn.sibling(k).await?;
            let sink: Arc<dyn Sink> = Arc::new(StripeSink::new(sink.clone(), geometry, k as u64));
            let child_opts = RecvOptions {
                window: opts.window,
                timeout: opts.timeout,
                verify: opts.verify,
                target_is_zero: opts.target_is_zero,
                journal: child.journal,
                resume: opts.resume,
                target: opts.target.clone(),
                expect_sha256: None,
                can_stripe: false,
                stripe: Some((
                    format!(
                        "stripe {k} of {}, {}-byte segments",
                        geometry.count, geometry.size
                    ),
                    geometry.tap(k as u64, run.merger.clone()),
                )),
            };
            let p = run.progress[k].clone();
            let stop = run.cancel.clone();
            let subjects = child.subjects;
            run.running.push(tokio::spawn(async move {
                match crate::recv::recv(&conn, sink, &subjects, &child_opts, &p, &stop).await {
                    Ok(None) => Ok(()),
                    Ok(Some(_)) => Err(Error::Protocol(
                        "a sub-stream asked to be striped again".into(),
                    )),
                    Err(e) => Err(e),
                }
            }));
        }
        // A sender that did not hear our yes asks again (the same key), or comes back
        // after a restart (the next key of its chain): it gets the same answer.
        let mut key = request.key.clone();
        let client = conn.client.clone();
        let id = progress.transfer_id.clone();
        let answer = move |msg: async_nats::Message| -> futures::future::BoxFuture<'static, ()> {
            let req: Option<OpenRequest> = decode("open request", &msg.payload).ok();
            let again = req.as_ref().is_some_and(|r| {
                !r.probe && (r.key == key || (r.resume && key_follows(&r.key, &key)))
            });
            let answer = if again {
                if let Some(r) = req {
                    key = r.key;
                }
                reply.clone()
            } else {
                OpenReply::refuse(&Error::Busy(format!(
                    "transfer {id} is running striped; only its sender may continue it"
                )))
            };
            let client = client.clone();
            Box::pin(async move {
                if let Some(to) = msg.reply {
                    let _ = tokio::time::timeout(
                        crate::conn::TIDY_BOUND,
                        client.publish(to, encode(&answer)),
                    )
                    .await;
                }
            })
        };
        run.wait(progress, cancel, Some(&mut opens), answer).await?;
        run.settle(progress)
    }
    .await
    .map_err(|e| progress.cause(e));
    // The journal of the whole transfer names it striped for a restarted receiver: kept
    // while a sub-stream may still be continued.
    if let Some(j) = journal.take() {
        if !result.as_ref().err().is_some_and(Error::resumable) {
            let _ = j.remove();
        }
    }
    result
}
