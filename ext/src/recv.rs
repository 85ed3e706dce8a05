//! The receiving engine: answer the open handshake, verify frames, put them back in order
//! (a reorder buffer no larger than the window), write them in sequence, acknowledge what is
//! written and name what is missing, checkpoint progress into the journal, and on END flush,
//! optionally verify, and report DONE.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Message;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::checksum::{digest_hex, is_zero, Digest, CHECKSUM_ALGORITHM, DIGEST_ALGORITHM};
use crate::conn::{chunk_room, DataConn, MAX_CHUNK, MIN_CHUNK};
use crate::error::{Error, Result};
use crate::faults::Faults;
use crate::frame::{
    Ack, AckBody, AckKind, ChunkHeader, EndSummary, Kind, HEADER_LEN, MAX_NACK_RANGES,
    MAX_ZERO_LEN, PROTOCOL_VERSION,
};
use crate::handshake::{decode, encode, OpenReply, OpenRequest};
use crate::io::Sink;
use crate::journal::{self, Journal};
use crate::send::{Stall, Subjects};
use crate::stats::{Progress, State};
use crate::window::{frame_cost, max_frames_in_window, MAX_WINDOW, MIN_FRAME_COST};

/// Writes in flight to the target; NBD pipelines them on its connection.
const WRITE_DEPTH: usize = 16;
/// Longest gap between acks while the receiver is alive (also while it flushes or verifies).
const KEEPALIVE: Duration = Duration::from_secs(2);
/// How often missing frames are asked for again while they stay missing.
const NACK_INTERVAL: Duration = Duration::from_millis(250);
/// A frame that arrives damaged this many times ends the transfer.
const MAX_CORRUPT: u32 = 8;
/// Checkpoint into the journal after this much progress, or this much time.
const CHECKPOINT_BYTES: u64 = 256 << 20;
const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);
/// Bytes of frames held ahead of a gap: twice the largest window, so a genuine sender
/// never reaches it and nobody else can make the receiver hold more.
const REORDER_LIMIT: usize = 2 * MAX_WINDOW as usize;
/// Frames of another session for this long, and none of ours: we lost a receiver race.
const RACE_LOST_AFTER: Duration = Duration::from_secs(3);
/// How long a finished receiver keeps answering a sender that did not hear its DONE.
const LINGER: Duration = Duration::from_secs(10);

pub struct RecvOptions {
    pub window: u64,
    pub timeout: Option<Duration>,
    pub verify: bool,
    /// The target is known to read as zeros: zero frames need not be written.
    pub target_is_zero: bool,
    /// Journal file for this transfer; `None` for targets that cannot resume (streams).
    pub journal: Option<PathBuf>,
    /// Continue an interrupted transfer from its journal.
    pub resume: bool,
    /// The target as the user named it, recorded in the journal.
    pub target: String,
}

/// What the receiver remembers of a frame to verify the target afterwards.
struct Record {
    header: ChunkHeader,
}

/// A completed write: its sequence's cost in the window, disk bytes and kind.
struct Written {
    cost: u64,
    len: u64,
    kind: Kind,
}

struct Receiver<'a> {
    conn: &'a DataConn,
    subjects: &'a Subjects,
    progress: &'a Progress,
    sink: Arc<dyn Sink>,
    faults: Option<Faults>,
    session: u32,
    window: u64,
    size: u64,
    chunk: u64,
    skip_zeros: bool,
    verify: bool,
    /// Next frame to hand to the target, and where it must start.
    next_submit: u64,
    next_offset: u64,
    /// Frames that arrived ahead of `next_submit`, bounded by `max_ahead`.
    reorder: BTreeMap<u64, (ChunkHeader, Bytes)>,
    reorder_bytes: usize,
    max_ahead: u64,
    /// One past the highest frame seen.
    received: u64,
    writes: FuturesOrdered<BoxFuture<'static, Result<Written>>>,
    /// Every frame below this is written (the cumulative ack).
    written_frames: u64,
    written_bytes: u64,
    written_data: u64,
    written_zero: u64,
    unacked_cost: u64,
    digest: Digest,
    /// Checksums of frames submitted since the last checkpoint, from its `next_seq` on.
    unjournaled: VecDeque<u64>,
    journal: Option<Journal>,
    last_checkpoint: Instant,
    end: Option<(u64, EndSummary)>,
    corrupt: HashMap<u64, u32>,
    records: Vec<Record>,
    last_ack: Instant,
    last_nack: Instant,
    seen_own_session: bool,
    /// When frames of another session started arriving before any of ours.
    foreign_since: Option<Instant>,
    /// A checksummed frame of our session arrived since the main loop last looked.
    heard_sender: bool,
    /// A stream of writes: frames address any offset (see `OpenRequest::writes`).
    write_stream: bool,
}

