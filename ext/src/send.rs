//! The sending engine: plan frames from source extents, read ahead, publish within the
//! receiver's window, finish with END and wait for the receiver's DONE.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use async_nats::{Message, Subject};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::checksum::{digest_hex, is_zero, Digest, CHECKSUM_ALGORITHM, DIGEST_ALGORITHM};
use crate::conn::{fit_chunk, DataConn};
use crate::error::{Error, Result};
use crate::extents::{pieces, Extent};
use crate::frame::{
    Ack, AckBody, AckKind, ChunkHeader, EndSummary, Kind, HEADER_LEN, PROTOCOL_VERSION,
};
use crate::handshake::{decode, encode, OpenReply, OpenRequest};
use crate::io::Source;
use crate::stats::{Progress, State};
use crate::window::{frame_cost, Window};

/// How much of the disk one extent query covers.
const EXTENT_SPAN: u64 = 1 << 30;
/// Bytes read ahead of the window (bounded so RSS stays near the window).
const READ_AHEAD_BYTES: u64 = 16 << 20;

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
}

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
        self.at = Instant::now() + self.timeout.unwrap_or(Duration::from_secs(86_400 * 365));
    }
    pub async fn expired(&self) {
        tokio::time::sleep_until(self.at).await
    }
    pub fn describe(&self) -> String {
        self.timeout
            .map_or_else(|| "ever".into(), |t| format!("{}s", t.as_secs_f64()))
    }
}

struct Outgoing {
    bytes: Bytes,
    kind: Kind,
    len: u64,
    checksum: u64,
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
    progress
        .size
        .store(size, std::sync::atomic::Ordering::Relaxed);
    let chunk = fit_chunk(opts.chunk_size, conn.max_payload)?;
    // Subscribe to acks before the receiver can send any.
    let mut acks = conn
        .client
        .subscribe(subjects.acks.clone())
        .await
        .map_err(nats_err)?;
    progress.set_state(State::Waiting);
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
    };
    let reply = open(
        conn,
        subjects,
        &request,
        opts.timeout,
        &progress.transfer_id,
        cancel,
    )
    .await?;
    let chunk = reply.chunk_size.min(chunk);
    if chunk == 0 {
        return Err(Error::Protocol(
            "receiver accepted a chunk size of 0".into(),
        ));
    }
    let session = reply.session;
    let mut window = Window::new(opts.window);
    window.set_limit(reply.window);
    progress
        .chunk_size
        .store(chunk, std::sync::atomic::Ordering::Relaxed);
    progress
        .window
        .store(window.limit(), std::sync::atomic::Ordering::Relaxed);
    progress.set_state(State::Running);

    let mut sender = Sender {
        conn,
        subjects,
        session,
        window,
        digest: Digest::default(),
        published: 0,
        stall: Stall::new(opts.timeout),
        progress,
    };
    match sender.stream(&mut acks, source, size, chunk, cancel).await {
        Ok(()) => {}
        Err(e) => {
            if !matches!(e, Error::Remote { .. }) {
                sender.abort(&e).await;
            }
            return Err(e);
        }
    }
    progress.set_state(State::Finishing);
    let summary = EndSummary {
        digest: sender.digest.value(),
        frames: sender.published,
        data_bytes: progress
            .data_bytes
            .load(std::sync::atomic::Ordering::Relaxed),
        zero_bytes: progress
            .zero_bytes
            .load(std::sync::atomic::Ordering::Relaxed),
    };
    let end = ChunkHeader {
        kind: Kind::End,
        session,
        seq: sender.published,
        offset: size,
        length: 0,
        checksum: 0,
    };
    let (frame, _) = end.encode(&summary.encode());
    sender.publish(frame).await?;
    sender.window.sent(sender.published, 0, 0);
    sender.published += 1;
    progress.set_digest(digest_hex(&summary.digest));
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                sender.abort(&Error::Cancelled).await;
                return Err(Error::Cancelled);
            }
            msg = acks.next() => {
                if let Some((digest, verified)) = sender.on_ack(msg)? {
                    if digest != summary.digest {
                        return Err(Error::Integrity(format!(
                            "digest mismatch: sent {} but the receiver wrote {}",
                            digest_hex(&summary.digest), digest_hex(&digest)
                        )));
                    }
                    if opts.verify && !verified {
                        return Err(Error::Integrity("the receiver did not verify the target".into()));
                    }
                    progress.verified.store(verified, std::sync::atomic::Ordering::Relaxed);
                    return Ok(());
                }
            }
            _ = sender.stall.expired() => {
                return Err(Error::Timeout(format!(
                    "the receiver did not confirm the end of transfer {} within {}",
                    progress.transfer_id, sender.stall.describe()
                )));
            }
        }
    }
}

