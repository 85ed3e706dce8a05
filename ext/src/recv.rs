//! The receiving engine: answer the open handshake, verify frames, put them back in order
//! (a reorder buffer no larger than the window), write them in sequence, acknowledge what is
//! written and name what is missing, checkpoint progress into the journal, and on END flush,
//! optionally verify, and report DONE.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{Message, Subject};
use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

use crate::checksum::{
    content_hex, digest_hex, is_zero, ContentDigest, Digest, Tap, CHECKSUM_ALGORITHM,
    CONTENT_ALGORITHM, DIGEST_ALGORITHM,
};
use crate::compress::{pick, Codec, Unpacker};
use crate::conn::{chunk_room, DataConn, MAX_CHUNK, MIN_CHUNK};
use crate::error::{Error, Result};
use crate::faults::Faults;
use crate::frame::{
    Ack, AckBody, AckKind, ChunkHeader, EndSummary, Kind, HEADER_LEN, MAX_NACK_RANGES,
    MAX_ZERO_LEN, PROTOCOL_VERSION,
};
use crate::handshake::{
    decode, encode, is_key, key_follows, other_version, OpenReply, OpenRequest, Stripes, CHECKING,
};
use crate::io::{zeros, Sink};
use crate::journal::{self, Frame, Journal, JOURNAL_VERSION};
use crate::link::{Stall, Subjects, KEEPALIVE};
use crate::stats::{Progress, State};
use crate::window::{frame_cost, max_frames_in_window, MAX_WINDOW, MIN_FRAME_COST};

/// Writes in flight to the target; NBD pipelines them on its connection.
const WRITE_DEPTH: usize = 16;
/// How often missing frames are asked for again while they stay missing.
const NACK_INTERVAL: Duration = Duration::from_millis(250);
/// An ack that cannot be queued this soon (the connection is down) is dropped: acks are
/// cumulative, the next one says the same and more.
const ACK_BOUND: Duration = Duration::from_secs(1);
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
/// Bytes wiped at each end of a target that received an image other than the one expected
/// (partition tables and boot sectors live there: GPT keeps a copy in the last sectors).
const WIPE: u64 = 1 << 20;

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
    /// The sha256 the image must have (a provisioning approval's). The bytes are hashed in
    /// order as they are written; a mismatch wipes both ends of the target before the
    /// transfer fails, so a device never keeps an unapproved image in bootable shape.
    pub expect_sha256: Option<[u8; 32]>,
    /// The sender may stripe this transfer (`--streams`): the caller can run sub-streams.
    pub can_stripe: bool,
    /// This is sub-stream `label` of a striped transfer (its journal names it besides the
    /// target, so that a resume cut otherwise does not continue it), whose content digest
    /// hands its block hashes to the whole image's.
    pub stripe: Option<(String, Tap)>,
}

impl RecvOptions {
    /// The target as the journal names it.
    fn journal_target(&self) -> String {
        match &self.stripe {
            Some((label, _)) => format!("{} ({label})", self.target),
            None => self.target.clone(),
        }
    }
}

/// A transfer the sender and this receiver agreed to stripe: its open request and the
/// answer given, which the caller repeats to a sender that asks again, and the journal
/// that lets a restarted receiver take it up (`striped::recv` runs the sub-streams).
pub struct StripedOpen {
    pub stripes: Stripes,
    pub request: OpenRequest,
    pub reply: OpenReply,
    pub opens: async_nats::Subscriber,
    pub journal: Option<Journal>,
}

/// A completed write: its sequence's cost in the window, disk bytes and kind.
struct Written {
    cost: u64,
    len: u64,
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
    unacked_cost: u64,
    digest: Digest,
    /// The content digest of the frames handed to the target, in offset order (not kept
    /// for a stream of writes). Rebuilt on resume by re-reading the journaled prefix.
    content: ContentDigest,
    /// Frames submitted since the last checkpoint, from its `next_seq` on.
    unjournaled: VecDeque<Frame>,
    journal: Option<Journal>,
    last_checkpoint: Instant,
    end: Option<(u64, EndSummary)>,
    corrupt: HashMap<u64, u32>,
    /// Every frame of the transfer (from the journal's and this run's), for `--verify`.
    frames: Vec<Frame>,
    /// The image's sha256 so far, when one is expected.
    hasher: Option<Sha256>,
    last_ack: Instant,
    last_nack: Instant,
    seen_own_session: bool,
    /// When frames of another session started arriving before any of ours.
    foreign_since: Option<Instant>,
    /// A checksummed frame of our session arrived since the main loop last looked.
    heard_sender: bool,
    /// A stream of writes: frames address any offset (see `OpenRequest::writes`).
    write_stream: bool,
    /// A dirty transfer: frames in increasing offset order with gaps that stay as they
    /// are (see `OpenRequest::dirty`).
    dirty: bool,
    /// The key of the sender this transfer belongs to (see `SenderKey`).
    key: String,
    /// The answer to that sender's last open, repeated if it asks again (a lost reply).
    reply: OpenReply,
    /// The codec this sender's compressed frames use (`OpenReply::compress`).
    codec: Codec,
    unpacker: Unpacker,
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
            .publish_within(&self.subjects.acks, ack.encode(), ACK_BOUND)
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

    /// Report a failure to the sender (so it stops at once) and return it. A transfer that
    /// can be continued keeps its journal and says how; any other failure removes it.
    async fn fail(&mut self, err: Error) -> Error {
        let err = self.progress.cause(err);
        let body = AckBody::Error {
            code: err.code().to_string(),
            message: err.to_string(),
        };
        let ack = self.ack_frame(AckKind::Error, self.written_frames, body);
        self.conn.tidy(&self.subjects.acks, ack.encode()).await;
        // What is written so far is worth keeping when the transfer can go on: record it
        // (the target flushed first), however soon after the last checkpoint this is.
        // (If that fails the journal keeps its last checkpoint: a resume re-checks anyway.)
        if err.resumable() {
            let _ = self.checkpoint().await;
        }
        settle_journal(self.journal.take(), err)
    }