impl Receiver<'_> {
    /// Missing frames below `received` as ranges, for the sender to send again.
    fn missing(&self) -> Vec<(u64, u32)> {
        let mut ranges = Vec::new();
        let mut expect = self.next_submit;
        for &seq in self.reorder.keys().chain(std::iter::once(&self.received)) {
            if seq > expect && ranges.len() < MAX_NACK_RANGES {
                ranges.push((expect, (seq - expect).min(u64::from(u32::MAX)) as u32));
            }
            expect = expect.max(seq + 1);
        }
        ranges
    }

    async fn publish_ack(&mut self, ack: Ack) {
        if self.faults.as_mut().is_some_and(Faults::drop_ack) {
            return;
        }
        let _ = self
            .conn
            .client
            .publish(self.subjects.acks.clone(), ack.encode())
            .await;
    }

    fn ack_frame(&self, kind: AckKind, next_seq: u64, body: AckBody) -> Ack {
        Ack {
            kind,
            session: self.session,
            next_seq,
            received: self.received.max(self.next_submit),
            written: self.written_bytes,
            window: self.window,
            body,
        }
    }

    /// Acknowledge what is written and name what is missing.
    async fn ack(&mut self) {
        let missing = self.missing();
        let body = if missing.is_empty() {
            AckBody::None
        } else {
            AckBody::Missing(missing)
        };
        if !matches!(body, AckBody::None) {
            self.last_nack = Instant::now();
        }
        let ack = self.ack_frame(AckKind::Ack, self.written_frames, body);
        self.publish_ack(ack).await;
        self.unacked_cost = 0;
        self.last_ack = Instant::now();
    }

    /// Report a failure to the sender (so it stops at once) and return it.
    async fn fail(&mut self, err: Error) -> Error {
        let body = AckBody::Error {
            code: err.code().to_string(),
            message: err.to_string(),
        };
        let ack = self.ack_frame(AckKind::Error, self.written_frames, body);
        let _ = self
            .conn
            .client
            .publish(self.subjects.acks.clone(), ack.encode())
            .await;
        let _ = self.conn.client.flush().await;
        match (&err, &self.journal) {
            (Error::Timeout(m), Some(j)) => Error::Timeout(format!(
                "{m}; progress is kept in {}: run the same recv with --resume to continue",
                j.path().display()
            )),
            _ => err,
        }
    }

    /// Run `work`, sending keepalive acks meanwhile so the sender does not time out.
    async fn keepalive<T>(&mut self, work: BoxFuture<'_, Result<T>>) -> Result<T> {
        let mut work = work;
        loop {
            tokio::select! {
                r = &mut work => return r,
                _ = tokio::time::sleep(KEEPALIVE) => {
                    let ack = self.ack_frame(AckKind::Ack, self.written_frames, AckBody::None);
                    let _ = self.conn.client.publish(self.subjects.acks.clone(), ack.encode()).await;
                }
            }
        }
    }

    /// Take in one message from the chunk subject. Returns true when it filled a gap or
    /// opened a new one (worth an immediate ack).
    async fn intake(&mut self, payload: Bytes) -> Result<bool> {
        let (header, body) = match ChunkHeader::parse(&payload) {
            Ok(v) => v,
            Err(_) => {
                Progress::add(&self.progress.bad_frames, 1);
                return Ok(false);
            }
        };
        if header.session != self.session {
            // Frames of an earlier session are normal just after a (re)open; frames of
            // another session that keep coming while none of ours do mean the sender picked
            // another receiver's reply in a race between two receivers.
            if !self.seen_own_session && header.kind != Kind::Abort && header.verify(body) {
                let since = *self.foreign_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= RACE_LOST_AFTER {
                    return Err(Error::Busy(format!(
                        "another receiver took transfer {}; only one receiver may serve an id",
                        self.progress.transfer_id
                    )));
                }
            }
            Progress::add(&self.progress.bad_frames, 1);
            return Ok(false);
        }
        if !header.verify(body) {
            Progress::add(&self.progress.corrupt_frames, 1);
            if header.seq >= self.next_submit && header.seq < self.next_submit + self.max_ahead {
                let n = self.corrupt.entry(header.seq).or_insert(0);
                *n += 1;
                if *n >= MAX_CORRUPT {
                    return Err(Error::Integrity(format!(
                        "frame {} at offset {} arrived damaged {n} times; something between the hosts corrupts data",
                        header.seq, header.offset
                    )));
                }
                self.received = self.received.max(header.seq + 1);
                return Ok(true);
            }
            return Ok(false);
        }
        self.seen_own_session = true;
        self.heard_sender = true;
        match header.kind {
            Kind::Abort => {
                // The sender's own error code: a cancelled sender's receiver ends cancelled.
                let (code, why) = crate::frame::failure(body)
                    .unwrap_or_else(|_| ("aborted".into(), String::from_utf8_lossy(body).into()));
                return Err(Error::from_remote(
                    &code,
                    &format!("the sender gave up: {why}"),
                ));
            }
            Kind::Close | Kind::Keepalive => return Ok(false),
            _ => {}
        }
        if header.seq < self.next_submit || self.reorder.contains_key(&header.seq) {
            Progress::add(&self.progress.duplicate_frames, 1);
            return Ok(self.last_ack.elapsed() >= Duration::from_millis(100));
        }
        let fits = header.kind == Kind::End || check_bounds(&header, self.size, self.chunk).is_ok();
        if header.seq >= self.next_submit + self.max_ahead
            || !fits
            || self.reorder_bytes + payload.len() > REORDER_LIMIT
        {
            // Beyond any window the sender may use, or outside the disk: never a frame of
            // this transfer, and never allowed to hold memory.
            Progress::add(&self.progress.bad_frames, 1);
            return Ok(false);
        }
        let opened_gap = header.seq > self.received;
        let filled_gap = header.seq < self.received;
        self.received = self.received.max(header.seq + 1);
        self.reorder_bytes += payload.len();
        self.reorder.insert(header.seq, (header, payload));
        self.submit()?;
        Ok(opened_gap || filled_gap)
    }

    /// Hand frames to the target in sequence order, up to WRITE_DEPTH in flight.
    fn submit(&mut self) -> Result<()> {
        while self.writes.len() < WRITE_DEPTH {
            let Some((header, payload)) = self.reorder.remove(&self.next_submit) else {
                break;
            };
            self.reorder_bytes -= payload.len();
            let placed = if self.write_stream {
                check_bounds(&header, self.size, self.chunk)
            } else {
                check_frame(&header, self.next_offset, self.size, self.chunk)
            };
            if placed.is_err() {
                // Not the frame that belongs here (forged, or from a confused sender): drop
                // it; the gap it leaves is named in the next ack and sent again.
                Progress::add(&self.progress.bad_frames, 1);
                break;
            }
            self.next_submit += 1;
            self.corrupt.remove(&header.seq);
            if header.kind == Kind::End {
                let summary = EndSummary::decode(&payload[HEADER_LEN..])
                    .map_err(|e| Error::Protocol(format!("END frame: {e}")))?;
                self.end = Some((header.seq, summary));
                continue;
            }
            self.next_offset += header.length;
            self.digest.update(header.checksum);
            self.unjournaled.push_back(header.checksum);
            let (len, kind) = (header.length, header.kind);
            Progress::add(&self.progress.frames, 1);
            let write = match kind {
                Kind::Data => {
                    Progress::add(&self.progress.data_bytes, len);
                    self.sink.write(header.offset, payload.slice(HEADER_LEN..))
                }
                Kind::Zero if self.skip_zeros => {
                    Progress::add(&self.progress.zero_bytes, len);
                    futures::future::ready(Ok(())).boxed()
                }
                _ => {
                    Progress::add(&self.progress.zero_bytes, len);
                    self.sink.zero(header.offset, len, kind == Kind::Trim)
                }
            };
            let cost = if kind == Kind::Data {
                frame_cost(len)
            } else {
                MIN_FRAME_COST
            };
            self.writes.push_back(
                write
                    .map(move |r| r.map(|()| Written { cost, len, kind }))
                    .boxed(),
            );
            if self.verify {
                self.records.push(Record { header });
            }
        }
        Ok(())
    }

    fn completed(&mut self, w: Written) {
        self.written_frames += 1;
        self.written_bytes += w.len;
        if w.kind == Kind::Data {
            self.written_data += w.len;
        } else {
            self.written_zero += w.len;
        }
        self.unacked_cost += w.cost;
        Progress::add(&self.progress.done_bytes, w.len);
    }

    fn finished(&self) -> bool {
        self.end.is_some() && self.writes.is_empty() && self.reorder.is_empty()
    }

    /// Flush the target, then record the durable prefix in the journal.
    async fn checkpoint(&mut self) -> Result<()> {
        let Some(base) = self.journal.as_ref().map(|j| j.progress.next_seq) else {
            return Ok(());
        };
        if self.written_frames <= base {
            return Ok(());
        }
        let sink = self.sink.clone();
        self.keepalive(sink.flush()).await?;
        let n = (self.written_frames - base) as usize;
        let sums: Vec<u64> = self
            .unjournaled
            .drain(..n.min(self.unjournaled.len()))
            .collect();
        if let Some(j) = self.journal.as_mut() {
            j.checkpoint(
                self.written_frames,
                self.written_bytes,
                self.written_data,
                self.written_zero,
                &sums,
            )?;
        }
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    fn checkpoint_due(&self) -> bool {
        self.journal.as_ref().is_some_and(|j| {
            self.written_frames > j.progress.next_seq
                && (self.written_bytes - j.progress.offset >= CHECKPOINT_BYTES
                    || self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY)
        })
    }
}