fn nats_err(e: impl std::fmt::Display) -> Error {
    Error::Nats(format!("NATS: {e}"))
}

/// The open handshake: ask until a receiver answers, the deadline passes or we are cancelled.
async fn open(
    conn: &DataConn,
    subjects: &Subjects,
    request: &OpenRequest,
    timeout: Option<Duration>,
    id: &str,
    cancel: &CancellationToken,
) -> Result<OpenReply> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let payload = encode(request);
    loop {
        let remaining = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => Duration::from_secs(2),
        };
        if remaining.is_zero() {
            return Err(Error::Timeout(format!(
                "no receiver for transfer {id} answered within {}s; start `nbd-nats recv TARGET --id {id}` \
                 on the target host first, or raise --timeout",
                timeout.map_or(0.0, |t| t.as_secs_f64())
            )));
        }
        let ask = async_nats::Request::new()
            .payload(payload.clone())
            .timeout(Some(remaining.min(Duration::from_secs(2))));
        let answer = tokio::select! {
            _ = cancel.cancelled() => return Err(Error::Cancelled),
            a = conn.client.send_request(subjects.open.clone(), ask) => a,
        };
        match answer {
            Ok(msg) => {
                let reply: OpenReply = decode("open reply", &msg.payload)?;
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
                        _ = tokio::time::sleep(remaining.min(Duration::from_millis(200))) => {}
                    }
                }
                RequestErrorKind::TimedOut => {}
                _ => return Err(nats_err(e)),
            },
        }
    }
}

struct Planner {
    source: Arc<dyn Source>,
    size: u64,
    chunk: u64,
    pos: u64,
    queue: VecDeque<Extent>,
}

impl Planner {
    async fn next(&mut self) -> Result<Option<Extent>> {
        loop {
            if let Some(p) = self.queue.pop_front() {
                return Ok(Some(p));
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

/// Read one piece (unless it is known zero) and seal it as a frame.
fn prepare(
    source: &Arc<dyn Source>,
    piece: Extent,
    seq: u64,
    session: u32,
) -> BoxFuture<'static, Result<Outgoing>> {
    let zero = move || {
        let (bytes, checksum) = ChunkHeader {
            kind: Kind::Zero,
            session,
            seq,
            offset: piece.offset,
            length: piece.len,
            checksum: 0,
        }
        .encode(&[]);
        Outgoing {
            bytes,
            kind: Kind::Zero,
            len: piece.len,
            checksum,
        }
    };
    if piece.zero {
        return futures::future::ready(Ok(zero())).boxed();
    }
    source
        .read(piece.offset, piece.len as usize, HEADER_LEN)
        .map(move |r| {
            let mut buf = r?;
            if is_zero(&buf[HEADER_LEN..]) {
                return Ok(zero());
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
                bytes: buf.freeze(),
                kind: Kind::Data,
                len: piece.len,
                checksum,
            })
        })
        .boxed()
}

struct Sender<'a> {
    conn: &'a DataConn,
    subjects: &'a Subjects,
    session: u32,
    window: Window,
    digest: Digest,
    /// Frames published so far; also the next sequence number.
    published: u64,
    stall: Stall,
    progress: &'a Progress,
}

impl Sender<'_> {
    async fn publish(&self, frame: Bytes) -> Result<()> {
        self.conn
            .client
            .publish(self.subjects.chunks.clone(), frame)
            .await
            .map_err(nats_err)
    }

