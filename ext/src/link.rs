//! What the two sending engines (`send`, reading a disk; `push`, a live stream) share:
//! the open handshake, the liveness of the link to the receiver (the window of frames in
//! flight, when the receiver last showed life or progress, stall detection), reading acks,
//! and the END, CLOSE, KEEPALIVE and ABORT frames.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use async_nats::{Message, Subject};
use bytes::Bytes;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::checksum::{content_hex, digest_hex};
use crate::compress::Codec;
use crate::conn::DataConn;
use crate::error::{Error, Result};
use crate::faults::{ChunkFate, Faults};
use crate::frame::{
    Ack, AckBody, AckKind, ChunkHeader, EndSummary, Kind, HEADER_LEN, PROTOCOL_VERSION,
};
use crate::handshake::{decode, encode, OpenReply, OpenRequest, CHECKING};
use crate::rate::Bucket;
use crate::stats::{Progress, State};
use crate::window::{max_frames_in_window, Window};

/// Frames the receiver has not seen for this long, with no progress meanwhile, are resent.
pub(crate) const RTO: Duration = Duration::from_secs(1);
/// A frame sent this many times without being written ends the transfer.
const MAX_RETRIES: u32 = 10;
/// How often a sender says it is alive while it has nothing to send, and the longest gap
/// between a receiver's acks while it is alive (also while it flushes or verifies).
pub(crate) const KEEPALIVE: Duration = Duration::from_secs(2);