    /// Run `work`, sending keepalive acks meanwhile so the sender does not time out.
    async fn keepalive<T>(&mut self, work: BoxFuture<'_, Result<T>>) -> Result<T> {
        let mut work = work;
        loop {
            tokio::select! {
                r = &mut work => return r,
                _ = tokio::time::sleep(KEEPALIVE) => {
                    let ack = self.ack_frame(AckKind::Ack, self.written_frames, AckBody::None);
                    self.publish_ack(ack).await;
                }
            }
        }
    }

    /// Take in one message from the chunk subject. Returns true when it filled a gap or
    /// opened a new one (worth an immediate ack).
    async fn intake(&mut self, payload: Bytes) -> Result<bool> {
        let wire = payload.len().saturating_sub(HEADER_LEN) as u64;
        let (header, codec) = match ChunkHeader::parse_packed(&payload) {
            Ok((header, codec, _)) => (header, codec),
            Err(_) => {
                Progress::add(&self.progress.bad_frames, 1);
                return Ok(false);
            }
        };
        // From here on a frame is its plain form; one that does not inflate to exactly
        // the length it declares is damaged, like one that fails its checksum.
        let plain = if codec == Codec::None {
            Some(payload)
        } else {
            self.inflate(&header, codec, &payload)
        };
        let body: &[u8] = plain.as_ref().map_or(&[], |p| &p[HEADER_LEN..]);
        let intact = plain.is_some() && header.verify(body);
        if header.session != self.session {
            // Frames of an earlier session are normal just after a (re)open; frames of
            // another session that keep coming while none of ours do mean the sender picked
            // another receiver's reply in a race between two receivers.
            if !self.seen_own_session && header.kind != Kind::Abort && intact {
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
        if codec != Codec::None && codec != self.codec {
            // Not what this transfer agreed on: not from its sender.
            Progress::add(&self.progress.bad_frames, 1);
            return Ok(false);
        }
        let Some(payload) = plain.filter(|_| intact) else {
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
        };
        let body = &payload[HEADER_LEN..];
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
        if header.kind == Kind::Data {
            Progress::add(&self.progress.wire_bytes, wire);
        }
        self.reorder_bytes += payload.len();
        self.reorder.insert(header.seq, (header, payload));
        self.submit()?;
        Ok(opened_gap || filled_gap)
    }

    /// The plain form of a compressed data frame: inflated into a buffer of exactly the
    /// length its header declares (at most a chunk), or `None` if it does not fit that.
    fn inflate(&mut self, header: &ChunkHeader, codec: Codec, frame: &[u8]) -> Option<Bytes> {
        if header.kind != Kind::Data || header.length > self.chunk {
            return None;
        }
        let mut out = BytesMut::zeroed(HEADER_LEN + header.length as usize);
        out[..HEADER_LEN].copy_from_slice(&frame[..HEADER_LEN]);
        crate::frame::set_codec(&mut out, Codec::None);
        let packed = &frame[HEADER_LEN..];
        (self.unpacker)
            .unpack(codec, packed, &mut out[HEADER_LEN..])
            .then(|| out.freeze())
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
            } else if self.dirty {
                check_after(&header, self.next_offset, self.size, self.chunk)
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
            if self.dirty {
                self.next_offset = header.offset + header.length;
            } else {
                self.next_offset += header.length;
            }
            self.digest.update(header.checksum);
            if !self.write_stream && !self.dirty {
                match header.kind {
                    Kind::Data => self.content.data(&payload[HEADER_LEN..]),
                    _ => self.content.zeros(header.length),
                }
            }
            let (len, kind) = (header.length, header.kind);
            let frame = Frame {
                kind,
                length: len,
                checksum: header.checksum,
            };
            self.unjournaled.push_back(frame);
            if self.verify {
                self.frames.push(frame);
            }
            Progress::add(&self.progress.frames, 1);
            let write = match kind {
                Kind::Data => {
                    let data = payload.slice(HEADER_LEN..);
                    if let Some(h) = self.hasher.as_mut() {
                        h.update(&data);
                    }
                    Progress::add(&self.progress.data_bytes, len);
                    self.sink.write(header.offset, data)
                }
                _ => {
                    if let Some(h) = self.hasher.as_mut() {
                        hash_zeros(h, len);
                    }
                    Progress::add(&self.progress.zero_bytes, len);
                    if kind == Kind::Zero && self.skip_zeros {
                        futures::future::ready(Ok(())).boxed()
                    } else {
                        self.sink.zero(header.offset, len, kind == Kind::Trim)
                    }
                }
            };
            let cost = if kind == Kind::Data {
                frame_cost(len)
            } else {
                MIN_FRAME_COST
            };
            self.writes.push_back(
                write
                    .map(move |r| r.map(|()| Written { cost, len }))
                    .boxed(),
            );
        }
        Ok(())
    }

    fn completed(&mut self, w: Written) {
        self.written_frames += 1;
        self.written_bytes += w.len;
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
        let frames: Vec<Frame> = self
            .unjournaled
            .drain(..n.min(self.unjournaled.len()))
            .collect();
        if let Some(j) = self.journal.as_mut() {
            j.checkpoint(&frames)?;
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

    /// An open while the transfer runs: the sender repeating an open whose reply it lost
    /// gets the same reply; the sender resuming (it shows the next key of its chain) gets
    /// a new session from where we are; anybody else is refused and changes nothing.
    async fn on_open(&mut self, msg: Message) -> Result<()> {
        let req = match decode::<OpenRequest>("open request", &msg.payload) {
            Ok(r) => r,
            Err(e) => {
                refuse(self.conn, msg, &e).await;
                return Ok(());
            }
        };
        let repeat = !req.probe && req.key == self.key;
        if req.probe || !(repeat || (req.resume && key_follows(&req.key, &self.key))) {
            let id = &self.progress.transfer_id;
            refuse(
                self.conn,
                msg,
                &Error::Busy(format!(
                    "transfer {id} is already in progress; only its own sender may take it over \
                     (with --resume and the same --state-dir)"
                )),
            )
            .await;
            return Ok(());
        }
        if !repeat {
            // The sender restarted: continue from what we hold, in a new session.
            self.session = new_session()?;
            self.seen_own_session = false;
            self.foreign_since = None;
            self.corrupt.clear();
            self.key = req.key.clone();
            if let Some(j) = self.journal.as_mut() {
                j.set_key(&req.key)?;
            }
            // A resumed sender may offer other codecs than the one before.
            self.codec = picked(&req);
            self.reply = OpenReply {
                session: self.session,
                resume_seq: self.next_submit,
                resume_offset: self.next_offset,
                compress: self.codec.name().into(),
                ..self.reply.clone()
            };
        }
        if let Some(to) = msg.reply {
            let _ = self
                .conn
                .publish_within(&to, encode(&self.reply), ACK_BOUND)
                .await;
        }
        Ok(())
    }
}

/// The codec this receiver takes from a sender's offer; none when it offers none, or
/// (`NBDNATS_FAULTS=old_peer=1`, tests) when acting as a receiver from before compression.
fn picked(req: &OpenRequest) -> Codec {
    if Faults::from_env().is_some_and(|f| f.old_peer()) {
        return Codec::None;
    }
    pick(&req.compress)
}

/// Whether this receiver stripes the transfer as the sender asks: only a whole image (not a
/// stream of writes, not a dirty transfer) into a target written in any order, with no
/// sha256 to check in order, and not a single-stream transfer that already wrote
/// something (its journal goes on as it started). Otherwise the answer names no stripes
/// and the sender sends one stream. A cut that is not valid is refused.
fn agree_stripes(
    req: &OpenRequest,
    opts: &RecvOptions,
    sink: &Arc<dyn Sink>,
    journal: Option<&Journal>,
) -> Option<Stripes> {
    let stripes = req.stripes?;
    let old = Faults::from_env().is_some_and(|f| f.old_peer());
    let agree = opts.can_stripe
        && !old
        && !req.writes
        && !req.dirty
        && !sink.caps().sequential
        && !sink.merges_base()
        && opts.expect_sha256.is_none()
        && opts.stripe.is_none()
        && journal.is_none_or(|j| j.progress.next_seq == 0);
    agree.then_some(stripes)
}

fn hash_zeros(h: &mut Sha256, mut len: u64) {
    while len > 0 {
        let z = zeros(len.min(1 << 20) as usize);
        h.update(&z);
        len -= z.len() as u64;
    }
}

/// After a failure: keep the journal only if the transfer can go on from it and something
/// was written; otherwise remove it, so nothing suggests a resume that cannot work. It can
/// go on when the peer or the network went away (`timeout`, `nats`) or the transfer was
/// interrupted (`cancelled`: a signal, a cancelled task, either end); not after bad data
/// (`integrity`, `protocol`), a refusal or usage error, a failed source or target, or a
/// cancellation for good (`abandoned`, either end: the sender then drops its key, without
/// which nobody can continue the transfer).
fn settle_journal(journal: Option<Journal>, err: Error) -> Error {
    let Some(j) = journal else { return err };
    if !err.resumable() || j.progress.next_seq == 0 {
        let _ = j.remove();
        return err;
    }
    let hint = format!(
        "; progress is kept in {}: run the same recv with --resume to continue",
        j.path().display()
    );
    with_hint(err, &hint)
}

fn with_hint(err: Error, hint: &str) -> Error {
    match err {
        Error::Timeout(m) => Error::Timeout(m + hint),
        Error::Nats(m) => Error::Nats(m + hint),
        // The sender gave up (its abort carries its own code, e.g. timeout): the journal
        // is kept, so say so here too.
        Error::Remote { code, message } => Error::Remote {
            code,
            message: message + hint,
        },
        Error::Peer(e) => Error::Peer(Box::new(with_hint(*e, hint))),
        other => other,
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

/// Device, inode and birth time (ns, 0 where the filesystem keeps none) of a file or
/// block-device target, symlinks followed: to notice on resume that the target was replaced
/// (a file deleted and created again often gets the same inode number back). `None` for
/// NBD and other URIs.
fn identity(target: &str) -> Option<(u64, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    if !target.starts_with('/') && !target.starts_with('.') && target.contains(':') {
        return None;
    }
    let m = std::fs::metadata(target).ok()?;
    let born = m
        .created()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64);
    Some((m.dev(), m.ino(), born))
}

/// The journal to continue from, after checking it belongs to this target.
fn open_journal(opts: &RecvOptions, id: &str) -> Result<Option<Journal>> {
    match (&opts.journal, opts.resume) {
        (None, true) => Err(Error::Usage(format!("{} is a stream: a transfer into it cannot be resumed", opts.target))),
        (None, false) => Ok(None),
        (Some(path), true) => {
            let j = Journal::open(path)?;
            if j.header.target != opts.journal_target() || j.header.transfer_id != id {
                return Err(Error::Usage(format!(
                    "the journal at {} belongs to transfer {} into {}, not {id} into {}",
                    path.display(), j.header.transfer_id, j.header.target, opts.journal_target()
                )));
            }
            if j.header.identity.is_some() && j.header.identity != identity(&opts.target) {
                return Err(Error::Usage(format!(
                    "{} is not the target the interrupted transfer {id} wrote (it was replaced or \
                     recreated since); discard the journal at {} to start over (nbd-nats journals \
                     --discard {id}, with the same --state-dir)",
                    opts.target, path.display()
                )));
            }
            Ok(Some(j))
        }
        (Some(path), false) if path.exists() => Err(Error::Usage(format!(
            "an interrupted transfer {id} left a journal at {}: add --resume to continue it, or \
             discard it to start over (nbd-nats journals --discard {id}, with the same --state-dir)",
            path.display()
        ))),
        (Some(_), false) => Ok(None),
    }
}

/// Before continuing from a journal: re-read what it says is written and keep only the
/// prefix the target still holds (a target changed while we were away is sent again from
/// its first changed frame). Opens meanwhile are answered "checking", so the sender waits.
/// Costs one read of the journaled part of the target, as the sender re-reads its source.
async fn check_target(
    conn: &DataConn,
    sink: &Arc<dyn Sink>,
    journal: &mut Journal,
    opens: &mut async_nats::Subscriber,
    chunk: u64,
    hashers: Hashers<'_>,
    cancel: &CancellationToken,
) -> Result<()> {
    let frames = journal.progress.frames.clone();
    if frames.is_empty() {
        return Ok(());
    }
    // A target cut shorter than the image holds nothing of what was written past its end.
    let mut end = 0u64;
    let within = match sink.size() {
        Some(s) => frames
            .iter()
            .take_while(|f| {
                end += f.length;
                end <= s
            })
            .count(),
        None => frames.len(),
    };
    let mut check = Box::pin(first_mismatch(
        sink.clone(),
        &frames[..within],
        chunk,
        hashers,
    ));
    let bad = loop {
        tokio::select! {
            r = &mut check => break r?,
            _ = cancel.cancelled() => return Err(Error::Cancelled),
            m = opens.next() => {
                let Some(m) = m else { continue };
                if let Some(to) = m.reply {
                    let wait = OpenReply {
                        v: PROTOCOL_VERSION,
                        ok: false,
                        code: CHECKING.into(),
                        message: "the receiver is checking its target before it continues".into(),
                        ..Default::default()
                    };
                    let _ = conn.publish_within(&to, encode(&wait), ACK_BOUND).await;
                }
            }
        }
    };
    let keep = bad.map_or(within, |(index, _)| index);
    if keep < frames.len() {
        journal.truncate(keep)?;
    }
    Ok(())
}

/// Receive one transfer. Returns `Some` instead when the sender asked to stripe it and this
/// receiver agreed (`RecvOptions::can_stripe`): its sub-streams are the caller's to run.
pub async fn recv(
    conn: &DataConn,
    sink: Arc<dyn Sink>,
    subjects: &Subjects,
    opts: &RecvOptions,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<Option<StripedOpen>> {
    let id = &progress.transfer_id;
    let journal = open_journal(opts, id)?;
    let (mut opens, mut chunks) = listen(conn, subjects, id).await?;
    progress.set_state(State::Waiting);
    let opened = match open(conn, &sink, &mut opens, opts, journal, id, cancel).await {
        Ok(opened) => opened,
        Err(e) => {
            let e = progress.cause(e);
            // Cancelled for good while a resumed journal waited for its sender.
            if let (true, "abandoned", Some(path)) = (opts.resume, e.code(), &opts.journal) {
                let _ = std::fs::remove_file(path);
            }
            return Err(e);
        }
    };
    if let Some(stripes) = opened.reply.stripes {
        return Ok(Some(StripedOpen {
            stripes,
            request: opened.request,
            reply: opened.reply,
            opens,
            journal: opened.journal,
        }));
    }
    let mut rx = Receiver::new(conn, subjects, progress, sink, opts, opened);
    match run(&mut rx, &mut chunks, &mut opens, opts, cancel).await {
        Ok(end_seq) => finish(&mut rx, end_seq, &mut chunks, opts, cancel)
            .await
            .map(|()| None),
        Err(e) => Err(rx.fail(e).await),
    }
}

/// Subscribe to the transfer's open and chunk subjects, unless another receiver already
/// serves it. (A race between two new receivers is settled by the session: frames carry
/// the session of the receiver the sender picked.)
async fn listen(
    conn: &DataConn,
    subjects: &Subjects,
    id: &str,
) -> Result<(async_nats::Subscriber, async_nats::Subscriber)> {
    let probe = encode(&OpenRequest {
        v: PROTOCOL_VERSION,
        probe: true,
        ..Default::default()
    });
    let ask = async_nats::Request::new()
        .payload(probe)
        .timeout(Some(Duration::from_millis(500)));
    let asked = tokio::time::timeout(
        Duration::from_secs(2),
        conn.client.send_request(subjects.open.clone(), ask),
    )
    .await;
    if let Ok(Ok(_)) = asked {
        return Err(Error::Busy(format!(
            "another receiver already serves transfer {id}; stop it or use another --id"
        )));
    }
    let opens = conn.client.subscribe(subjects.open.clone()).await?;
    let chunks = conn.client.subscribe(subjects.chunks.clone()).await?;
    if !conn.flush_within(Duration::from_secs(5)).await {
        return Err(Error::Nats(
            "the NATS server does not answer; check --data-url and that nats-server is running"
                .into(),
        ));
    }
    Ok((opens, chunks))
}

/// A transfer the receiver said yes to: what the sender asked for, what was agreed, and
/// where it starts (the journal's progress, or nothing).
struct Opened {
    request: OpenRequest,
    session: u32,
    chunk: u64,
    window: u64,
    reply: OpenReply,
    journal: Option<Journal>,
    hasher: Option<Sha256>,
    content: ContentDigest,
}

/// The open handshake: check the target against the journal (when resuming), wait for a
/// sender, keep a journal for it, and answer it.
async fn open(
    conn: &DataConn,
    sink: &Arc<dyn Sink>,
    opens: &mut async_nats::Subscriber,
    opts: &RecvOptions,
    mut journal: Option<Journal>,
    id: &str,
    cancel: &CancellationToken,
) -> Result<Opened> {
    let mut hasher = opts.expect_sha256.map(|_| Sha256::new());
    let mut content = ContentDigest::tapped(opts.stripe.as_ref().map(|(_, tap)| tap.clone()));
    if let Some(j) = journal.as_mut() {
        let chunk = j.header.chunk_size;
        let hashers = Hashers {
            sha256: hasher.as_mut(),
            content: Some(&mut content),
        };
        check_target(conn, sink, j, opens, chunk, hashers, cancel).await?;
    }
    let session = new_session()?;
    let (request, chunk, window, reply_to, reply) = accept(
        conn,
        sink,
        opens,
        opts,
        journal.as_ref(),
        session,
        id,
        cancel,
    )
    .await?;
    if request.writes || request.dirty {
        // A live stream cannot be resumed; a dirty transfer is simply run again.
        journal = None;
    }
    // The journal exists before the sender hears yes: a receiver that cannot keep one
    // refuses the open, so the sender fails at once with the reason.
    if let Err(e) = keep_journal(&mut journal, opts, id, &request, chunk) {
        if let Some(to) = reply_to {
            let refusal = encode(&OpenReply::refuse(&e));
            conn.tidy(&to, refusal).await;
        }
        return Err(e);
    }
    if let Some(to) = reply_to {
        if !conn
            .publish_within(&to, encode(&reply), Duration::from_secs(5))
            .await?
        {
            return Err(settle_journal(
                journal,
                Error::Nats("the NATS connection is down: cannot answer the sender".into()),
            ));
        }
    }
    Ok(Opened {
        request,
        session,
        chunk,
        window,
        reply,
        journal,
        hasher,
        content,
    })
}

/// Bind the journal to the sender that was accepted: the resumed one takes its key, a new
/// transfer (not a live stream) gets a new journal.
fn keep_journal(
    journal: &mut Option<Journal>,
    opts: &RecvOptions,
    id: &str,
    request: &OpenRequest,
    chunk: u64,
) -> Result<()> {
    match (journal.as_mut(), &opts.journal) {
        (Some(j), _) => j.set_key(&request.key),
        (None, Some(path)) if !request.writes && !request.dirty => {
            let header = journal::Header {
                v: JOURNAL_VERSION,
                transfer_id: id.to_string(),
                target: opts.journal_target(),
                size: request.size,
                chunk_size: chunk,
                key_hash: request.key.clone(),
                identity: identity(&opts.target),
            };
            *journal = Some(Journal::create(path, header)?);
            Ok(())
        }
        _ => Ok(()),
    }
}

impl<'a> Receiver<'a> {
    /// Start receiving an opened transfer, from its journal's progress if it has one.
    fn new(
        conn: &'a DataConn,
        subjects: &'a Subjects,
        progress: &'a Progress,
        sink: Arc<dyn Sink>,
        opts: &RecvOptions,
        opened: Opened,
    ) -> Receiver<'a> {
        let Opened {
            request, journal, ..
        } = opened;
        let start = journal
            .as_ref()
            .map(|j| j.progress.clone())
            .unwrap_or_default();
        progress.size.store(request.size, Relaxed);
        progress.chunk_size.store(opened.chunk, Relaxed);
        progress.window.store(opened.window, Relaxed);
        progress.done_bytes.store(start.offset, Relaxed);
        progress.data_bytes.store(start.data_bytes, Relaxed);
        progress.zero_bytes.store(start.zero_bytes, Relaxed);
        progress.set_state(State::Running);
        progress.streams.store(1, Relaxed);
        let verify = opts.verify || request.verify;
        Receiver {
            conn,
            subjects,
            progress,
            // A dirty transfer's target holds the previous image, not zeros.
            skip_zeros: opts.target_is_zero && !sink.caps().sequential && !request.dirty,
            sink,
            faults: Faults::from_env(),
            session: opened.session,
            window: opened.window,
            size: request.size,
            chunk: opened.chunk,
            verify,
            next_submit: start.next_seq,
            next_offset: start.offset,
            reorder: BTreeMap::new(),
            reorder_bytes: 0,
            max_ahead: max_frames_in_window(MAX_WINDOW) as u64 + 8,
            received: start.next_seq,
            writes: FuturesOrdered::new(),
            written_frames: start.next_seq,
            written_bytes: start.offset,
            unacked_cost: 0,
            digest: start.digest.clone(),
            content: opened.content,
            unjournaled: VecDeque::new(),
            journal,
            last_checkpoint: Instant::now(),
            end: None,
            corrupt: HashMap::new(),
            frames: if verify { start.frames } else { Vec::new() },
            hasher: opened.hasher,
            last_ack: Instant::now(),
            last_nack: Instant::now(),
            seen_own_session: false,
            foreign_since: None,
            heard_sender: false,
            write_stream: request.writes,
            dirty: request.dirty,
            key: request.key,
            codec: Codec::from_name(&opened.reply.compress).unwrap_or_default(),
            unpacker: Unpacker::new(),
            reply: opened.reply,
        }
    }
}

/// The main loop: take in frames, write them in order, acknowledge, checkpoint, answer
/// opens, until END is written. Returns END's sequence number and the sender's summary.
async fn run(
    rx: &mut Receiver<'_>,
    chunks: &mut async_nats::Subscriber,
    opens: &mut async_nats::Subscriber,
    opts: &RecvOptions,
    cancel: &CancellationToken,
) -> Result<(u64, EndSummary)> {
    let mut stall = Stall::new(opts.timeout);
    let mut tick = tokio::time::interval(NACK_INTERVAL);
    while !rx.finished() {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(Error::Cancelled),
            Some(done) = rx.writes.next() => {
                rx.completed(done?);
                rx.submit()?;
                if rx.unacked_cost >= rx.window / 4 || rx.writes.is_empty() {
                    rx.ack().await;
                }
                if rx.checkpoint_due() {
                    rx.checkpoint().await?;
                }
            }
            msg = chunks.next() => {
                let msg = msg.ok_or_else(|| Error::Nats("the chunk subscription ended".into()))?;
                let urgent = rx.intake(msg.payload).await?;
                // Only a genuine frame of this transfer shows the sender is alive: garbage
                // from others must not keep a dead transfer open.
                if std::mem::take(&mut rx.heard_sender) {
                    stall.reset();
                }
                if urgent {
                    rx.ack().await;
                }
            }
            msg = opens.next() => {
                let Some(msg) = msg else { continue };
                let session = rx.session;
                rx.on_open(msg).await?;
                if rx.session != session {
                    stall.reset();
                }
            }
            _ = tick.tick() => {
                let gaps = rx.received > rx.next_submit + rx.reorder.len() as u64;
                if (gaps && rx.last_nack.elapsed() >= NACK_INTERVAL) || rx.last_ack.elapsed() >= KEEPALIVE {
                    rx.ack().await;
                }
            }
            _ = stall.expired() => {
                let who = if rx.conn.connected() {
                    "the sender went quiet"
                } else {
                    "the connection to the NATS server was down"
                };
                return Err(Error::Timeout(format!(
                    "{who} for {} at offset {} of {}",
                    stall.describe(), rx.written_bytes, rx.size
                )));
            }
        }
    }
    rx.end
        .take()
        .ok_or_else(|| Error::Protocol("transfer ended without END".into()))
}

/// Every write is complete: make them durable, check the whole transfer (digest, the
/// expected image, a re-read of the whole target with --verify), report DONE and linger
/// until the sender has heard it.
async fn finish(
    rx: &mut Receiver<'_>,
    (end_seq, summary): (u64, EndSummary),
    chunks: &mut async_nats::Subscriber,
    opts: &RecvOptions,
    cancel: &CancellationToken,
) -> Result<()> {
    let progress = rx.progress;
    let sink = rx.sink.clone();
    progress.set_state(State::Finishing);
    rx.ack().await;
    if let Err(e) = rx.keepalive(sink.flush()).await {
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
    progress.dirty_bytes.store(summary.dirty_bytes, Relaxed);
    if rx.dirty {
        // Every byte of the image is now current: the changed ones written, the rest kept.
        progress.done_bytes.store(rx.size, Relaxed);
    }
    // A sink merging a base writes the rest of it now: the output is a whole image, whose
    // content digest is the transfer's (a dirty transfer has none otherwise).
    let merged = match rx.keepalive(sink.finish(rx.size)).await {
        Ok(m) => m,
        Err(e) => return Err(rx.fail(e).await),
    };
    // The end-to-end check: the bytes the sender read against the bytes accepted here.
    let content = (!rx.write_stream && !rx.dirty).then(|| rx.content.value());
    if let Some(content) = content.filter(|c| *c != summary.content) {
        let err = Error::Integrity(format!(
            "content digest mismatch: the sender read {} but the receiver accepted {}; \
             the target may not hold the source's image, send it again",
            content_hex(&summary.content),
            content_hex(&content)
        ));
        return Err(rx.fail(err).await);
    }
    if let (Some(want), Some(h)) = (opts.expect_sha256, rx.hasher.take()) {
        let got: [u8; 32] = h.finalize().into();
        if got != want {
            let wiped = rx.keepalive(wipe(sink.clone(), rx.size).boxed()).await;
            let what = match wiped {
                Ok(()) => "its first and last MiB were zeroed, so it does not boot".to_string(),
                Err(e) => format!("wiping its first and last MiB FAILED ({e}): do not boot it"),
            };
            let err = Error::Integrity(format!(
                "the image written has sha256 {} but the approved one is {}: the target holds \
                 an image nobody approved; {what}",
                hex32(&got),
                hex32(&want)
            ));
            return Err(rx.fail(err).await);
        }
    }
    if rx.verify {
        let frames = std::mem::take(&mut rx.frames);
        let chunk = rx.chunk;
        if let Err(e) = rx
            .keepalive(verify_target(sink.clone(), frames, chunk).boxed())
            .await
        {
            return Err(rx.fail(e).await);
        }
        progress.verified.store(true, Relaxed);
    }
    progress.set_digest(match content.or(merged) {
        Some(c) => content_hex(&c),
        None => digest_hex(&ours),
    });
    if opts.stripe.is_some() {
        // A sub-stream's journal outlives it: until the whole transfer is done, a resumed
        // sender of it gets "all written" and a DONE again (`striped` removes it).
        if let Err(e) = rx.checkpoint().await {
            return Err(rx.fail(e).await);
        }
    } else if let Some(j) = rx.journal.take() {
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
    rx.conn.flush_within(crate::conn::TIDY_BOUND).await;
    Ok(())
}

/// Zero the first and last `WIPE` bytes of a target (where partition tables and boot code
/// live), then flush.
async fn wipe(sink: Arc<dyn Sink>, size: u64) -> Result<()> {
    let head = size.min(WIPE);
    sink.zero(0, head, false).await?;
    let tail = size.saturating_sub(WIPE).max(head);
    if tail < size {
        sink.zero(tail, size - tail, false).await?;
    }
    sink.flush().await
}

fn hex32(b: &[u8; 32]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Answer the open handshake: wait for the sender's request and check it. The reply is
/// returned, not sent: the caller sends it once the journal exists.
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
) -> Result<(OpenRequest, u64, u64, Option<Subject>, OpenReply)> {
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
        // Who may open: any sender a fresh transfer (whoever can publish here: subject
        // permissions decide), only the sender that started it a journaled one.
        let denied = match journal {
            // Another version's sender is refused by `negotiate`, naming both versions.
            _ if request.v != PROTOCOL_VERSION => None,
            _ if !is_key(&request.key) => Some(Error::Protocol(
                "the open request carries no valid sender key".into(),
            )),
            Some(j) if !(request.resume && key_follows(&request.key, &j.header.key_hash)) => {
                Some(Error::Busy(format!(
                    "transfer {id} continues from a journal: only the sender that started it may \
                     continue it (send --resume with its --state-dir); or discard the journal at {} \
                     to start over (nbd-nats journals --discard {id} there)",
                    j.path().display()
                )))
            }
            _ => None,
        };
        if let Some(e) = denied {
            // Refused without ending: the rightful sender may still come.
            refuse(conn, msg, &e).await;
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
                    compress: picked(&request).name().into(),
                    stripes: agree_stripes(&request, opts, sink, journal),
                    ..Default::default()
                };
                return Ok((request, chunk, window, msg.reply, reply));
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
        return Err(other_version(req.v));
    }
    if req.checksum != CHECKSUM_ALGORITHM
        || req.digest != DIGEST_ALGORITHM
        || req.content != CONTENT_ALGORITHM
    {
        return Err(Error::Protocol(format!(
            "unsupported checksum {}/{}/{}",
            req.checksum, req.digest, req.content
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
        // Chunks a multiple of the target's block size (a power of two, at most 32 MiB):
        // frames of data then never share a block (they still may at the edges of a hole).
        None => {
            let chunk = req.chunk_size.min(room);
            match sink.caps().min_block {
                b if b > 4096 && b <= chunk => chunk / b * b,
                _ => chunk,
            }
        }
    };
    if chunk < MIN_CHUNK {
        return Err(Error::Nats(format!(
            "the receiver's server max_payload of {max_payload} bytes is too small"
        )));
    }
    if let Some(stripes) = req.stripes {
        // A cut nobody can run: refused, and the receiver waits on for its sender.
        crate::stripe::Geometry::new(req.size, stripes)
            .map_err(|e| Error::Protocol(format!("the sender's stripes: {e}")))?;
    }
    if req.dirty {
        check_dirty(req, opts, sink).await?;
    } else if sink.merges_base() {
        return Err(Error::Usage(
            "--base merges a dirty-bitmap transfer, but this sender sends a whole image: \
             drop --base (or send with --dirty-bitmap)"
                .into(),
        ));
    }
    if req.writes && (opts.verify || req.verify || req.resume || opts.expect_sha256.is_some()) {
        return Err(Error::Usage(
            "a stream of writes can be neither verified nor resumed".into(),
        ));
    }
    if (opts.verify || req.verify) && !sink.caps().can_read {
        return Err(Error::Usage(
            "the target cannot be read back, so --verify is impossible".into(),
        ));
    }
    // A dirty transfer's target is neither created nor resized (check_dirty).
    if !req.dirty || sink.merges_base() {
        sink.prepare(req.size).await?;
    }
    let window = req
        .window
        .min(opts.window)
        .clamp(MIN_FRAME_COST, MAX_WINDOW);
    Ok((chunk, window))
}

/// What a dirty transfer needs: a target that already holds the previous image (a file,
/// device or export of exactly the image's size), or a stream with a base to merge into;
/// and nothing that assumes the whole image comes (verify, resume, an expected sha256).
async fn check_dirty(req: &OpenRequest, opts: &RecvOptions, sink: &Arc<dyn Sink>) -> Result<()> {
    if req.writes {
        return Err(Error::Protocol(
            "an open request cannot be both a stream of writes and a dirty transfer".into(),
        ));
    }
    if opts.verify || req.verify || opts.expect_sha256.is_some() {
        return Err(Error::Usage(
            "a dirty-bitmap transfer cannot be verified or checked against an expected sha256 \
             here: drop --verify / --expect-sha256"
                .into(),
        ));
    }
    if opts.resume {
        return Err(Error::Usage(
            "a dirty-bitmap transfer cannot be resumed: its bitmap still marks every change, \
             run it again whole"
                .into(),
        ));
    }
    if sink.merges_base() {
        return Ok(());
    }
    if sink.caps().sequential || sink.size().is_none() {
        return Err(Error::Usage(
            "a dirty-bitmap transfer into a stream needs the previous image to merge: pass \
             --base FILE (or receive into the image itself)"
                .into(),
        ));
    }
    match sink.size() {
        Some(s) if s == req.size => Ok(()),
        s => Err(Error::Usage(format!(
            "a dirty-bitmap transfer updates an existing image of the same size: copy it whole \
             first (the target holds {} bytes, the source {})",
            s.unwrap_or(0),
            req.size
        ))),
    }
}

async fn refuse(conn: &DataConn, msg: Message, err: &Error) {
    if let Some(reply_to) = msg.reply {
        let _ = conn
            .publish_within(&reply_to, encode(&OpenReply::refuse(err)), ACK_BOUND)
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

/// A frame of a dirty transfer: it must start at or after where the one before it ended
/// (increasing offsets, gaps allowed, never overlapping).
fn check_after(h: &ChunkHeader, after: u64, size: u64, chunk: u64) -> Result<()> {
    if h.kind != Kind::End && h.offset < after {
        return Err(Error::Protocol(format!(
            "frame {} at offset {}: overlaps the frame before it, which ended at {after}",
            h.seq, h.offset
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

/// Re-read the whole target and check every frame's checksum (and zeros) against what was
/// written: frames of earlier runs (from the journal) as well as this one's.
async fn verify_target(sink: Arc<dyn Sink>, frames: Vec<Frame>, chunk: u64) -> Result<()> {
    match first_mismatch(sink, &frames, chunk, Hashers::default()).await? {
        None => Ok(()),
        Some((_, offset)) => Err(Error::Integrity(format!(
            "verify: the target differs from what was sent in the frame at offset {offset}"
        ))),
    }
}

/// Re-read `frames` (consecutive from offset 0) from the target; the index and offset of
/// the first one it no longer holds, if any. Data frames are read whole, zero ranges in
/// chunk-sized pieces, trims not at all (their contents are undefined). `hashers` are fed
/// the bytes of every frame that checks out, in order, up to the first that does not
/// (a trim as zeros, as `submit` feeds it).
async fn first_mismatch(
    sink: Arc<dyn Sink>,
    frames: &[Frame],
    chunk: u64,
    mut hashers: Hashers<'_>,
) -> Result<Option<(usize, u64)>> {
    // (frame index, frame offset, piece offset, piece length, last piece of its frame)
    let mut pieces = Vec::new();
    let mut offset = 0u64;
    for (i, f) in frames.iter().enumerate() {
        match f.kind {
            Kind::Data => pieces.push((i, offset, offset, f.length, true)),
            Kind::Zero => {
                let mut pos = offset;
                while pos < offset + f.length {
                    let n = chunk.min(offset + f.length - pos);
                    pieces.push((i, offset, pos, n, pos + n == offset + f.length));
                    pos += n;
                }
            }
            _ => pieces.push((i, offset, offset, 0, true)),
        }
        offset += f.length;
    }
    let mut reads = futures::stream::iter(pieces.into_iter().map(|(i, at, pos, len, last)| {
        let read = if len == 0 {
            futures::future::ready(Ok(Bytes::new())).boxed()
        } else {
            sink.read(pos, len as usize)
        };
        read.map(move |r| r.map(|b| (i, at, last, b)))
    }))
    .buffered(WRITE_DEPTH);
    while let Some(next) = reads.next().await {
        let (i, at, last, data) = next?;
        let f = frames[i];
        let good = match f.kind {
            Kind::Data => {
                let header = ChunkHeader {
                    kind: f.kind,
                    session: 0,
                    seq: i as u64,
                    offset: at,
                    length: f.length,
                    checksum: f.checksum,
                };
                header.verify(&data)
            }
            Kind::Zero => is_zero(&data),
            _ => true,
        };
        if !good {
            return Ok(Some((i, at)));
        }
        if last {
            hashers.feed(f, &data);
        }
    }
    Ok(None)
}

/// What a re-read of the target rebuilds: the expected image's sha256, the content digest.
#[derive(Default)]
struct Hashers<'a> {
    sha256: Option<&'a mut Sha256>,
    content: Option<&'a mut ContentDigest>,
}

impl Hashers<'_> {
    /// One frame that checked out: its bytes (`data`, for a data frame) or its zeros.
    fn feed(&mut self, f: Frame, data: &[u8]) {
        if let Some(h) = self.sha256.as_deref_mut() {
            match f.kind {
                Kind::Data => h.update(data),
                _ => hash_zeros(h, f.length),
            }
        }
        if let Some(c) = self.content.as_deref_mut() {
            match f.kind {
                Kind::Data => c.data(data),
                _ => c.zeros(f.length),
            }
        }
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

    /// A journal path in `dir` (none there yet), its header and one written frame.
    fn journal_fixture(
        dir: &std::path::Path,
    ) -> (
        std::path::PathBuf,
        crate::journal::Header,
        crate::journal::Frame,
    ) {
        let path = crate::journal::path_for(dir, "t");
        let _ = std::fs::remove_file(&path);
        let header = crate::journal::Header {
            v: crate::journal::JOURNAL_VERSION,
            transfer_id: "t".into(),
            target: "/dev/x".into(),
            size: 100,
            chunk_size: 10,
            key_hash: "a".repeat(64),
            identity: None,
        };
        let frame = crate::journal::Frame {
            kind: Kind::Data,
            length: 10,
            checksum: 1,
        };
        (path, header, frame)
    }

    #[test]
    fn a_kept_journal_is_named_whoever_gave_up() {
        let dir = std::env::temp_dir().join(format!("nbdnats-settle-{}", std::process::id()));
        let (path, header, frame) = journal_fixture(&dir);
        for err in [
            Error::Timeout("the sender went quiet".into()),
            Error::from_remote("timeout", "the sender gave up: its receiver was silent"),
        ] {
            let mut j = Journal::create(&path, header.clone()).unwrap();
            j.checkpoint(&[frame]).unwrap();
            let said = settle_journal(Some(j), err).to_string();
            assert!(said.contains("run the same recv with --resume"), "{said}");
            assert!(path.is_file(), "{said}");
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn a_transfer_cancelled_for_good_keeps_no_journal() {
        let dir = std::env::temp_dir().join(format!("nbdnats-abandon-{}", std::process::id()));
        let (path, header, frame) = journal_fixture(&dir);
        let progress = crate::stats::Progress::new("t", "recv");
        assert_eq!(progress.cause(Error::Cancelled).code(), "cancelled");
        progress
            .abandoned
            .store(true, std::sync::atomic::Ordering::Relaxed);
        for err in [
            progress.cause(Error::Cancelled),
            Error::from_remote(
                "abandoned",
                "the sender gave up: transfer cancelled for good",
            ),
            Error::Integrity("digest mismatch".into()),
        ] {
            let mut j = Journal::create(&path, header.clone()).unwrap();
            j.checkpoint(&[frame]).unwrap();
            let said = settle_journal(Some(j), err).to_string();
            assert!(!path.exists() && !said.contains("--resume"), "{said}");
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
    fn dirty_frames_may_leave_gaps_but_never_go_back() {
        assert!(check_after(&h(Kind::Data, 8192, 4096), 0, 65536, 4096).is_ok());
        assert!(check_after(&h(Kind::Zero, 4096, 4096), 4096, 65536, 4096).is_ok());
        assert!(check_after(&h(Kind::Data, 4095, 4096), 4096, 65536, 4096).is_err());
        assert!(check_after(&h(Kind::Data, 65536, 4096), 0, 65536, 4096).is_err());
        assert!(check_after(&h(Kind::End, 65536, 0), 12288, 65536, 4096).is_ok());
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

    fn frame(kind: Kind, seq: u64, offset: u64, payload: &[u8], length: u64) -> Frame {
        let header = ChunkHeader {
            kind,
            session: 9,
            seq,
            offset,
            length,
            checksum: 0,
        };
        Frame {
            kind,
            length,
            checksum: header.checksum_over(payload),
        }
    }

    fn frames() -> Vec<Frame> {
        let payload = vec![0xabu8; 8192];
        vec![
            frame(Kind::Data, 0, 0, &payload, 8192),
            frame(Kind::Zero, 1, 8192, &[], 8192),
        ]
    }

    async fn sink(flip_at: u64) -> Arc<Corrupting> {
        let sink = Arc::new(Corrupting {
            data: Mutex::new(vec![0u8; 16384]),
            flip_at,
        });
        sink.write(0, Bytes::from(vec![0xabu8; 8192]))
            .await
            .unwrap();
        sink
    }

    #[tokio::test]
    async fn verify_passes_on_a_faithful_target() {
        assert!(verify_target(sink(u64::MAX).await, frames(), 4096)
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn verify_names_the_offset_of_a_corrupted_write() {
        let err = verify_target(sink(100).await, frames(), 4096)
            .await
            .unwrap_err();
        assert_eq!(err.code(), "integrity");
        assert!(err.to_string().contains("at offset 0"), "{err}");
    }

    #[tokio::test]
    async fn a_changed_zero_range_is_found_and_hashing_stops_before_it() {
        let target = sink(u64::MAX).await;
        target.data.lock().unwrap()[12000] = 1;
        let mut h = Sha256::new();
        let mut content = ContentDigest::default();
        let hashers = Hashers {
            sha256: Some(&mut h),
            content: Some(&mut content),
        };
        let bad = first_mismatch(target, &frames(), 4096, hashers)
            .await
            .unwrap();
        assert_eq!(bad, Some((1, 8192)));
        let want: [u8; 32] = Sha256::digest(vec![0xabu8; 8192]).into();
        assert_eq!(<[u8; 32]>::from(h.finalize()), want);
        let mut whole = ContentDigest::default();
        whole.data(&[0xabu8; 8192]);
        assert_eq!(content.value(), whole.value());
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
        let h = ChunkHeader::sample;
        let mut data = vec![0u8; HEADER_LEN + 64];
        data[HEADER_LEN..].fill(0xa5);
        h(Kind::Data, 64).seal(&mut data);
        let end = EndSummary {
            digest: [1; 16],
            frames: 9,
            data_bytes: 1,
            zero_bytes: 2,
            content: [4; 16],
            dirty_bytes: 3,
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
