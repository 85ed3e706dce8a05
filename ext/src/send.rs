//! The sending engine: plan frames from source extents, read ahead, publish within the
//! receiver's window, send again what the receiver reports missing (re-reading the source,
//! never buffering), re-open the transfer when the receiver goes silent, finish with END and
//! wait for the receiver's DONE.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use async_nats::{Message, Subject};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, FuturesUnordered};
use futures::{FutureExt, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::checksum::{digest_hex, is_zero, Digest, CHECKSUM_ALGORITHM, DIGEST_ALGORITHM};
use crate::conn::{fit_chunk, DataConn};
use crate::error::{Error, Result};
use crate::extents::{pieces, Extent};
use crate::faults::{ChunkFate, Faults};
use crate::frame::{
    Ack, AckBody, AckKind, ChunkHeader, EndSummary, Kind, HEADER_LEN, PROTOCOL_VERSION,
};
use crate::handshake::{decode, encode, OpenReply, OpenRequest, SenderKey, CHECKING};
use crate::io::Source;
use crate::pool::Pool;
use crate::stats::{Progress, State};
use crate::window::{frame_cost, max_frames_in_window, Window};

/// How much of the disk one extent query covers.
const EXTENT_SPAN: u64 = 1 << 30;
/// Bytes of source reads in flight. A local NBD server answers a 1 MiB read in well under a
/// millisecond, so a few keep it busy; more cost memory and cache. Measured against 16 MiB
/// on the benchmark (1 GiB random image, 6 rounds): qemu-nbd's CPU per GiB 0.50 -> 0.38 s,
/// the sender's 0.63 -> 0.61 s, throughput +5%.
const READ_AHEAD_BYTES: u64 = 4 << 20;
/// Frames the receiver has not seen for this long, with no progress meanwhile, are resent.
const RTO: Duration = Duration::from_secs(1);
/// No ack at all for this long: the receiver is gone; re-open the transfer until --timeout.
const SILENCE: Duration = Duration::from_secs(6);
/// A frame sent this many times without being written ends the transfer.
const MAX_RETRIES: u32 = 10;
/// How often the sender says it is alive while it has nothing to send.
const KEEPALIVE: Duration = Duration::from_secs(2);

/// The subjects of one transfer, formatted by the Python `subjects` module.
#[derive(Clone)]
pub struct Subjects {
    pub open: Subject,
    pub chunks: Subject,
    pub acks: Subject,
}

pub struct SendOptions {
    pub chunk_size: Option<u64>,
    pub window: u64,
    /// How long to wait for the receiver to appear or to answer; `None` waits forever.
    pub timeout: Option<Duration>,
    pub verify: bool,
    /// Take over a transfer whose previous sender died (a running receiver continues).
    pub resume: bool,
    /// Where this sender keeps its key (`SenderKey`), so that a later `--resume` can show
    /// it is the transfer's own sender. `None`: nobody can resume this sender's transfer.
    pub key_file: Option<std::path::PathBuf>,
}

/// What "wait forever" means for a deadline.
pub(crate) const FOREVER: Duration = Duration::from_secs(86_400 * 365);

/// A deadline that slides forward whenever the peer shows life.
pub struct Stall {
    timeout: Option<Duration>,
    at: Instant,
}

impl Stall {
    pub fn new(timeout: Option<Duration>) -> Stall {
        let mut s = Stall {
            timeout,
            at: Instant::now(),
        };
        s.reset();
        s
    }
    pub fn reset(&mut self) {
        // Far future when waiting forever.
        self.at = Instant::now() + self.timeout.unwrap_or(FOREVER);
    }
    pub async fn expired(&self) {
        tokio::time::sleep_until(self.at).await
    }
    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.at
    }
    pub fn describe(&self) -> String {
        self.timeout
            .map_or_else(|| "ever".into(), |t| format!("{}s", t.as_secs_f64()))
    }
}

