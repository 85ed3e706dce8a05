//! The push engine: a stream of writes that arrive from a live producer (QEMU's mirror
//! writing into our NBD server, a migration stream), not read from a disk we can re-read.
//!
//! Frames carry each write where it belongs (the receiver runs in "writes" mode: frames
//! need not be contiguous). Since nothing can be re-read, each sealed frame is kept until
//! the receiver acknowledges it as written; the byte-counted window bounds that memory, and
//! the producer waits (its requests are not answered, its socket is not read) while the
//! window is full. A write's completion fires when its last frame is acknowledged, so the
//! producer learns of a write only once the destination has it; a barrier (an NBD FLUSH)
//! fires once everything before it is acknowledged. When the producer ends, END carries
//! the frame digest as for a disk, but no content digest: writes may overlap and come in
//! any order, so the stream has no one image to name; it reports its frame digest.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use async_nats::Message;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::checksum::{is_zero, Digest, CHECKSUM_ALGORITHM, CONTENT_ALGORITHM, DIGEST_ALGORITHM};
use crate::conn::{fit_chunk, DataConn};
use crate::error::{Error, Result};
use crate::frame::{ChunkHeader, EndSummary, Kind, HEADER_LEN, MAX_ZERO_LEN, PROTOCOL_VERSION};
use crate::handshake::OpenRequest;
use crate::link::{
    ack_request, close_and_compare, control_frame, open, read_ack, retry, send_abort, AckRequest,
    Peer, Stall, Subjects, RTO,
};
use crate::stats::{Progress, State};
use crate::window::{frame_cost, Window, MIN_FRAME_COST};

/// Told when a write (or a barrier) is acknowledged as written, or that it never will be.
pub type Done = oneshot::Sender<Result<()>>;

/// What a producer hands the engine.
pub enum Item {
    /// Payload pieces of at most one chunk each, every one with `HEADER_LEN` bytes of
    /// headroom in front (where the frame header goes), in offset order from `offset`.
    Write {
        offset: u64,
        pieces: Vec<BytesMut>,
        done: Option<Done>,
    },
    Zero {
        offset: u64,
        len: u64,
        trim: bool,
        done: Option<Done>,
    },
    /// Fires once every earlier item is acknowledged.
    Barrier { done: Done },
}

pub struct PushOptions {
    /// The range frames may address: the disk's size, or a stream's upper bound.
    pub size: u64,
    pub chunk_size: Option<u64>,
    pub window: u64,
    pub timeout: Option<Duration>,
}

/// Producers send `Ok(item)`; `Err` ends the transfer with that error; dropping the
/// sender ends it normally (END).
pub type Items = mpsc::Receiver<Result<Item>>;

pub async fn push(
    conn: &DataConn,
    mut items: Items,
    subjects: &Subjects,
    opts: &PushOptions,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<()> {
    progress.size.store(opts.size, Relaxed);
    let chunk = fit_chunk(opts.chunk_size, conn.max_payload)?;
    let mut acks = conn.client.subscribe(subjects.acks.clone()).await?;
    progress.set_state(State::Waiting);
    let request = OpenRequest {
        v: PROTOCOL_VERSION,
        size: opts.size,
        chunk_size: chunk,
        window: opts.window,
        max_payload: conn.max_payload,
        checksum: CHECKSUM_ALGORITHM.into(),
        digest: DIGEST_ALGORITHM.into(),
        content: CONTENT_ALGORITHM.into(),
        writes: true,
        // A live stream is never resumed: its key only binds the receiver to it.
        key: crate::handshake::SenderKey::new()?.anchor(),
        ..Default::default()
    };
    let stall = Stall::new(opts.timeout);
    let reply = open(
        conn,
        subjects,
        &request,
        stall,
        &progress.transfer_id,
        cancel,
    )
    .await?;
    if reply.chunk_size < chunk {
        return Err(Error::Protocol(format!(
            "the receiver takes {}-byte chunks but this stream is cut in {chunk}",
            reply.chunk_size
        )));
    }
    if reply.resume_seq != 0 {
        return Err(Error::Protocol(
            "the receiver offers to resume, but a live stream cannot".into(),
        ));
    }
    progress.chunk_size.store(chunk, Relaxed);
    progress.window.store(reply.window, Relaxed);
    progress.set_state(State::Running);
    let mut window = Window::new(opts.window);
    window.set_limit(reply.window);
    let mut p = Pusher {
        conn,
        subjects,
        progress,
        session: reply.session,
        size: opts.size,
        peer: Peer::new(window, opts.timeout),
        stored: BTreeMap::new(),
        pending: VecDeque::new(),
        waiters: VecDeque::new(),
        resends: Vec::new(),
        next_seq: 0,
        acked: 0,
        digest: Digest::default(),
        end: None,
        cancel: cancel.clone(),
    };
    let result = p.run(&mut items, &mut acks, cancel).await;
    p.fail_waiters(&result);
    if let Err(e) = &result {
        if !e.is_remote() {
            p.abort(e).await;
        }
    }
    result
}

struct Pusher<'a> {
    conn: &'a DataConn,
    subjects: &'a Subjects,
    progress: &'a Progress,
    session: u32,
    size: u64,
    peer: Peer,
    /// Sealed frames not yet acknowledged, for sending again.
    stored: BTreeMap<u64, Bytes>,
    /// Frames cut from the current item, waiting for room in the window.
    pending: VecDeque<(u64, Kind, u64, u64, Bytes)>,
    /// Completions and the frame whose acknowledgement fires them.
    waiters: VecDeque<(u64, Done)>,
    /// Frames the receiver named as missing, to send again.
    resends: Vec<u64>,
    next_seq: u64,
    /// Every frame below this is acknowledged as written.
    acked: u64,
    digest: Digest,
    end: Option<(u64, EndSummary)>,
    cancel: CancellationToken,
}