fn new_session() -> Result<u32> {
    loop {
        let s = getrandom::u32().map_err(|e| Error::Endpoint(format!("no randomness: {e}")))?;
        if s != 0 {
            return Ok(s);
        }
    }
}

/// The journal to continue from, after checking it belongs to this target.
fn open_journal(opts: &RecvOptions, id: &str) -> Result<Option<Journal>> {
    match (&opts.journal, opts.resume) {
        (None, true) => Err(Error::Usage(format!("{} is a stream: a transfer into it cannot be resumed", opts.target))),
        (None, false) => Ok(None),
        (Some(path), true) => {
            let j = Journal::open(path)?;
            if j.header.target != opts.target || j.header.transfer_id != id {
                return Err(Error::Usage(format!(
                    "the journal at {} belongs to transfer {} into {}, not {id} into {}",
                    path.display(), j.header.transfer_id, j.header.target, opts.target
                )));
            }
            Ok(Some(j))
        }
        (Some(path), false) if path.exists() => Err(Error::Usage(format!(
            "an interrupted transfer {id} left a journal at {}: add --resume to continue it, or delete that file to start over",
            path.display()
        ))),
        (Some(_), false) => Ok(None),
    }
}

pub async fn recv(
    conn: &DataConn,
    sink: Arc<dyn Sink>,
    subjects: &Subjects,
    opts: &RecvOptions,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<()> {
    let id = progress.transfer_id.clone();
    let mut journal = open_journal(opts, &id)?;
    // Is someone already serving this id? (A race between two new receivers is settled
    // by the session: frames carry the session of the receiver the sender picked.)
    let probe = encode(&OpenRequest {
        v: PROTOCOL_VERSION,
        probe: true,
        ..Default::default()
    });
    let ask = async_nats::Request::new()
        .payload(probe)
        .timeout(Some(Duration::from_millis(500)));
    if conn
        .client
        .send_request(subjects.open.clone(), ask)
        .await
        .is_ok()
    {
        return Err(Error::Busy(format!(
            "another receiver already serves transfer {id}; stop it or use another --id"
        )));
    }
    let nats = |e: async_nats::SubscribeError| Error::Nats(format!("NATS: {e}"));
    let mut opens = conn
        .client
        .subscribe(subjects.open.clone())
        .await
        .map_err(nats)?;
    let mut chunks = conn
        .client
        .subscribe(subjects.chunks.clone())
        .await
        .map_err(nats)?;
    conn.client
        .flush()
        .await
        .map_err(|e| Error::Nats(format!("NATS: {e}")))?;
    progress.set_state(State::Waiting);

    let session = new_session()?;
    let (request, chunk, window) = accept(
        conn,
        &sink,
        &mut opens,
        opts,
        journal.as_ref(),
        session,
        &id,
        cancel,
    )
    .await?;
    if request.writes {
        journal = None; // a live stream cannot be resumed
    }
    if journal.is_none() && !request.writes {
        if let Some(path) = &opts.journal {
            let header = journal::Header {
                v: PROTOCOL_VERSION,
                transfer_id: id.clone(),
                target: opts.target.clone(),
                size: request.size,
                chunk_size: chunk,
            };
            journal = Some(Journal::create(path, header)?);
        }
    }
    let start = journal
        .as_ref()
        .map(|j| j.progress.clone())
        .unwrap_or_default();
    progress.size.store(request.size, Relaxed);
    progress.chunk_size.store(chunk, Relaxed);
    progress.window.store(window, Relaxed);
    progress.done_bytes.store(start.offset, Relaxed);
    progress.data_bytes.store(start.data_bytes, Relaxed);
    progress.zero_bytes.store(start.zero_bytes, Relaxed);
    progress.set_state(State::Running);

    let mut rx = Receiver {
        conn,
        subjects,
        progress,
        sink: sink.clone(),
        faults: Faults::from_env(),
        session,
        window,
        size: request.size,
        chunk,
        skip_zeros: opts.target_is_zero && !sink.caps().sequential,
        verify: opts.verify || request.verify,
        next_submit: start.next_seq,
        next_offset: start.offset,
        reorder: BTreeMap::new(),
        reorder_bytes: 0,
        max_ahead: max_frames_in_window(MAX_WINDOW) as u64 + 8,
        received: start.next_seq,
        writes: FuturesOrdered::new(),
        written_frames: start.next_seq,
        written_bytes: start.offset,
        written_data: start.data_bytes,
        written_zero: start.zero_bytes,
        unacked_cost: 0,
        digest: start.digest.clone(),
        unjournaled: VecDeque::new(),
        journal,
        last_checkpoint: Instant::now(),
        end: None,
        corrupt: HashMap::new(),
        records: Vec::new(),
        last_ack: Instant::now(),
        last_nack: Instant::now(),
        seen_own_session: false,
        foreign_since: None,
        heard_sender: false,
        write_stream: request.writes,
    };
    let mut stall = Stall::new(opts.timeout);
    let mut tick = tokio::time::interval(NACK_INTERVAL);

    while !rx.finished() {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(rx.fail(Error::Cancelled).await),
            Some(done) = rx.writes.next() => {
                match done {
                    Ok(w) => rx.completed(w),
                    Err(e) => return Err(rx.fail(e).await),
                }
                if let Err(e) = rx.submit() {
                    return Err(rx.fail(e).await);
                }
                if rx.unacked_cost >= window / 4 || rx.writes.is_empty() {
                    rx.ack().await;
                }
                if rx.checkpoint_due() {
                    if let Err(e) = rx.checkpoint().await {
                        return Err(rx.fail(e).await);
                    }
                }
            }
            msg = chunks.next() => {
                let msg = msg.ok_or_else(|| Error::Nats("the chunk subscription ended".into()))?;
                match rx.intake(msg.payload).await {
                    Ok(urgent) => {
                        // Only a genuine frame of this transfer shows the sender is alive:
                        // garbage from others must not keep a dead transfer open.
                        if std::mem::take(&mut rx.heard_sender) {
                            stall.reset();
                        }
                        if urgent {
                            rx.ack().await;
                        }
                    }
                    Err(e) => return Err(rx.fail(e).await),
                }
            }
            msg = opens.next() => {
                let Some(msg) = msg else { continue };
                match decode::<OpenRequest>("open request", &msg.payload) {
                    Ok(req) if req.resume && !req.probe => {
                        // The sender restarted: continue from what we hold, in a new session.
                        rx.session = new_session()?;
                        rx.seen_own_session = false;
                        rx.foreign_since = None;
                        rx.corrupt.clear();
                        let reply = OpenReply {
                            v: PROTOCOL_VERSION,
                            ok: true,
                            session: rx.session,
                            chunk_size: chunk,
                            window,
                            max_payload: conn.max_payload,
                            target: sink.caps(),
                            target_size: sink.size(),
                            resume_seq: rx.next_submit,
                            resume_offset: rx.next_offset,
                            ..Default::default()
                        };
                        if let Some(to) = msg.reply {
                            let _ = conn.client.publish(to, encode(&reply)).await;
                        }
                        stall.reset();
                    }
                    _ => refuse(conn, msg, &Error::Busy(format!(
                        "transfer {id} is already in progress; its sender may take it over with --resume"
                    ))).await,
                }
            }
            _ = tick.tick() => {
                let gaps = rx.received > rx.next_submit + rx.reorder.len() as u64;
                if (gaps && rx.last_nack.elapsed() >= NACK_INTERVAL) || rx.last_ack.elapsed() >= KEEPALIVE {
                    rx.ack().await;
                }
            }
            _ = stall.expired() => {
                let err = Error::Timeout(format!(
                    "the sender went quiet for {} at offset {} of {}",
                    stall.describe(), rx.written_bytes, rx.size
                ));
                return Err(rx.fail(err).await);
            }
        }
    }

    // Every write is complete; make them durable, then check the whole transfer.
    let Some((end_seq, summary)) = rx.end else {
        return Err(rx
            .fail(Error::Protocol("transfer ended without END".into()))
            .await);
    };
    progress.set_state(State::Finishing);
    rx.ack().await;
    let flushed = sink.flush();
    if let Err(e) = rx.keepalive(flushed).await {
        return Err(rx.fail(e).await);
    }
    let ours = rx.digest.value();
    if ours != summary.digest || summary.frames != end_seq {
        let err = Error::Integrity(format!(
            "digest mismatch: the sender sent {} over {} frames but {} arrived as {}",
            digest_hex(&summary.digest),
            summary.frames,
            end_seq,
            digest_hex(&ours)
        ));
        return Err(rx.fail(err).await);
    }
    if rx.verify {
        let records = std::mem::take(&mut rx.records);
        if let Err(e) = rx
            .keepalive(verify_target(sink.clone(), records, chunk).boxed())
            .await
        {
            return Err(rx.fail(e).await);
        }
        progress.verified.store(true, Relaxed);
    }
    progress.set_digest(digest_hex(&ours));
    if let Some(j) = rx.journal.take() {
        j.remove()?;
    }
    let done = rx.ack_frame(
        AckKind::Done,
        end_seq + 1,
        AckBody::Done {
            digest: ours,
            verified: rx.verify,
        },
    );
    rx.publish_ack(done.clone()).await;
    // Linger: if DONE is lost, the sender repeats END; answer until it says CLOSE.
    let deadline = tokio::time::Instant::now() + opts.timeout.unwrap_or(LINGER).min(LINGER);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep_until(deadline) => break,
            msg = chunks.next() => {
                let Some(msg) = msg else { break };
                match ChunkHeader::decode(&msg.payload) {
                    Ok((h, _)) if h.session == rx.session && h.kind == Kind::Close => break,
                    Ok((h, _)) if h.session == rx.session && h.kind == Kind::End => rx.publish_ack(done.clone()).await,
                    _ => {}
                }
            }
        }
    }
    let _ = conn.client.flush().await;
    Ok(())
}