/// One ack of our session, or `None` for a message that is not one (counted as bad).
pub(crate) fn read_ack(
    msg: Option<Message>,
    session: u32,
    progress: &Progress,
) -> Result<Option<Ack>> {
    let msg = msg.ok_or_else(|| Error::Nats("the ack subscription ended".into()))?;
    match Ack::decode(&msg.payload) {
        Ok(a) if a.session == session => Ok(Some(a)),
        _ => {
            Progress::add(&progress.bad_frames, 1);
            Ok(None)
        }
    }
}

/// What an ack asks of the sender, beyond moving the window.
pub(crate) enum AckRequest {
    Nothing,
    /// Frames the receiver names as missing.
    Resend(Vec<u64>),
    /// DONE: the receiver's digest and whether it verified the target.
    Done([u8; 16], bool),
}

/// Read an ack's kind and body: the receiver's error, DONE (only right after END, frame
/// `end_seq`), or the missing frames it names.
pub(crate) fn ack_request(ack: Ack, end_seq: Option<u64>) -> Result<AckRequest> {
    match (ack.kind, ack.body) {
        (AckKind::Error, AckBody::Error { code, message }) => {
            Err(Error::from_remote(&code, &message))
        }
        (AckKind::Done, AckBody::Done { digest, verified }) => match end_seq {
            Some(end) if ack.next_seq == end + 1 => Ok(AckRequest::Done(digest, verified)),
            _ => Err(Error::Protocol(format!(
                "receiver reported done at frame {} before the end",
                ack.next_seq
            ))),
        },
        (AckKind::Ack, AckBody::Missing(ranges)) => {
            let limit = max_frames_in_window(crate::window::MAX_WINDOW) as u64;
            Ok(AckRequest::Resend(
                ranges
                    .into_iter()
                    .flat_map(|(first, count)| {
                        first..first.saturating_add(u64::from(count).min(limit))
                    })
                    .collect(),
            ))
        }
        (AckKind::Ack, _) => Ok(AckRequest::Nothing),
        _ => Err(Error::Protocol("malformed ack from the receiver".into())),
    }
}

/// A payload-less frame (KEEPALIVE, CLOSE) of a session.
pub(crate) fn control_frame(kind: Kind, session: u32, seq: u64) -> Bytes {
    zero_frame(kind, session, seq, 0, 0).bytes
}

/// Tell the receiver we give up, so it fails at once rather than at its timeout.
pub(crate) async fn send_abort(
    conn: &DataConn,
    subjects: &Subjects,
    session: u32,
    seq: u64,
    why: &Error,
) {
    let header = ChunkHeader {
        kind: Kind::Abort,
        session,
        seq,
        offset: 0,
        length: 0,
        checksum: 0,
    };
    let mut payload = bytes::BytesMut::new();
    crate::frame::put_failure(&mut payload, why.code(), &why.to_string());
    let (frame, _) = header.encode(&payload);
    conn.tidy(&subjects.chunks, frame).await;
}

/// The END frame: frame `total` at the end of the disk, with the summary of all before it.
pub(crate) fn end_frame(
    session: u32,
    total: u64,
    size: u64,
    progress: &Progress,
    digest: [u8; 16],
) -> (Bytes, EndSummary) {
    let summary = EndSummary {
        digest,
        frames: total,
        data_bytes: progress.data_bytes.load(Relaxed),
        zero_bytes: progress.zero_bytes.load(Relaxed),
    };
    let header = ChunkHeader {
        kind: Kind::End,
        session,
        seq: total,
        offset: size,
        length: 0,
        checksum: 0,
    };
    progress.set_state(State::Finishing);
    progress.set_digest(digest_hex(&summary.digest));
    (header.encode(&summary.encode()).0, summary)
}

/// The receiver reported DONE: say CLOSE (it may stop lingering), then compare digests.
pub(crate) async fn close_and_compare(
    conn: &DataConn,
    subjects: &Subjects,
    session: u32,
    end_seq: u64,
    ours: [u8; 16],
    theirs: [u8; 16],
) -> Result<()> {
    let close = control_frame(Kind::Close, session, end_seq + 1);
    conn.tidy(&subjects.chunks, close).await;
    if theirs != ours {
        return Err(Error::Integrity(format!(
            "digest mismatch: sent {} but the receiver wrote {}",
            digest_hex(&ours),
            digest_hex(&theirs)
        )));
    }
    Ok(())
}