/// The subjects of one transfer, formatted by the Python `subjects` module.
#[derive(Clone)]
pub struct Subjects {
    pub open: Subject,
    pub chunks: Subject,
    pub acks: Subject,
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
    /// A deadline `timeout` after `start` (when the peer was last heard).
    pub fn since(timeout: Option<Duration>, start: Instant) -> Stall {
        Stall {
            timeout,
            at: start + timeout.unwrap_or(FOREVER),
        }
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
    let header = ChunkHeader {
        kind,
        session,
        seq,
        offset: 0,
        length: 0,
        checksum: 0,
    };
    header.encode(&[]).0
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

/// The receiver reported DONE: say CLOSE (it may stop lingering), then compare digests.
/// `end`: END's sequence number and our digest, once END was sent.
pub(crate) async fn close_and_compare(
    conn: &DataConn,
    subjects: &Subjects,
    session: u32,
    end: Option<(u64, [u8; 16])>,
    theirs: [u8; 16],
) -> Result<()> {
    let Some((end_seq, ours)) = end else {
        return Err(Error::Protocol("DONE before END".into()));
    };
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

/// Publish a frame, waiting for room in the client's queue (it fills while the connection
/// is down) until `deadline`; cancellable.
async fn publish_frame(
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
        r = conn.client.publish(subject.clone(), frame) => Ok(r?),
    }
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
                // Another version's refusal too: its text would name versions backwards.
                if reply.v != PROTOCOL_VERSION {
                    return Err(crate::handshake::other_version(reply.v));
                }
                if !reply.ok {
                    return Err(Error::from_remote(&reply.code, &reply.message));
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

/// The sender's view of the receiver, kept from its acks: the frames in flight, how far it
/// has seen, and when it last showed life or progress.
pub(crate) struct Peer {
    pub window: Window,
    /// One past the highest frame the receiver has seen.
    pub received: u64,
    pub last_heard: Instant,
    pub last_progress: Instant,
    pub last_sent: Instant,
    /// Multiplies RTO while tail probes go unanswered.
    pub backoff: u32,
    /// How long the receiver may stay silent; `None` waits forever.
    pub timeout: Option<Duration>,
    /// Paces data frames to the transfer's rate cap (`Progress::rate_limit`).
    pub bucket: Bucket,
}

/// How often a wait for the rate cap looks at the cap again (it may have been changed).
const RATE_RECHECK: Duration = Duration::from_millis(100);

impl Peer {
    pub fn new(window: Window, timeout: Option<Duration>) -> Peer {
        Peer {
            window,
            received: 0,
            last_heard: Instant::now(),
            last_progress: Instant::now(),
            last_sent: Instant::now(),
            backoff: 1,
            timeout,
            bucket: Bucket::default(),
        }
    }

    /// Take in an ack of ours (frames below `sent` were published): move the window and
    /// count what it covers as done. Returns false, counting it as bad, if it acknowledges
    /// frames never sent: it is not from our receiver.
    pub fn take(&mut self, ack: &Ack, sent: u64, progress: &Progress) -> bool {
        let Ok(covered) = self.window.ack(ack.next_seq, sent) else {
            Progress::add(&progress.bad_frames, 1);
            return false;
        };
        self.last_heard = Instant::now();
        if covered > 0 || ack.received > self.received {
            self.last_progress = Instant::now();
            self.backoff = 1;
        }
        Progress::add(&progress.done_bytes, covered);
        self.received = self.received.max(ack.received);
        if ack.window > 0 {
            self.window.set_limit(ack.window);
        }
        true
    }

    /// Tail loss probe, once no progress was made for RTO (times the backoff): the highest
    /// frame the receiver has not seen. It shows the receiver the whole gap, which it then
    /// names in one ack. Backs off while nothing is heard, so a dead receiver costs little.
    /// `None` when no probe is due; `Some(None)` when one is, but nothing is overdue.
    pub fn probe(&mut self) -> Option<Option<u64>> {
        if self.last_progress.elapsed() < RTO * self.backoff {
            return None;
        }
        let seq = self.window.overdue(self.received, RTO).last().copied();
        self.backoff = (self.backoff * 2).min(8);
        Some(seq)
    }

    /// Nothing in flight and nothing sent for a while: time to say we are alive.
    pub fn keepalive_due(&self) -> bool {
        self.window.is_empty() && self.last_sent.elapsed() >= KEEPALIVE
    }

    /// The receiver has been silent, with frames in flight, for longer than the timeout.
    pub fn stalled(&self) -> Result<()> {
        if let Some(limit) = self.timeout {
            if !self.window.is_empty() && self.last_heard.elapsed() >= limit {
                return Err(Error::Timeout(format!(
                    "the receiver went quiet for {}s",
                    limit.as_secs_f64()
                )));
            }
        }
        Ok(())
    }

    /// The END frame, frame `total` at the end of the disk (`size`) with the summary of all
    /// before it, counted in flight. `content`: the content digest, which the transfer
    /// reports (a stream of writes has none and reports its frame digest).
    pub fn end(
        &mut self,
        session: u32,
        total: u64,
        size: u64,
        progress: &Progress,
        digest: [u8; 16],
        content: Option<[u8; 16]>,
    ) -> (Bytes, EndSummary) {
        let summary = EndSummary {
            digest,
            frames: total,
            data_bytes: progress.data_bytes.load(Relaxed),
            zero_bytes: progress.zero_bytes.load(Relaxed),
            content: content.unwrap_or_default(),
            dirty_bytes: progress.dirty_bytes.load(Relaxed),
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
        progress.set_digest(match content {
            Some(c) => content_hex(&c),
            None => digest_hex(&summary.digest),
        });
        self.window.sent(total, Kind::End, size, 0, 0);
        (header.encode(&summary.encode()).0, summary)
    }

    /// Publish a frame (first time or again) on the chunk subject, counting its payload as
    /// sent (its plain length) and as put on the wire (its length as published). While the
    /// connection is down it waits for room until the timeout since the receiver was last
    /// heard. `faults` (tests) may drop or damage it on the way.
    pub async fn publish(
        &mut self,
        conn: &DataConn,
        subjects: &Subjects,
        frame: Bytes,
        progress: &Progress,
        faults: Option<&mut Faults>,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let heard = self.pace(conn, subjects, &frame, progress, cancel).await?;
        self.last_sent = Instant::now();
        let wire = (frame.len() - HEADER_LEN.min(frame.len())) as u64;
        // A compressed frame's payload stands for the plain length its header declares.
        let plain = match ChunkHeader::parse_packed(&frame) {
            Ok((header, codec, _)) if codec != Codec::None => header.length,
            _ => wire,
        };
        Progress::add(&progress.sent_bytes, plain);
        Progress::add(&progress.wire_bytes, wire);
        let frame = match faults.map(|f| f.chunk(frame.clone())) {
            Some(ChunkFate::Drop) => return Ok(()),
            Some(ChunkFate::Send(f)) => f,
            None => frame,
        };
        let deadline = heard + self.timeout.unwrap_or(FOREVER);
        publish_frame(conn, &subjects.chunks, frame, deadline, cancel).await
    }

    /// Hold a data frame back until the rate cap lets it go; other frames (END, keepalives,
    /// zeros: no payload) pass at once. The cap is read again at least every
    /// `RATE_RECHECK`, so a change applies within that. While it waits it keeps the
    /// receiver from thinking us gone (keepalives); the time it waits is ours, not the
    /// receiver's silence, so the peer timeout counts from when the wait began. Returns
    /// when the receiver counts as last heard: then, or `last_heard` if nothing waited.
    async fn pace(
        &mut self,
        conn: &DataConn,
        subjects: &Subjects,
        frame: &Bytes,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<Instant> {
        let Ok((header, payload)) = ChunkHeader::parse(frame) else {
            return Ok(self.last_heard);
        };
        if header.kind != Kind::Data {
            return Ok(self.last_heard);
        }
        let n = payload.len() as u64;
        let began = Instant::now();
        let deadline = self.last_heard.max(began) + self.timeout.unwrap_or(FOREVER);
        let mut waited = false;
        loop {
            let rate = progress.rate_limit.load(Relaxed);
            let Some(wait) = self.bucket.take(Instant::now().into_std(), rate, n) else {
                return Ok(if waited {
                    self.last_heard.max(began)
                } else {
                    self.last_heard
                });
            };
            waited = true;
            if self.last_sent.elapsed() >= KEEPALIVE {
                self.last_sent = Instant::now();
                let ka = control_frame(Kind::Keepalive, header.session, header.seq);
                publish_frame(conn, &subjects.chunks, ka, deadline, cancel).await?;
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(Error::Cancelled),
                _ = tokio::time::sleep_until(deadline) => return Err(Error::Timeout(format!(
                    "the rate cap held a frame back for longer than the timeout ({}s); raise the rate or the timeout",
                    self.timeout.unwrap_or(FOREVER).as_secs_f64()
                ))),
                _ = tokio::time::sleep(wait.min(RATE_RECHECK)) => {}
            }
        }
    }
}