/// Answer the open handshake: wait for the sender's request, check it, prepare the target.
#[allow(clippy::too_many_arguments)]
async fn accept(
    conn: &DataConn,
    sink: &Arc<dyn Sink>,
    opens: &mut async_nats::Subscriber,
    opts: &RecvOptions,
    journal: Option<&Journal>,
    session: u32,
    id: &str,
    cancel: &CancellationToken,
) -> Result<(OpenRequest, u64, u64)> {
    let stall = Stall::new(opts.timeout);
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => return Err(Error::Cancelled),
            _ = stall.expired() => return Err(Error::Timeout(format!(
                "no sender for transfer {id} appeared within {}; start `nbd-nats send SOURCE --id {id}`, or raise --timeout",
                stall.describe()
            ))),
            m = opens.next() => m.ok_or_else(|| Error::Nats("the open subscription ended".into()))?,
        };
        let request: OpenRequest = match decode("open request", &msg.payload) {
            Ok(r) => r,
            Err(e) => {
                refuse(conn, msg, &e).await;
                continue;
            }
        };
        if request.probe {
            refuse(
                conn,
                msg,
                &Error::Busy(format!("a receiver already waits for transfer {id}")),
            )
            .await;
            continue;
        }
        match negotiate(&request, conn.max_payload, opts, sink, journal).await {
            Ok((chunk, window)) => {
                let resume = journal.map(|j| &j.progress);
                let reply = OpenReply {
                    v: PROTOCOL_VERSION,
                    ok: true,
                    session,
                    chunk_size: chunk,
                    window,
                    max_payload: conn.max_payload,
                    target: sink.caps(),
                    target_size: sink.size(),
                    resume_seq: resume.map_or(0, |p| p.next_seq),
                    resume_offset: resume.map_or(0, |p| p.offset),
                    ..Default::default()
                };
                if let Some(reply_to) = msg.reply {
                    conn.client
                        .publish(reply_to, encode(&reply))
                        .await
                        .map_err(|e| Error::Nats(format!("NATS: {e}")))?;
                }
                return Ok((request, chunk, window));
            }
            Err(e) => {
                refuse(conn, msg, &e).await;
                // A request we cannot serve ends this receiver: the target or settings are wrong.
                if !matches!(e, Error::Protocol(_)) {
                    return Err(e);
                }
            }
        }
    }
}