/// Count one more try of an outstanding frame; an error once it was tried too often.
pub(crate) fn retry(entry: &mut crate::window::Sent, progress: &Progress) -> Result<()> {
    // END is repeated while DONE is awaited (a long flush or verify); only data counts.
    entry.retries += u32::from(entry.kind != Kind::End);
    if entry.retries > MAX_RETRIES {
        return Err(Error::Integrity(format!(
            "frame {} at offset {} was lost or damaged {MAX_RETRIES} times; the path between the hosts is failing",
            entry.seq, entry.offset
        )));
    }
    entry.last_sent = std::time::Instant::now();
    Progress::add(&progress.retransmits, 1);
    Ok(())
}

struct Outgoing {
    seq: u64,
    bytes: Bytes,
    kind: Kind,
    offset: u64,
    len: u64,
    checksum: u64,
}

fn nats_err(e: impl std::fmt::Display) -> Error {
    Error::Nats(format!("NATS: {e}"))
}

/// Publish a frame, waiting for room in the client's queue (it fills while the connection
/// is down) until `deadline`; cancellable.
pub(crate) async fn publish_frame(
    conn: &DataConn,
    subject: &Subject,
    frame: Bytes,
    deadline: Instant,
    cancel: &CancellationToken,
) -> Result<()> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(Error::Cancelled),
        _ = tokio::time::sleep_until(deadline) => Err(Error::Timeout(
            "the connection to the NATS server was down for longer than --timeout".into(),
        )),
        r = conn.client.publish(subject.clone(), frame) => r.map_err(nats_err),
    }
}

/// The sender's key for this transfer: a new one (kept in `key_file` for a later resume),
/// or with `--resume` the one an earlier sender kept there, advanced to its next link.
/// Returns the key and what the first open shows.
fn sender_key(opts: &SendOptions, id: &str) -> Result<(SenderKey, String)> {
    match (&opts.key_file, opts.resume) {
        (Some(path), true) => {
            let mut key = SenderKey::load(path, id)?;
            let shown = key.advance()?;
            key.save(path)?;
            Ok((key, shown))
        }
        (path, _) => {
            let key = SenderKey::new()?;
            if let Some(path) = path {
                key.save(path)?;
            }
            let shown = key.anchor();
            Ok((key, shown))
        }
    }
}

/// After the transfer: its key is needed again only if the transfer can be continued.
fn settle_key(opts: &SendOptions, result: &Result<()>) {
    if let Some(path) = &opts.key_file {
        if !result.as_ref().err().is_some_and(Error::resumable) {
            let _ = std::fs::remove_file(path);
        }
    }
}