    /// Tell the receiver we give up, so it fails at once rather than at its timeout.
    async fn abort(&self, why: &Error) {
        let header = ChunkHeader {
            kind: Kind::Abort,
            session: self.session,
            seq: self.published,
            offset: 0,
            length: 0,
            checksum: 0,
        };
        let (frame, _) = header.encode(
            crate::frame::truncate(&why.to_string(), crate::frame::MAX_MESSAGE_LEN).as_bytes(),
        );
        let _ = self.publish(frame).await;
        let _ = self.conn.client.flush().await;
    }

    /// Handle one ack message; returns the receiver's digest once it reports DONE.
    fn on_ack(&mut self, msg: Option<Message>) -> Result<Option<([u8; 16], bool)>> {
        let msg = msg.ok_or_else(|| Error::Nats("the ack subscription ended".into()))?;
        let ack = match Ack::decode(&msg.payload) {
            Ok(a) if a.session == self.session => a,
            _ => {
                Progress::add(&self.progress.bad_frames, 1);
                return Ok(None);
            }
        };
        self.stall.reset();
        let covered = self
            .window
            .ack(ack.next_seq, self.published)
            .map_err(Error::Protocol)?;
        Progress::add(&self.progress.done_bytes, covered);
        if ack.window > 0 {
            self.window.set_limit(ack.window);
        }
        match (ack.kind, ack.body) {
            (AckKind::Error, AckBody::Error { code, message }) => {
                Err(Error::from_remote(&code, &message))
            }
            (AckKind::Done, AckBody::Done { digest, verified }) => {
                if ack.next_seq != self.published {
                    return Err(Error::Protocol(format!(
                        "receiver reported done after {} of {} frames",
                        ack.next_seq, self.published
                    )));
                }
                Ok(Some((digest, verified)))
            }
            (AckKind::Ack, _) => Ok(None),
            _ => Err(Error::Protocol("malformed ack from the receiver".into())),
        }
    }

    /// Publish every frame of the disk, never exceeding the window.
    async fn stream(
        &mut self,
        acks: &mut async_nats::Subscriber,
        source: Arc<dyn Source>,
        size: u64,
        chunk: u64,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let depth = (READ_AHEAD_BYTES / chunk).clamp(2, 32) as usize;
        let mut planner = Planner {
            source: source.clone(),
            size,
            chunk,
            pos: 0,
            queue: VecDeque::new(),
        };
        let mut reads: FuturesOrdered<BoxFuture<'static, Result<Outgoing>>> = FuturesOrdered::new();
        let mut planned = 0u64;
        let mut planned_all = false;
        let mut ready: Option<Outgoing> = None;
        loop {
            while !planned_all && reads.len() < depth {
                match planner.next().await? {
                    Some(piece) => {
                        reads.push_back(prepare(&source, piece, planned, self.session));
                        planned += 1;
                    }
                    None => planned_all = true,
                }
            }
            if let Some(frame) = ready.take() {
                let cost = frame_cost(frame.bytes.len() as u64 - HEADER_LEN as u64);
                if self.window.can_send(cost) {
                    self.publish(frame.bytes).await?;
                    self.window.sent(self.published, cost, frame.len);
                    self.digest.update(frame.checksum);
                    self.published += 1;
                    let counter = if frame.kind == Kind::Data {
                        &self.progress.data_bytes
                    } else {
                        &self.progress.zero_bytes
                    };
                    Progress::add(counter, frame.len);
                    Progress::add(&self.progress.frames, 1);
                    continue;
                }
                ready = Some(frame);
            } else if planned_all && reads.is_empty() {
                return Ok(());
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(Error::Cancelled),
                msg = acks.next() => {
                    if self.on_ack(msg)?.is_some() {
                        return Err(Error::Protocol("receiver reported done before the end".into()));
                    }
                }
                Some(r) = reads.next(), if ready.is_none() => ready = Some(r?),
                _ = self.stall.expired(), if self.window.outstanding() > 0 => {
                    return Err(Error::Timeout(format!(
                        "the receiver stopped acknowledging for {} ({} of {size} bytes written); is it still running?",
                        self.stall.describe(),
                        self.progress.done_bytes.load(std::sync::atomic::Ordering::Relaxed)
                    )));
                }
            }
        }
    }
}