async fn negotiate(
    req: &OpenRequest,
    max_payload: u64,
    opts: &RecvOptions,
    sink: &Arc<dyn Sink>,
    journal: Option<&Journal>,
) -> Result<(u64, u64)> {
    if req.v != PROTOCOL_VERSION {
        return Err(Error::Protocol(format!(
            "sender speaks protocol version {} (this build speaks {PROTOCOL_VERSION})",
            req.v
        )));
    }
    if req.checksum != CHECKSUM_ALGORITHM || req.digest != DIGEST_ALGORITHM {
        return Err(Error::Protocol(format!(
            "unsupported checksum {}/{}",
            req.checksum, req.digest
        )));
    }
    if !(MIN_CHUNK..=MAX_CHUNK).contains(&req.chunk_size) {
        return Err(Error::Protocol(format!(
            "chunk size {} outside {MIN_CHUNK}..={MAX_CHUNK}",
            req.chunk_size
        )));
    }
    let room = chunk_room(max_payload) & !4095;
    let chunk = match journal {
        // A resumed transfer must be cut exactly as before.
        Some(j) => {
            if j.header.size != req.size {
                return Err(Error::Usage(format!(
                    "the interrupted transfer was of {} bytes but the sender now offers {}",
                    j.header.size, req.size
                )));
            }
            if j.header.chunk_size > room.min(req.chunk_size.max(j.header.chunk_size)) {
                return Err(Error::Nats(format!(
                    "the interrupted transfer used {}-byte chunks, which no longer fit",
                    j.header.chunk_size
                )));
            }
            j.header.chunk_size
        }
        None => req.chunk_size.min(room),
    };
    if chunk < MIN_CHUNK {
        return Err(Error::Nats(format!(
            "the receiver's server max_payload of {max_payload} bytes is too small"
        )));
    }
    if req.writes && (opts.verify || req.verify || req.resume) {
        return Err(Error::Usage(
            "a stream of writes can be neither verified nor resumed".into(),
        ));
    }
    if (opts.verify || req.verify) && !sink.caps().can_read {
        return Err(Error::Usage(
            "the target cannot be read back, so --verify is impossible".into(),
        ));
    }
    sink.prepare(req.size).await?;
    let window = req
        .window
        .min(opts.window)
        .clamp(MIN_FRAME_COST, MAX_WINDOW);
    Ok((chunk, window))
}