pub async fn send(
    conn: &DataConn,
    source: Arc<dyn Source>,
    subjects: &Subjects,
    opts: &SendOptions,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<()> {
    let size = source.size();
    progress.size.store(size, Relaxed);
    let chunk = fit_chunk(opts.chunk_size, conn.max_payload)?;
    // Subscribe to acks before the receiver can send any.
    let mut acks = conn
        .client
        .subscribe(subjects.acks.clone())
        .await
        .map_err(nats_err)?;
    progress.set_state(State::Waiting);
    let (key, shown) = sender_key(opts, &progress.transfer_id)?;
    // Whatever happens below, the key file is settled afterwards.
    let result = async move {
        let request = OpenRequest {
            v: PROTOCOL_VERSION,
            probe: false,
            size,
            chunk_size: chunk,
            window: opts.window,
            max_payload: conn.max_payload,
            checksum: CHECKSUM_ALGORITHM.into(),
            digest: DIGEST_ALGORITHM.into(),
            verify: opts.verify,
            resume: opts.resume,
            writes: false,
            key: shown,
        };
        let reply = open(
            conn,
            subjects,
            &request,
            Stall::new(opts.timeout),
            &progress.transfer_id,
            cancel,
        )
        .await?;
        if reply.chunk_size == 0 || reply.chunk_size > crate::conn::chunk_room(conn.max_payload) {
            return Err(Error::Protocol(format!(
                "the receiver asks for {}-byte chunks, which do not fit here",
                reply.chunk_size
            )));
        }
        let mut tx = Sender {
            conn,
            subjects,
            progress,
            source: source.clone(),
            size,
            chunk: reply.chunk_size,
            request,
            key,
            key_file: opts.key_file.clone(),
            cancel: cancel.clone(),
            timeout: opts.timeout,
            faults: Faults::from_env(),
            session: 0,
            window: Window::new(opts.window),
            digest: Digest::default(),
            digest_next: 0,
            resume_seq: 0,
            resume_offset: 0,
            planner: Planner::new(source, size, reply.chunk_size),
            // Frames live from their read until async-nats has written them: the read-ahead
            // and at most the window.
            pool: Pool::new(
                HEADER_LEN + reply.chunk_size as usize,
                ((opts.window + READ_AHEAD_BYTES) / reply.chunk_size) as usize + 4,
            ),
            planned_all: false,
            reads: FuturesOrdered::new(),
            ready: None,
            retransmits: FuturesUnordered::new(),
            next_unsent: 0,
            end: None,
            received: 0,
            last_heard: Instant::now(),
            last_progress: Instant::now(),
            last_sent: Instant::now(),
            backoff: 1,
        };
        tx.restart_at(&reply);
        progress.chunk_size.store(tx.chunk, Relaxed);
        progress.set_state(State::Running);
        let result = tx.run(&mut acks, opts.verify, cancel).await;
        if let Err(e) = &result {
            if !matches!(e, Error::Remote { .. }) {
                tx.abort(e).await;
            }
        }
        result
    }
    .await;
    settle_key(opts, &result);
    result
}

/// The open handshake: ask until a receiver answers, `stall` expires or we are cancelled.
pub(crate) async fn open(
    conn: &DataConn,
    subjects: &Subjects,
    request: &OpenRequest,
    mut stall: Stall,
    id: &str,
    cancel: &CancellationToken,
) -> Result<OpenReply> {
    let payload = encode(request);
    loop {
        if stall.is_expired() {
            if !conn.connected() {
                return Err(Error::Timeout(format!(
                    "the connection to the NATS server was down for {}; check the server and \
                     the network, then run this command again{}",
                    stall.describe(),
                    if request.resume { " with --resume" } else { "" }
                )));
            }
            return Err(Error::Timeout(if request.resume {
                format!("the receiver of transfer {id} has not answered for {} (it, or the NATS path to it, is gone); if its recv has ended, start it again with --resume, then run this command again with --resume; or raise --timeout", stall.describe())
            } else {
                format!("no receiver for transfer {id} answered within {}; start `nbd-nats recv TARGET --id {id}` on the target host first, or raise --timeout", stall.describe())
            }));
        }
        let ask = async_nats::Request::new()
            .payload(payload.clone())
            .timeout(Some(Duration::from_secs(1)));
        let answer = tokio::select! {
            _ = cancel.cancelled() => return Err(Error::Cancelled),
            // The request itself may wait for room while the connection is down.
            _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
            a = conn.client.send_request(subjects.open.clone(), ask) => a,
        };
        match answer {
            Ok(msg) => {
                let reply: OpenReply = decode("open reply", &msg.payload)?;
                if !reply.ok && reply.code == CHECKING {
                    // Alive, re-reading its target before it continues: keep asking.
                    stall.reset();
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(Error::Cancelled),
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    continue;
                }
                if !reply.ok {
                    return Err(Error::from_remote(&reply.code, &reply.message));
                }
                if reply.v != PROTOCOL_VERSION {
                    return Err(Error::Protocol(format!(
                        "receiver speaks protocol version {} (this build speaks {PROTOCOL_VERSION})",
                        reply.v
                    )));
                }
                return Ok(reply);
            }
            Err(e) => match e.kind() {
                RequestErrorKind::NoResponders => {
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(Error::Cancelled),
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
                RequestErrorKind::TimedOut => {}
                // Disconnected from the server: async-nats reconnects; keep asking.
                _ => tokio::select! {
                    _ = cancel.cancelled() => return Err(Error::Cancelled),
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                },
            },
        }
    }
}

struct Planner {
    source: Arc<dyn Source>,
    size: u64,
    chunk: u64,
    pos: u64,
    seq: u64,
    queue: VecDeque<Extent>,
}

impl Planner {
    fn new(source: Arc<dyn Source>, size: u64, chunk: u64) -> Planner {
        Planner {
            source,
            size,
            chunk,
            pos: 0,
            seq: 0,
            queue: VecDeque::new(),
        }
    }

    /// The next frame's sequence number and piece of the disk.
    async fn next(&mut self) -> Result<Option<(u64, Extent)>> {
        loop {
            if let Some(p) = self.queue.pop_front() {
                self.seq += 1;
                return Ok(Some((self.seq - 1, p)));
            }
            if self.pos >= self.size {
                return Ok(None);
            }
            let span = (self.size - self.pos).min(EXTENT_SPAN);
            let mut pos = self.pos;
            let mut cut = Vec::new();
            for e in self.source.extents(pos, span).await? {
                if e.offset != pos || e.len == 0 || e.end() > self.size {
                    return Err(Error::Endpoint(format!(
                        "source described extent {e:?} at position {pos}"
                    )));
                }
                pieces(&e, self.chunk, &mut cut);
                pos = e.end();
            }
            if pos == self.pos {
                return Err(Error::Endpoint(format!(
                    "source described no extent at {pos}"
                )));
            }
            self.pos = pos;
            self.queue.extend(cut);
        }
    }
}

fn zero_frame(kind: Kind, session: u32, seq: u64, offset: u64, len: u64) -> Outgoing {
    let (bytes, checksum) = ChunkHeader {
        kind,
        session,
        seq,
        offset,
        length: len,
        checksum: 0,
    }
    .encode(&[]);
    Outgoing {
        seq,
        bytes,
        kind,
        offset,
        len,
        checksum,
    }
}

/// Read one piece (unless it is known zero) into a pool buffer and seal it as a frame.
/// `detect_zeros` is off for retransmissions, which must repeat the original frame's kind.
fn prepare(
    source: &Arc<dyn Source>,
    pool: &Pool,
    piece: Extent,
    seq: u64,
    session: u32,
    detect_zeros: bool,
) -> BoxFuture<'static, Result<Outgoing>> {
    if piece.zero {
        return futures::future::ready(Ok(zero_frame(
            Kind::Zero,
            session,
            seq,
            piece.offset,
            piece.len,
        )))
        .boxed();
    }
    let pool = pool.clone();
    let mut buf = pool.take();
    buf.resize(HEADER_LEN, 0);
    source
        .read(piece.offset, piece.len as usize, buf)
        .map(move |r| {
            let mut buf = r?;
            if detect_zeros && is_zero(&buf[HEADER_LEN..]) {
                pool.put(buf);
                return Ok(zero_frame(
                    Kind::Zero,
                    session,
                    seq,
                    piece.offset,
                    piece.len,
                ));
            }
            let header = ChunkHeader {
                kind: Kind::Data,
                session,
                seq,
                offset: piece.offset,
                length: piece.len,
                checksum: 0,
            };
            let checksum = header.seal(&mut buf);
            Ok(Outgoing {
                seq,
                bytes: pool.share(buf),
                kind: Kind::Data,
                offset: piece.offset,
                len: piece.len,
                checksum,
            })
        })
        .boxed()
}

struct Sender<'a> {
    conn: &'a DataConn,
    subjects: &'a Subjects,
    progress: &'a Progress,
    source: Arc<dyn Source>,
    size: u64,
    chunk: u64,
    request: OpenRequest,
    /// This sender's key: a reopen shows its next link.
    key: SenderKey,
    key_file: Option<std::path::PathBuf>,
    cancel: CancellationToken,
    timeout: Option<Duration>,
    faults: Option<Faults>,
    session: u32,
    window: Window,
    /// Digest over frames `[0, digest_next)`, each folded exactly once.
    digest: Digest,
    digest_next: u64,
    /// Frames below this are already written at the receiver: not sent again.
    resume_seq: u64,
    resume_offset: u64,
    planner: Planner,
    /// Frame buffers, reused.
    pool: Pool,
    /// The planner has handed out every frame of the disk.
    planned_all: bool,
    reads: FuturesOrdered<BoxFuture<'static, Result<Outgoing>>>,
    ready: Option<Outgoing>,
    retransmits: FuturesUnordered<BoxFuture<'static, Result<Outgoing>>>,
    /// One past the highest frame published in this session.
    next_unsent: u64,
    /// The END frame once sent, and its sequence number.
    end: Option<(u64, Bytes, EndSummary)>,
    /// One past the highest frame the receiver has seen.
    received: u64,
    last_heard: Instant,
    last_progress: Instant,
    last_sent: Instant,
    /// Multiplies RTO while tail probes go unanswered.
    backoff: u32,
}

