//! The sending engine: plan frames from source extents, read ahead, publish within the
//! receiver's window, send again what the receiver reports missing (re-reading the source,
//! never buffering), re-open the transfer when the receiver goes silent, finish with END and
//! wait for the receiver's DONE.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use async_nats::Message;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, FuturesUnordered};
use futures::{FutureExt, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::checksum::{
    is_zero, ContentDigest, Digest, Tap, CHECKSUM_ALGORITHM, CONTENT_ALGORITHM, DIGEST_ALGORITHM,
};
use crate::compress::{Codec, Mode, Packer};
use crate::conn::{fit_chunk, DataConn};
use crate::error::{Error, Result};
use crate::extents::{pieces, Extent};
use crate::faults::Faults;
use crate::frame::{ChunkHeader, EndSummary, Kind, HEADER_LEN, PROTOCOL_VERSION};
use crate::handshake::{OpenReply, OpenRequest, SenderKey, Stripes};
use crate::io::Source;
use crate::link::{
    ack_request, close_and_compare, control_frame, open, read_ack, retry, send_abort, AckRequest,
    Peer, Stall, Subjects, RTO,
};
use crate::pool::Pool;
use crate::stats::{Progress, State};
use crate::window::{frame_cost, Window};

/// How much of the disk one extent query covers.
const EXTENT_SPAN: u64 = 1 << 30;
/// Bytes of source reads in flight. A local NBD server answers a 1 MiB read in well under a
/// millisecond, so a few keep it busy; more cost memory and cache (bench/README.md,
/// "Measured before 2026-12").
const READ_AHEAD_BYTES: u64 = 4 << 20;
/// No ack at all for this long: the receiver is gone; re-open the transfer until --timeout.
const SILENCE: Duration = Duration::from_secs(6);

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
    /// A dirty transfer: the source's extents mark what its dirty bitmap leaves unchanged
    /// (`Extent::skip`), which is never sent (`OpenRequest::dirty`).
    pub dirty: bool,
    /// Compression of data frames (`--compress`).
    pub compress: Mode,
    /// Ask the receiver to stripe the transfer (`--streams`; `striped` runs the stripes).
    pub stripes: Option<Stripes>,
    /// A stripe's sender hands its content digest's block hashes to the whole image's.
    pub tap: Option<Tap>,
}