async fn refuse(conn: &DataConn, msg: Message, err: &Error) {
    if let Some(reply_to) = msg.reply {
        let _ = conn
            .client
            .publish(reply_to, encode(&OpenReply::refuse(err)))
            .await;
    }
}

/// Validate a frame of our session against the disk and the negotiated limits, and its
/// place: it must start where the frame before it ended.
fn check_frame(h: &ChunkHeader, expected_offset: u64, size: u64, chunk: u64) -> Result<()> {
    if h.offset != expected_offset {
        let at = format!("frame {} at offset {}", h.seq, h.offset);
        return Err(Error::Protocol(format!(
            "{at}: expected offset {expected_offset}"
        )));
    }
    check_bounds(h, size, chunk)
}

/// The checks that need no knowledge of earlier frames: kind, length, and the disk's end.
fn check_bounds(h: &ChunkHeader, size: u64, chunk: u64) -> Result<()> {
    let bad = |why: String| {
        Err(Error::Protocol(format!(
            "frame {} at offset {}: {why}",
            h.seq, h.offset
        )))
    };
    match h.kind {
        Kind::End if h.offset != size => bad(format!("END before the end of the {size}-byte disk")),
        Kind::End => Ok(()),
        Kind::Data if h.length == 0 || h.length > chunk => {
            bad(format!("data length {} outside 1..={chunk}", h.length))
        }
        Kind::Zero | Kind::Trim if h.length == 0 || h.length > MAX_ZERO_LEN => bad(format!(
            "zero length {} outside 1..={MAX_ZERO_LEN}",
            h.length
        )),
        Kind::Data | Kind::Zero | Kind::Trim => match h.offset.checked_add(h.length) {
            Some(e) if e <= size => Ok(()),
            _ => bad(format!(
                "length {} runs past the end of the {size}-byte disk",
                h.length
            )),
        },
        _ => bad("not a block frame".into()),
    }
}

/// Re-read the target and check every frame's checksum (and zeros) against what arrived.
async fn verify_target(sink: Arc<dyn Sink>, records: Vec<Record>, chunk: u64) -> Result<()> {
    let mut reads = FuturesOrdered::new();
    let mut pending = records
        .into_iter()
        .flat_map(|r| split_for_reading(r, chunk));
    loop {
        while reads.len() < WRITE_DEPTH {
            let Some((header, offset, len)) = pending.next() else {
                break;
            };
            let read = sink.read(offset, len as usize);
            reads.push_back(read.map(move |r| r.map(|b| (header, offset, b))));
        }
        let Some(next) = reads.next().await else {
            return Ok(());
        };
        let (header, offset, data): (ChunkHeader, u64, Bytes) = next?;
        let good = match header.kind {
            Kind::Data => header.checksum_over(&data) == header.checksum,
            _ => is_zero(&data),
        };
        if !good {
            return Err(Error::Integrity(format!(
                "verify: the target differs from what was sent at offset {offset} ({} bytes)",
                data.len()
            )));
        }
    }
}