impl Sender<'_> {
    /// Start (or restart) the stream at the receiver's resume point, in its session.
    fn restart_at(&mut self, reply: &OpenReply) {
        self.session = reply.session;
        self.window.clear();
        self.window.set_limit(reply.window);
        self.resume_seq = reply.resume_seq;
        self.resume_offset = reply.resume_offset;
        self.planner = Planner::new(self.source.clone(), self.size, self.chunk);
        self.planned_all = false;
        self.reads = FuturesOrdered::new();
        self.ready = None;
        self.retransmits = FuturesUnordered::new();
        self.next_unsent = reply.resume_seq;
        self.end = None;
        self.received = reply.resume_seq;
        self.last_heard = Instant::now();
        self.last_progress = Instant::now();
        self.progress.window.store(self.window.limit(), Relaxed);
        self.progress.done_bytes.store(reply.resume_offset, Relaxed);
        if reply.resume_seq > 0 {
            Progress::add(&self.progress.resumes, 1);
        }
    }

    async fn publish(&mut self, frame: Bytes) -> Result<()> {
        self.last_sent = Instant::now();
        Progress::add(
            &self.progress.sent_bytes,
            (frame.len() - HEADER_LEN.min(frame.len())) as u64,
        );
        let frame = match self.faults.as_mut().map(|f| f.chunk(frame.clone())) {
            Some(ChunkFate::Drop) => return Ok(()),
            Some(ChunkFate::Send(f)) => f,
            None => frame,
        };
        let deadline = self.last_heard + self.timeout.unwrap_or(FOREVER);
        publish_frame(
            self.conn,
            &self.subjects.chunks,
            frame,
            deadline,
            &self.cancel,
        )
        .await
    }

    async fn abort(&mut self, why: &Error) {
        send_abort(
            self.conn,
            self.subjects,
            self.session,
            self.next_unsent,
            why,
        )
        .await;
    }

    /// Queue frame `seq` to be sent again, re-reading it from the source.
    fn resend(&mut self, seq: u64) -> Result<()> {
        let session = self.session;
        let Some(entry) = self.window.get_mut(seq) else {
            return Ok(());
        };
        if entry.last_sent.elapsed() < RTO / 4 {
            return Ok(()); // just sent: give it time
        }
        retry(entry, self.progress)?;
        let (kind, offset, len) = (entry.kind, entry.offset, entry.len);
        let again = match (kind, &self.end) {
            (Kind::End, Some((_, bytes, _))) => {
                let bytes = bytes.clone();
                futures::future::ready(Ok(Outgoing {
                    seq,
                    bytes,
                    kind,
                    offset,
                    len,
                    checksum: 0,
                }))
                .boxed()
            }
            (Kind::Data, _) => prepare(
                &self.source,
                &self.pool,
                Extent {
                    offset,
                    len,
                    zero: false,
                },
                seq,
                session,
                false,
            ),
            _ => futures::future::ready(Ok(zero_frame(kind, session, seq, offset, len))).boxed(),
        };
        self.retransmits.push(again);
        Ok(())
    }

    /// Handle one ack message; returns the receiver's digest once it reports DONE.
    fn on_ack(&mut self, msg: Option<Message>) -> Result<Option<([u8; 16], bool)>> {
        let Some(ack) = read_ack(msg, self.session, self.progress)? else {
            return Ok(None);
        };
        let Ok(covered) = self.window.ack(ack.next_seq, self.next_unsent) else {
            // It acknowledges frames never sent: not from our receiver.
            Progress::add(&self.progress.bad_frames, 1);
            return Ok(None);
        };
        self.last_heard = Instant::now();
        if covered > 0 || ack.received > self.received {
            self.last_progress = Instant::now();
            self.backoff = 1;
        }
        Progress::add(&self.progress.done_bytes, covered);
        self.received = self.received.max(ack.received);
        if ack.window > 0 {
            self.window.set_limit(ack.window);
        }
        match ack_request(ack, self.end.as_ref().map(|(seq, _, _)| *seq))? {
            AckRequest::Done(digest, verified) => Ok(Some((digest, verified))),
            AckRequest::Resend(seqs) => {
                for seq in seqs {
                    self.resend(seq)?;
                }
                Ok(None)
            }
            AckRequest::Nothing => Ok(None),
        }
    }

    /// The receiver went silent: ask for it again (a resumed receiver answers with its
    /// journal's resume point) until --timeout since we last heard from it.
    async fn reopen(&mut self, cancel: &CancellationToken) -> Result<()> {
        let mut stall = Stall::new(self.timeout);
        stall.at = self.last_heard + self.timeout.unwrap_or(FOREVER);
        let mut request = self.request.clone();
        request.resume = true;
        // The next link of our key chain proves it is us; the one shown is burnt, so it is
        // kept first (a sender that dies now resumes with the link after it).
        request.key = self.key.advance()?;
        if let Some(path) = &self.key_file {
            self.key.save(path)?;
        }
        let reply = open(
            self.conn,
            self.subjects,
            &request,
            stall,
            &self.progress.transfer_id,
            cancel,
        )
        .await?;
        if reply.chunk_size != self.chunk {
            return Err(Error::Protocol(format!(
                "the receiver came back with {}-byte chunks instead of {}",
                reply.chunk_size, self.chunk
            )));
        }
        self.restart_at(&reply);
        Ok(())
    }

    /// Put a frame that came out of the read pipeline on its way: fold it into the digest
    /// (once per frame), publish it if the receiver lacks it and the window allows.
    /// Returns false when the window is full (the frame stays ready).
    async fn forward(&mut self, frame: Outgoing) -> Result<bool> {
        if frame.seq == self.digest_next {
            self.digest.update(frame.checksum);
            self.digest_next += 1;
            let counter = if frame.kind == Kind::Data {
                &self.progress.data_bytes
            } else {
                &self.progress.zero_bytes
            };
            Progress::add(counter, frame.len);
            Progress::add(&self.progress.frames, 1);
        }
        if frame.seq < self.resume_seq {
            return Ok(true); // only re-read to rebuild the digest
        }
        if frame.seq == self.resume_seq && frame.offset != self.resume_offset {
            return Err(Error::Protocol(format!(
                "the source is cut differently than before: frame {} starts at {} but the receiver expects {}; \
                 the source changed since the transfer was interrupted, start over",
                frame.seq, frame.offset, self.resume_offset
            )));
        }
        let cost = frame_cost(frame.bytes.len() as u64 - HEADER_LEN as u64);
        if !self.window.can_send(cost) {
            self.ready = Some(frame);
            return Ok(false);
        }
        self.window
            .sent(frame.seq, frame.kind, frame.offset, frame.len, cost);
        self.next_unsent = self.next_unsent.max(frame.seq + 1);
        self.publish(frame.bytes).await?;
        Ok(true)
    }

    async fn run(
        &mut self,
        acks: &mut async_nats::Subscriber,
        verify: bool,
        cancel: &CancellationToken,
    ) -> Result<()> {
        // Read ahead at most half the window, so memory stays near the window.
        let ahead = READ_AHEAD_BYTES.min(self.window.limit() / 2);
        let depth = (ahead / self.chunk).clamp(2, 32) as usize;
        let mut tick = tokio::time::interval(RTO / 4);
        loop {
            while !self.planned_all && self.reads.len() < depth {
                match self.planner.next().await? {
                    None => self.planned_all = true,
                    // Already written and already digested: nothing to do for it.
                    Some((seq, _)) if seq < self.resume_seq && seq < self.digest_next => {}
                    Some((seq, piece)) => self.reads.push_back(prepare(
                        &self.source,
                        &self.pool,
                        piece,
                        seq,
                        self.session,
                        true,
                    )),
                }
            }
            if let Some(frame) = self.ready.take() {
                if self.forward(frame).await? {
                    continue;
                }
            }
            if self.planned_all
                && self.reads.is_empty()
                && self.ready.is_none()
                && self.end.is_none()
            {
                self.send_end().await?;
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(Error::Cancelled),
                msg = acks.next() => {
                    if let Some((digest, verified)) = self.on_ack(msg)? {
                        return self.finish(digest, verified, verify).await;
                    }
                }
                Some(r) = self.retransmits.next() => {
                    let frame = r?;
                    if self.window.get_mut(frame.seq).is_some() {
                        self.publish(frame.bytes).await?;
                    }
                }
                Some(r) = self.reads.next(), if self.ready.is_none() => self.ready = Some(r?),
                _ = tick.tick() => {
                    if !self.window.is_empty() && self.last_heard.elapsed() >= SILENCE {
                        self.reopen(cancel).await?;
                    } else if self.last_progress.elapsed() >= RTO * self.backoff {
                        // Tail loss probe: the highest frame the receiver has not seen. It
                        // shows the receiver the whole gap, which it then names in one ack.
                        // Back off while nothing is heard, so a dead receiver costs little.
                        if let Some(&seq) = self.window.overdue(self.received, RTO).last() {
                            self.resend(seq)?;
                        }
                        self.backoff = (self.backoff * 2).min(8);
                        // END arrived but DONE did not (or was lost): say END again, the
                        // receiver answers every END with DONE.
                        if let Some((end_seq, _, _)) = self.end {
                            let quiet = self.last_heard.elapsed() >= RTO;
                            if quiet && self.window.get_mut(end_seq).is_some_and(|e| e.last_sent.elapsed() >= RTO) {
                                self.resend(end_seq)?;
                            }
                        }
                    }
                    if self.window.is_empty() && self.last_sent.elapsed() >= KEEPALIVE {
                        let ka = zero_frame(Kind::Keepalive, self.session, self.next_unsent, 0, 0);
                        self.publish(ka.bytes).await?;
                    }
                }
            }
        }
    }

    async fn send_end(&mut self) -> Result<()> {
        let total = self.planner.seq;
        let (frame, summary) = end_frame(
            self.session,
            total,
            self.size,
            self.progress,
            self.digest.value(),
        );
        self.window.sent(total, Kind::End, self.size, 0, 0);
        self.next_unsent = total + 1;
        self.end = Some((total, frame.clone(), summary));
        self.publish(frame).await
    }

    async fn finish(&mut self, digest: [u8; 16], verified: bool, verify: bool) -> Result<()> {
        let Some((end_seq, _, summary)) = &self.end else {
            return Err(Error::Protocol("DONE before END".into()));
        };
        let (end_seq, ours) = (*end_seq, summary.digest);
        close_and_compare(
            self.conn,
            self.subjects,
            self.session,
            end_seq,
            ours,
            digest,
        )
        .await?;
        if verify && !verified {
            return Err(Error::Integrity(
                "the receiver did not verify the target".into(),
            ));
        }
        self.progress.verified.store(verified, Relaxed);
        self.progress.done_bytes.store(self.size, Relaxed);
        Ok(())
    }
}