struct Outgoing {
    seq: u64,
    bytes: Bytes,
    kind: Kind,
    offset: u64,
    len: u64,
    checksum: u64,
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

/// `NBDNATS_FAULTS=old_peer=1` (tests): behave like an nbd-nats from before compression,
/// whose open request has no `compress` field.
fn old_peer() -> bool {
    Faults::from_env().is_some_and(|f| f.old_peer())
}

/// The codec of this transfer, from what the receiver picked.
fn settle_codec(mode: Mode, reply: &OpenReply, id: &str) -> Result<Codec> {
    if old_peer() {
        return Ok(Codec::None);
    }
    mode.settle(&reply.compress, id)
}

/// After the transfer: its key is needed again only if the transfer can be continued.
pub fn settle_key<T>(key_file: Option<&std::path::Path>, result: &Result<T>) {
    if let Some(path) = key_file {
        if !result.as_ref().err().is_some_and(Error::resumable) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Send `source` as one transfer. Returns `Some(stripes)` instead when the receiver agreed
/// to stripe it as `opts.stripes` asked: nothing was sent then, and the sub-streams are the
/// caller's to run (`striped::send`); the key file stays for them.
pub async fn send(
    conn: &DataConn,
    source: Arc<dyn Source>,
    subjects: &Subjects,
    opts: &SendOptions,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<Option<Stripes>> {
    let size = source.size();
    progress.size.store(size, Relaxed);
    if opts.dirty && opts.resume {
        return Err(Error::Usage(
            "a dirty-bitmap transfer cannot be resumed: its bitmap still marks every change \
             since the last backup, so run it again whole (without --resume)"
                .into(),
        ));
    }
    if opts.dirty && opts.verify {
        return Err(Error::Usage(
            "--verify cannot check a dirty-bitmap transfer (the target's unsent ranges are not \
             the sender's to check); drop --verify, or compare digests afterwards"
                .into(),
        ));
    }
    let chunk = fit_chunk(opts.chunk_size, conn.max_payload)?;
    // Subscribe to acks before the receiver can send any.
    let mut acks = conn.client.subscribe(subjects.acks.clone()).await?;
    progress.set_state(State::Waiting);
    let (key, shown) = sender_key(opts, &progress.transfer_id)?;
    let wrong_resume = std::sync::atomic::AtomicBool::new(false);
    let wrong_resume = &wrong_resume;
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
            content: CONTENT_ALGORITHM.into(),
            verify: opts.verify,
            resume: opts.resume,
            writes: false,
            dirty: opts.dirty,
            key: shown,
            compress: if old_peer() {
                Vec::new()
            } else {
                opts.compress.offer()
            },
            stripes: opts.stripes.filter(|_| !old_peer()),
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
        let stripes = match agreed_stripes(&request, &reply) {
            Ok(s) => s,
            Err(e) => {
                // Asked the wrong way: the transfer stays as it is for the right resume.
                wrong_resume.store(true, Relaxed);
                return Err(e);
            }
        };
        let codec = match settle_codec(opts.compress, &reply, &progress.transfer_id) {
            Ok(_) if stripes.is_some() => return Ok(stripes),
            Ok(c) => c,
            Err(e) => {
                // The receiver said yes: tell it we will not come, so it ends now.
                send_abort(conn, subjects, reply.session, reply.resume_seq, &e).await;
                return Err(e);
            }
        };
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
            faults: Faults::from_env(),
            session: 0,
            peer: Peer::new(Window::new(opts.window), opts.timeout),
            digest: Digest::default(),
            content: ContentDigest::tapped(opts.tap.clone()),
            digest_next: 0,
            resume_seq: 0,
            resume_offset: 0,
            planner: Planner::new(source, size, reply.chunk_size),
            dirty: opts.dirty,
            compress: opts.compress,
            packer: Packer::new(codec)?,
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
        };
        tx.restart_at(&reply);
        progress.chunk_size.store(tx.chunk, Relaxed);
        progress.streams.store(1, Relaxed);
        progress.set_state(State::Running);
        let result = tx
            .run(&mut acks, opts.verify, cancel)
            .await
            .map_err(|e| progress.cause(e));
        if let Err(e) = &result {
            if !e.is_remote() {
                tx.abort(e).await;
            }
        }
        result.map(|()| None)
    }
    .await
    .map_err(|e| progress.cause(e));
    // A sub-stream's key outlives it while the whole transfer may be resumed (`striped`).
    let keep = match &result {
        Ok(Some(_)) => true,
        Ok(None) => opts.tap.is_some(),
        Err(_) => wrong_resume.load(Relaxed),
    };
    if !keep {
        settle_key(opts.key_file.as_deref(), &result);
    }
    result
}

/// The stripes the receiver agreed to: none (one stream) when it did not answer with any,
/// the ones asked for when it did; any others are a receiver that runs this transfer
/// otherwise (a resume with another `--streams`).
fn agreed_stripes(request: &OpenRequest, reply: &OpenReply) -> Result<Option<Stripes>> {
    match (request.stripes, reply.stripes) {
        (_, None) => Ok(None),
        (Some(asked), Some(got)) if asked == got => Ok(Some(got)),
        (_, Some(got)) => Err(Error::Usage(format!(
            "the receiver runs this transfer as {} sub-streams of {}-byte stripes; resume it \
             with --streams {}",
            got.count, got.size, got.count
        ))),
    }
}

struct Planner {
    source: Arc<dyn Source>,
    size: u64,
    chunk: u64,
    pos: u64,
    seq: u64,
    queue: VecDeque<Extent>,
    /// Bytes of the source marked changed (not `skip`) so far.
    dirty: u64,
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
            dirty: 0,
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
                if !e.skip {
                    self.dirty += e.len;
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
    faults: Option<Faults>,
    session: u32,
    peer: Peer,
    /// Frame and content digests over frames `[0, digest_next)`, each folded exactly once,
    /// in sequence order, which is offset order.
    digest: Digest,
    content: ContentDigest,
    digest_next: u64,
    /// Frames below this are already written at the receiver: not sent again.
    resume_seq: u64,
    resume_offset: u64,
    planner: Planner,
    /// Frame buffers, reused.
    pool: Pool,
    /// The planner has handed out every frame of the disk.
    planned_all: bool,
    /// A dirty transfer: frames only where the bitmap marks changes.
    dirty: bool,
    compress: Mode,
    /// Compresses data frames with the codec the receiver picked (or passes them on).
    packer: Packer,
    reads: FuturesOrdered<BoxFuture<'static, Result<Outgoing>>>,
    ready: Option<Outgoing>,
    retransmits: FuturesUnordered<BoxFuture<'static, Result<Outgoing>>>,
    /// One past the highest frame published in this session.
    next_unsent: u64,
    /// The END frame once sent, and its sequence number.
    end: Option<(u64, Bytes, EndSummary)>,
}

impl Sender<'_> {
    /// Start (or restart) the stream at the receiver's resume point, in its session.
    fn restart_at(&mut self, reply: &OpenReply) {
        self.session = reply.session;
        self.peer.window.clear();
        self.peer.window.set_limit(reply.window);
        self.resume_seq = reply.resume_seq;
        self.resume_offset = reply.resume_offset;
        self.planner = Planner::new(self.source.clone(), self.size, self.chunk);
        self.planned_all = false;
        self.reads = FuturesOrdered::new();
        self.ready = None;
        self.retransmits = FuturesUnordered::new();
        self.next_unsent = reply.resume_seq;
        self.end = None;
        self.peer.received = reply.resume_seq;
        self.peer.last_heard = Instant::now();
        self.peer.last_progress = Instant::now();
        self.progress
            .window
            .store(self.peer.window.limit(), Relaxed);
        self.progress.done_bytes.store(reply.resume_offset, Relaxed);
        if reply.resume_seq > 0 {
            Progress::add(&self.progress.resumes, 1);
        }
    }

    async fn publish(&mut self, frame: Bytes) -> Result<()> {
        let (conn, subjects, progress) = (self.conn, self.subjects, self.progress);
        let faults = self.faults.as_mut();
        (self.peer)
            .publish(conn, subjects, frame, progress, faults, &self.cancel)
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
        let Some(entry) = self.peer.window.get_mut(seq) else {
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
                    skip: false,
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
        if !self.peer.take(&ack, self.next_unsent, self.progress) {
            return Ok(None);
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
        let stall = Stall::since(self.peer.timeout, self.peer.last_heard);
        let mut request = self.request.clone();
        request.resume = true;
        // This transfer runs as one stream now, whatever a restarted receiver would agree to.
        request.stripes = None;
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
        let codec = settle_codec(self.compress, &reply, &self.progress.transfer_id)?;
        if codec != self.packer.codec() {
            self.packer = Packer::new(codec)?;
        }
        self.restart_at(&reply);
        Ok(())
    }

    /// A frame as it goes on the wire: a data frame compressed when that pays.
    fn wire(&mut self, frame: &Outgoing) -> Bytes {
        if frame.kind != Kind::Data {
            return frame.bytes.clone();
        }
        match self.packer.pack(&frame.bytes) {
            Some(packed) => Bytes::from(packed),
            None => frame.bytes.clone(),
        }
    }

    /// Put a frame that came out of the read pipeline on its way: fold it into the digest
    /// (once per frame), publish it if the receiver lacks it and the window allows.
    /// Returns false when the window is full (the frame stays ready).
    async fn forward(&mut self, frame: Outgoing) -> Result<bool> {
        if frame.seq == self.digest_next {
            self.digest.update(frame.checksum);
            self.digest_next += 1;
            let counter = if frame.kind == Kind::Data {
                self.content.data(&frame.bytes[HEADER_LEN..]);
                &self.progress.data_bytes
            } else {
                self.content.zeros(frame.len);
                &self.progress.zero_bytes
            };
            Progress::add(counter, frame.len);
            Progress::add(&self.progress.frames, 1);
        }
        if frame.seq < self.resume_seq {
            return Ok(true); // only re-read to rebuild the digest
        }
        // (A dirty transfer's frames leave gaps: the receiver's offset is where the last
        // frame it holds ended, not where the next starts.)
        if frame.seq == self.resume_seq && !self.dirty && frame.offset != self.resume_offset {
            return Err(Error::Protocol(format!(
                "the source is cut differently than before: frame {} starts at {} but the receiver expects {}; \
                 the source changed since the transfer was interrupted, start over",
                frame.seq, frame.offset, self.resume_offset
            )));
        }
        let cost = frame_cost(frame.bytes.len() as u64 - HEADER_LEN as u64);
        if !self.peer.window.can_send(cost) {
            self.ready = Some(frame);
            return Ok(false);
        }
        self.peer
            .window
            .sent(frame.seq, frame.kind, frame.offset, frame.len, cost);
        self.next_unsent = self.next_unsent.max(frame.seq + 1);
        let wire = self.wire(&frame);
        drop(frame);
        self.publish(wire).await?;
        Ok(true)
    }

    async fn run(
        &mut self,
        acks: &mut async_nats::Subscriber,
        verify: bool,
        cancel: &CancellationToken,
    ) -> Result<()> {
        // Read ahead at most half the window, so memory stays near the window.
        let ahead = READ_AHEAD_BYTES.min(self.peer.window.limit() / 2);
        let depth = (ahead / self.chunk).clamp(2, 32) as usize;
        let mut tick = tokio::time::interval(RTO / 4);
        loop {
            while !self.planned_all && self.reads.len() < depth {
                let next = self.planner.next().await?;
                if self.dirty {
                    (self.progress.dirty_bytes).fetch_max(self.planner.dirty, Relaxed);
                }
                match next {
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
                    if self.peer.window.get_mut(frame.seq).is_some() {
                        let wire = self.wire(&frame);
                        drop(frame);
                        self.publish(wire).await?;
                    }
                }
                Some(r) = self.reads.next(), if self.ready.is_none() => self.ready = Some(r?),
                _ = tick.tick() => {
                    if !self.peer.window.is_empty() && self.peer.last_heard.elapsed() >= SILENCE {
                        self.reopen(cancel).await?;
                    } else if let Some(probe) = self.peer.probe() {
                        if let Some(seq) = probe {
                            self.resend(seq)?;
                        }
                        // END arrived but DONE did not (or was lost): say END again, the
                        // receiver answers every END with DONE.
                        if let Some((end_seq, _, _)) = self.end {
                            let quiet = self.peer.last_heard.elapsed() >= RTO;
                            if quiet && self.peer.window.get_mut(end_seq).is_some_and(|e| e.last_sent.elapsed() >= RTO) {
                                self.resend(end_seq)?;
                            }
                        }
                    }
                    if self.peer.keepalive_due() {
                        let ka = control_frame(Kind::Keepalive, self.session, self.next_unsent);
                        self.publish(ka).await?;
                    }
                }
            }
        }
    }

    async fn send_end(&mut self) -> Result<()> {
        let total = self.planner.seq;
        let digest = self.digest.value();
        // A dirty transfer reads only what changed: it knows no content digest of the
        // image, and reports its frame digest (docs/protocol.md, "Dirty transfers").
        let mut content = (!self.dirty).then(|| self.content.value());
        if let (Some(f), Some(c)) = (self.faults.as_mut(), content.as_mut()) {
            *c = f.content(*c);
        }
        let (frame, summary) = (self.peer).end(
            self.session,
            total,
            self.size,
            self.progress,
            digest,
            content,
        );
        self.next_unsent = total + 1;
        self.end = Some((total, frame.clone(), summary));
        self.publish(frame).await
    }

    async fn finish(&mut self, digest: [u8; 16], verified: bool, verify: bool) -> Result<()> {
        let end = self
            .end
            .as_ref()
            .map(|(seq, _, summary)| (*seq, summary.digest));
        close_and_compare(self.conn, self.subjects, self.session, end, digest).await?;
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