/// Data frames are read back whole; zero ranges in chunk-sized pieces; trims not at all.
fn split_for_reading(r: Record, chunk: u64) -> Vec<(ChunkHeader, u64, u64)> {
    let h = r.header;
    match h.kind {
        Kind::Data => vec![(h, h.offset, h.length)],
        Kind::Zero => {
            let mut out = Vec::new();
            let mut pos = h.offset;
            while pos < h.offset + h.length {
                let n = chunk.min(h.offset + h.length - pos);
                out.push((h, pos, n));
                pos += n;
            }
            out
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(kind: Kind, offset: u64, length: u64) -> ChunkHeader {
        ChunkHeader {
            kind,
            session: 1,
            seq: 0,
            offset,
            length,
            checksum: 0,
        }
    }

    #[test]
    fn frames_must_fit_the_disk_and_chunk() {
        assert!(check_frame(&h(Kind::Data, 0, 4096), 0, 8192, 4096).is_ok());
        assert!(check_frame(&h(Kind::Data, 0, 8192), 0, 8192, 4096).is_err());
        assert!(check_frame(&h(Kind::Data, 4096, 4096), 0, 8192, 4096).is_err());
        assert!(check_frame(&h(Kind::Zero, 4096, 8192), 4096, 8192, 4096).is_err());
        assert!(check_frame(&h(Kind::Zero, 0, 0), 0, 8192, 4096).is_err());
        assert!(check_frame(
            &h(Kind::Data, u64::MAX - 1, 4096),
            u64::MAX - 1,
            u64::MAX,
            8192
        )
        .is_err());
        assert!(check_frame(&h(Kind::End, 8192, 0), 8192, 8192, 4096).is_ok());
        assert!(check_frame(&h(Kind::End, 4096, 0), 4096, 8192, 4096).is_err());
    }

    #[test]
    fn zero_ranges_are_read_back_in_chunks() {
        let parts = split_for_reading(
            Record {
                header: h(Kind::Zero, 100, 10_000),
            },
            4096,
        );
        assert_eq!(parts.iter().map(|p| p.2).sum::<u64>(), 10_000);
        assert!(parts.iter().all(|p| p.2 <= 4096));
        assert!(split_for_reading(
            Record {
                header: h(Kind::Trim, 0, 10)
            },
            4096
        )
        .is_empty());
    }
}

#[cfg(test)]
mod verify_tests {
    //! `--verify` must catch a target that does not hold what was written. Real disks do not
    //! corrupt on demand, so this test uses an in-memory sink that flips one byte on write:
    //! a fault-injecting fake, used only for that.
    use super::*;
    use crate::io::SinkCaps;
    use std::sync::Mutex;

    struct Corrupting {
        data: Mutex<Vec<u8>>,
        flip_at: u64,
    }

    impl Sink for Corrupting {
        fn size(&self) -> Option<u64> {
            Some(self.data.lock().unwrap().len() as u64)
        }
        fn caps(&self) -> SinkCaps {
            SinkCaps {
                can_read: true,
                ..SinkCaps::default()
            }
        }
        fn prepare(&self, _size: u64) -> BoxFuture<'static, Result<()>> {
            futures::future::ready(Ok(())).boxed()
        }
        fn write(&self, offset: u64, data: Bytes) -> BoxFuture<'static, Result<()>> {
            let mut d = self.data.lock().unwrap();
            d[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            if (offset..offset + data.len() as u64).contains(&self.flip_at) {
                d[self.flip_at as usize] ^= 1;
            }
            futures::future::ready(Ok(())).boxed()
        }
        fn zero(&self, _o: u64, _l: u64, _t: bool) -> BoxFuture<'static, Result<()>> {
            futures::future::ready(Ok(())).boxed()
        }
        fn flush(&self) -> BoxFuture<'static, Result<()>> {
            futures::future::ready(Ok(())).boxed()
        }
        fn read(&self, offset: u64, len: usize) -> BoxFuture<'static, Result<Bytes>> {
            let d = self.data.lock().unwrap();
            futures::future::ready(Ok(Bytes::copy_from_slice(
                &d[offset as usize..offset as usize + len],
            )))
            .boxed()
        }
    }

    fn record(kind: Kind, seq: u64, offset: u64, payload: &[u8], length: u64) -> Record {
        let mut header = ChunkHeader {
            kind,
            session: 9,
            seq,
            offset,
            length,
            checksum: 0,
        };
        header.checksum = header.checksum_over(payload);
        Record { header }
    }

    async fn run(flip_at: u64) -> Result<()> {
        let payload = vec![0xabu8; 8192];
        let sink = Arc::new(Corrupting {
            data: Mutex::new(vec![0u8; 16384]),
            flip_at,
        });
        sink.write(0, Bytes::from(payload.clone())).await?;
        let records = vec![
            record(Kind::Data, 0, 0, &payload, 8192),
            record(Kind::Zero, 1, 8192, &[], 8192),
        ];
        verify_target(sink, records, 4096).await
    }

    #[tokio::test]
    async fn verify_passes_on_a_faithful_target() {
        assert!(run(u64::MAX).await.is_ok());
    }

    #[tokio::test]
    async fn verify_names_the_offset_of_a_corrupted_write() {
        let err = run(100).await.unwrap_err();
        assert_eq!(err.code(), "integrity");
        assert!(err.to_string().contains("at offset 0"), "{err}");
    }
}