impl Pusher<'_> {
    async fn run(
        &mut self,
        items: &mut Items,
        acks: &mut async_nats::Subscriber,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let mut tick = tokio::time::interval(RTO / 4);
        let mut producer_done = false;
        loop {
            self.send_pending().await?;
            if producer_done && self.pending.is_empty() && self.end.is_none() {
                self.send_end().await?;
            }
            let room = self.pending.is_empty() && !producer_done;
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(Error::Cancelled),
                msg = acks.next() => {
                    if let Some(digest) = self.on_ack(msg)? {
                        return self.finish(digest).await;
                    }
                    for seq in std::mem::take(&mut self.resends) {
                        self.resend(seq).await?;
                    }
                }
                item = items.recv(), if room => match item {
                    Some(Ok(item)) => self.cut(item),
                    Some(Err(e)) => return Err(e),
                    None => producer_done = true,
                },
                _ = tick.tick() => self.on_tick().await?,
            }
        }
    }

    /// Cut an item into frames (sealed now: the digest follows sequence order).
    fn cut(&mut self, item: Item) {
        let done = match item {
            Item::Write {
                mut offset,
                pieces,
                done,
            } => {
                for mut buf in pieces {
                    let len = (buf.len() - HEADER_LEN) as u64;
                    if len == 0 {
                        continue;
                    }
                    if is_zero(&buf[HEADER_LEN..]) {
                        self.frame(Kind::Zero, offset, len, None);
                    } else {
                        let header = self.header(Kind::Data, offset, len);
                        let checksum = header.seal(&mut buf);
                        self.queue(Kind::Data, offset, len, buf.freeze(), checksum);
                    }
                    offset += len;
                }
                done
            }
            Item::Zero {
                mut offset,
                mut len,
                trim,
                done,
            } => {
                let kind = if trim { Kind::Trim } else { Kind::Zero };
                while len > 0 {
                    let n = len.min(MAX_ZERO_LEN);
                    self.frame(kind, offset, n, None);
                    offset += n;
                    len -= n;
                }
                done
            }
            Item::Barrier { done } => Some(done),
        };
        // It completes with the last frame cut so far: its own last frame, or for a
        // barrier (or an empty write) the last frame before it.
        if let Some(done) = done {
            if self.next_seq <= self.acked {
                let _ = done.send(Ok(()));
            } else {
                self.waiters.push_back((self.next_seq - 1, done));
            }
        }
    }

    fn header(&self, kind: Kind, offset: u64, length: u64) -> ChunkHeader {
        ChunkHeader {
            kind,
            session: self.session,
            seq: self.next_seq,
            offset,
            length,
            checksum: 0,
        }
    }

    fn frame(&mut self, kind: Kind, offset: u64, len: u64, payload: Option<&[u8]>) {
        let (bytes, checksum) = self
            .header(kind, offset, len)
            .encode(payload.unwrap_or(&[]));
        self.queue(kind, offset, len, bytes, checksum);
    }

    fn queue(&mut self, kind: Kind, offset: u64, len: u64, bytes: Bytes, checksum: u64) {
        self.digest.update(checksum);
        let counter = if kind == Kind::Data {
            &self.progress.data_bytes
        } else {
            &self.progress.zero_bytes
        };
        Progress::add(counter, len);
        Progress::add(&self.progress.frames, 1);
        self.pending
            .push_back((self.next_seq, kind, offset, len, bytes));
        self.next_seq += 1;
    }

    async fn send_pending(&mut self) -> Result<()> {
        while let Some((_, _, _, len, bytes)) = self.pending.front() {
            let cost = if bytes.len() > HEADER_LEN {
                frame_cost(*len)
            } else {
                MIN_FRAME_COST
            };
            if !self.peer.window.can_send(cost) {
                break;
            }
            let Some((seq, kind, offset, len, bytes)) = self.pending.pop_front() else {
                break;
            };
            self.peer.window.sent(seq, kind, offset, len, cost);
            self.stored.insert(seq, bytes.clone());
            self.publish(bytes).await?;
        }
        Ok(())
    }

    async fn publish(&mut self, frame: Bytes) -> Result<()> {
        let (conn, subjects, progress) = (self.conn, self.subjects, self.progress);
        (self.peer)
            .publish(conn, subjects, frame, progress, None, &self.cancel)
            .await
    }

    async fn resend(&mut self, seq: u64) -> Result<()> {
        let Some(entry) = self.peer.window.get_mut(seq) else {
            return Ok(());
        };
        if entry.last_sent.elapsed() < RTO / 4 {
            return Ok(());
        }
        retry(entry, self.progress)?;
        if let Some(bytes) = self.stored.get(&seq).cloned() {
            self.publish(bytes).await?;
        }
        Ok(())
    }

    fn on_ack(&mut self, msg: Option<Message>) -> Result<Option<[u8; 16]>> {
        let Some(ack) = read_ack(msg, self.session, self.progress)? else {
            return Ok(None);
        };
        let sent = self.next_seq - self.pending.len() as u64 + u64::from(self.end.is_some());
        if !self.peer.take(&ack, sent, self.progress) {
            return Ok(None);
        }
        if ack.next_seq > self.acked {
            self.acked = ack.next_seq;
            self.stored = self.stored.split_off(&ack.next_seq);
            while self.waiters.front().is_some_and(|(s, _)| *s < self.acked) {
                if let Some((_, done)) = self.waiters.pop_front() {
                    let _ = done.send(Ok(()));
                }
            }
        }
        match ack_request(ack, self.end.as_ref().map(|(seq, _)| *seq))? {
            AckRequest::Done(digest, _) => Ok(Some(digest)),
            AckRequest::Resend(seqs) => {
                self.resends = seqs;
                Ok(None)
            }
            AckRequest::Nothing => Ok(None),
        }
    }

    async fn on_tick(&mut self) -> Result<()> {
        self.peer.stalled()?;
        if let Some(Some(seq)) = self.peer.probe() {
            self.resend(seq).await?;
        }
        if self.peer.keepalive_due() {
            let ka = control_frame(Kind::Keepalive, self.session, self.next_seq);
            self.publish(ka).await?;
        }
        Ok(())
    }

    async fn send_end(&mut self) -> Result<()> {
        let total = self.next_seq;
        let digest = self.digest.value();
        let (frame, summary) =
            (self.peer).end(self.session, total, self.size, self.progress, digest, None);
        self.stored.insert(total, frame.clone());
        self.end = Some((total, summary));
        self.publish(frame).await
    }

    async fn finish(&mut self, digest: [u8; 16]) -> Result<()> {
        let end = self
            .end
            .as_ref()
            .map(|(seq, summary)| (*seq, summary.digest));
        close_and_compare(self.conn, self.subjects, self.session, end, digest).await
    }

    /// Completions still waiting learn the outcome (an error if the stream failed).
    fn fail_waiters(&mut self, result: &Result<()>) {
        for (_, done) in self.waiters.drain(..) {
            let _ = done.send(match result {
                Ok(()) => Ok(()),
                Err(e) => Err(Error::Endpoint(format!("the stream failed: {e}"))),
            });
        }
    }

    async fn abort(&mut self, why: &Error) {
        send_abort(self.conn, self.subjects, self.session, self.next_seq, why).await;
    }
}