#[cfg(test)]
mod fuzz {
    //! A million hostile messages through every decoder and check the receiver applies to
    //! what arrives on a transfer's subjects. Mutations start from valid frames (random
    //! bytes alone would rarely get past the magic), so decoding goes deep.
    use super::*;
    use crate::frame::{Ack, AckBody, AckKind, EndSummary};

    const CASES: usize = 1_000_000;
    const DISK: u64 = 1 << 30;
    const CHUNK: u64 = 1 << 20;

    fn seeds() -> Vec<Vec<u8>> {
        let h = |kind, length| ChunkHeader {
            kind,
            session: 7,
            seq: 3,
            offset: 4096,
            length,
            checksum: 0,
        };
        let mut data = vec![0u8; HEADER_LEN + 64];
        data[HEADER_LEN..].fill(0xa5);
        h(Kind::Data, 64).seal(&mut data);
        let end = EndSummary {
            digest: [1; 16],
            frames: 9,
            data_bytes: 1,
            zero_bytes: 2,
        }
        .encode();
        let ack = |kind, body| {
            Ack {
                kind,
                session: 7,
                next_seq: 3,
                received: 9,
                written: 1,
                window: 2,
                body,
            }
            .encode()
            .to_vec()
        };
        vec![
            data,
            h(Kind::Zero, 1 << 20).encode(&[]).0.to_vec(),
            h(Kind::Trim, 512).encode(&[]).0.to_vec(),
            ChunkHeader {
                offset: DISK,
                ..h(Kind::End, 0)
            }
            .encode(&end)
            .0
            .to_vec(),
            h(Kind::Abort, 0).encode(b"why").0.to_vec(),
            h(Kind::Close, 0).encode(&[]).0.to_vec(),
            ack(AckKind::Ack, AckBody::Missing(vec![(4, 2), (9, 1)])),
            ack(
                AckKind::Done,
                AckBody::Done {
                    digest: [2; 16],
                    verified: true,
                },
            ),
            ack(
                AckKind::Error,
                AckBody::Error {
                    code: "x".into(),
                    message: "y".into(),
                },
            ),
        ]
    }

    fn next(rng: &mut u64) -> u64 {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *rng
    }

    fn mutate(f: &mut Vec<u8>, rng: &mut u64) {
        for _ in 0..1 + next(rng) % 3 {
            let r = next(rng);
            let at = if f.is_empty() {
                0
            } else {
                (r >> 8) as usize % f.len()
            };
            match r % 7 {
                0 if !f.is_empty() => f[at] ^= 1 << ((r >> 40) % 8),
                1 if !f.is_empty() => {
                    f[at] = [0, 0xff, 0x7f, 0x80, r as u8][(r >> 32) as usize % 5]
                }
                2 => f.truncate(at),
                3 => f.extend((0..(r >> 20) % 64).map(|i| (r >> (i % 56)) as u8)),
                4 if f.len() >= 8 => {
                    let field = [
                        0,
                        1,
                        u64::MAX,
                        u64::MAX - 4095,
                        1 << 63,
                        DISK,
                        DISK - 1,
                        CHUNK + 1,
                    ][(r >> 24) as usize % 8];
                    let at = (at / 8) * 8;
                    if at + 8 <= f.len() {
                        f[at..at + 8].copy_from_slice(&field.to_le_bytes());
                    }
                }
                5 if f.len() > 3 => f[3] = (r >> 16) as u8 % 10, // another kind
                _ => {}
            }
        }
    }

    #[test]
    fn a_million_hostile_frames_never_panic_and_never_pass_unchecked() {
        let seeds = seeds();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut accepted = 0usize;
        for i in 0..CASES {
            let mut f = seeds[i % seeds.len()].clone();
            mutate(&mut f, &mut rng);
            if let Ok((h, payload)) = ChunkHeader::parse(&f) {
                let verified = h.verify(payload);
                if verified && check_bounds(&h, DISK, CHUNK).is_ok() {
                    accepted += 1;
                    // What passes may be written: it must describe itself truthfully.
                    match h.kind {
                        Kind::Data => assert_eq!(payload.len() as u64, h.length),
                        Kind::Zero | Kind::Trim => {
                            assert!(payload.is_empty() && h.length <= MAX_ZERO_LEN)
                        }
                        Kind::End => assert!(EndSummary::decode(payload).is_ok()),
                        _ => unreachable!("check_bounds passed a {:?}", h.kind),
                    }
                    assert!(h.offset.checked_add(h.length).is_some_and(|e| e <= DISK));
                }
                assert_eq!(verified, ChunkHeader::decode(&f).is_ok());
            }
            if let Ok(ack) = Ack::decode(&f) {
                if let AckBody::Missing(r) = &ack.body {
                    assert!(r.len() <= MAX_NACK_RANGES);
                }
            }
        }
        // Unmutated-in-effect cases get through; most mutations do not.
        assert!(accepted > 0 && accepted < CASES / 2, "{accepted}");
    }
}
