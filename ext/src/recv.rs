//! The receiving engine: answer the open handshake, verify and write frames in order,
//! acknowledge what is written, and on END flush, optionally verify, and report DONE.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use async_nats::Message;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::checksum::{digest_hex, is_zero, Digest, CHECKSUM_ALGORITHM, DIGEST_ALGORITHM};
use crate::conn::{chunk_room, DataConn, MAX_CHUNK, MIN_CHUNK};
use crate::error::{Error, Result};
use crate::frame::{
    Ack, AckBody, AckKind, ChunkHeader, EndSummary, Kind, HEADER_LEN, MAX_ZERO_LEN,
    PROTOCOL_VERSION,
};
use crate::handshake::{decode, encode, OpenReply, OpenRequest};
use crate::io::Sink;
use crate::send::{Stall, Subjects};
use crate::stats::{Progress, State};
use crate::window::{frame_cost, MAX_WINDOW, MIN_FRAME_COST};

/// Writes in flight to the target; NBD pipelines them on its connection.
const WRITE_DEPTH: usize = 16;
/// Longest gap between acks while the receiver flushes or verifies.
const KEEPALIVE: Duration = Duration::from_secs(2);

pub struct RecvOptions {
    pub window: u64,
    pub timeout: Option<Duration>,
    pub verify: bool,
    /// The target is known to read as zeros: zero frames need not be written.
    pub target_is_zero: bool,
}

/// What the receiver remembers of a frame to verify the target afterwards.
struct Record {
    header: ChunkHeader,
}

struct Receiver<'a> {
    conn: &'a DataConn,
    subjects: &'a Subjects,
    session: u32,
    window: u64,
    /// Frames whose writes completed, in order.
    written_frames: u64,
    written_bytes: u64,
    unacked_cost: u64,
}

impl Receiver<'_> {
    async fn send_ack(&self, kind: AckKind, next_seq: u64, body: AckBody) {
        let ack = Ack {
            kind,
            session: self.session,
            next_seq,
            written: self.written_bytes,
            window: self.window,
            body,
        };
        let _ = self
            .conn
            .client
            .publish(self.subjects.acks.clone(), ack.encode())
            .await;
    }

    async fn progress_ack(&mut self) {
        self.unacked_cost = 0;
        self.send_ack(AckKind::Ack, self.written_frames, AckBody::None)
            .await;
    }

    /// Report a failure to the sender (so it stops at once) and return it.
    async fn fail(&self, err: Error) -> Error {
        let body = AckBody::Error {
            code: err.code().to_string(),
            message: err.to_string(),
        };
        self.send_ack(AckKind::Error, self.written_frames, body)
            .await;
        let _ = self.conn.client.flush().await;
        err
    }

    /// Run `work`, sending keepalive acks meanwhile so the sender does not time out.
    async fn keepalive<T>(&self, work: BoxFuture<'_, Result<T>>) -> Result<T> {
        let mut work = work;
        loop {
            tokio::select! {
                r = &mut work => return r,
                _ = tokio::time::sleep(KEEPALIVE) => {
                    self.send_ack(AckKind::Ack, self.written_frames, AckBody::None).await;
                }
            }
        }
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
    let id = &progress.transfer_id;
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

    let session = loop {
        let s = getrandom::u32().map_err(|e| Error::Endpoint(format!("no randomness: {e}")))?;
        if s != 0 {
            break s;
        }
    };
    let (request, chunk, window) =
        accept(conn, &sink, &mut opens, opts, session, id, cancel).await?;
    let size = request.size;
    let verify = opts.verify || request.verify;
    progress.size.store(size, Relaxed);
    progress.chunk_size.store(chunk, Relaxed);
    progress.window.store(window, Relaxed);
    progress.set_state(State::Running);

    let mut rx = Receiver {
        conn,
        subjects,
        session,
        window,
        written_frames: 0,
        written_bytes: 0,
        unacked_cost: 0,
    };
    let skip_zeros = opts.target_is_zero && !sink.caps().sequential;
    let mut writes: FuturesOrdered<BoxFuture<'static, Result<(u64, u64)>>> = FuturesOrdered::new();
    let mut records: Vec<Record> = Vec::new();
    let mut digest = Digest::default();
    let mut expected_seq = 0u64;
    let mut expected_offset = 0u64;
    let mut end: Option<EndSummary> = None;
    let mut stall = Stall::new(opts.timeout);
    let mut seen_own_session = false;

    loop {
        if end.is_some() && writes.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(rx.fail(Error::Cancelled).await),
            Some(done) = writes.next() => {
                let (cost, covered) = match done {
                    Ok(v) => v,
                    Err(e) => return Err(rx.fail(e).await),
                };
                rx.written_frames += 1;
                rx.written_bytes += covered;
                rx.unacked_cost += cost;
                Progress::add(&progress.done_bytes, covered);
                if rx.unacked_cost >= window / 4 || writes.is_empty() {
                    rx.progress_ack().await;
                }
            }
            msg = chunks.next(), if end.is_none() && writes.len() < WRITE_DEPTH => {
                let msg = msg.ok_or_else(|| Error::Nats("the chunk subscription ended".into()))?;
                let payload = msg.payload;
                let (header, body) = match ChunkHeader::decode(&payload) {
                    Ok(v) => v,
                    Err(_) => {
                        Progress::add(&progress.bad_frames, 1);
                        continue;
                    }
                };
                if header.session != session {
                    if !seen_own_session && header.kind != Kind::Abort {
                        return Err(Error::Busy(format!(
                            "another receiver took transfer {id}; only one receiver may serve an id"
                        )));
                    }
                    Progress::add(&progress.bad_frames, 1);
                    continue;
                }
                seen_own_session = true;
                stall.reset();
                if header.kind == Kind::Abort {
                    let why = String::from_utf8_lossy(body);
                    return Err(Error::Remote { code: "aborted".into(), message: format!("the sender gave up: {why}") });
                }
                if header.seq < expected_seq {
                    Progress::add(&progress.duplicate_frames, 1);
                    continue;
                }
                if header.seq > expected_seq {
                    let err = Error::Protocol(format!(
                        "frame {expected_seq} (offset {expected_offset}) was lost in transit; frame {} came next",
                        header.seq
                    ));
                    return Err(rx.fail(err).await);
                }
                if let Err(e) = check_frame(&header, expected_offset, size, chunk) {
                    return Err(rx.fail(e).await);
                }
                expected_seq += 1;
                if header.kind == Kind::End {
                    match EndSummary::decode(body) {
                        Ok(s) => end = Some(s),
                        Err(e) => return Err(rx.fail(Error::Protocol(format!("END frame: {e}"))).await),
                    }
                    continue;
                }
                expected_offset += header.length;
                digest.update(header.checksum);
                Progress::add(&progress.frames, 1);
                let len = header.length;
                let write = match header.kind {
                    Kind::Data => {
                        Progress::add(&progress.data_bytes, len);
                        sink.write(header.offset, payload.slice(HEADER_LEN..))
                    }
                    Kind::Zero if skip_zeros => {
                        Progress::add(&progress.zero_bytes, len);
                        futures::future::ready(Ok(())).boxed()
                    }
                    _ => {
                        Progress::add(&progress.zero_bytes, len);
                        sink.zero(header.offset, len, header.kind == Kind::Trim)
                    }
                };
                let cost = if header.kind == Kind::Data { frame_cost(len) } else { MIN_FRAME_COST };
                writes.push_back(write.map(move |r| r.map(|()| (cost, len))).boxed());
                if verify {
                    records.push(Record { header });
                }
            }
            msg = opens.next() => {
                if let Some(msg) = msg {
                    refuse(conn, msg, &Error::Busy(format!("transfer {id} is already in progress"))).await;
                }
            }
            _ = stall.expired() => {
                let err = Error::Timeout(format!(
                    "the sender went quiet for {} at offset {expected_offset} of {size}",
                    stall.describe()
                ));
                return Err(rx.fail(err).await);
            }
        }
    }

    // Every write is complete; make them durable, then check the whole transfer.
    let summary = end.ok_or_else(|| Error::Protocol("transfer ended without END".into()))?;
    progress.set_state(State::Finishing);
    rx.progress_ack().await;
    if let Err(e) = rx.keepalive(sink.flush()).await {
        return Err(rx.fail(e).await);
    }
    let ours = digest.value();
    if ours != summary.digest || summary.frames != expected_seq - 1 {
        let err = Error::Integrity(format!(
            "digest mismatch: the sender sent {} over {} frames but {} arrived as {}",
            digest_hex(&summary.digest),
            summary.frames,
            expected_seq - 1,
            digest_hex(&ours)
        ));
        return Err(rx.fail(err).await);
    }
    if verify {
        if let Err(e) = rx
            .keepalive(verify_target(sink.clone(), records, chunk).boxed())
            .await
        {
            return Err(rx.fail(e).await);
        }
        progress.verified.store(true, Relaxed);
    }
    progress.set_digest(digest_hex(&ours));
    rx.send_ack(
        AckKind::Done,
        expected_seq,
        AckBody::Done {
            digest: ours,
            verified: verify,
        },
    )
    .await;
    conn.client
        .flush()
        .await
        .map_err(|e| Error::Nats(format!("NATS: {e}")))?;
    Ok(())
}

/// Validate a frame of our session against the disk and the negotiated limits.
fn check_frame(h: &ChunkHeader, expected_offset: u64, size: u64, chunk: u64) -> Result<()> {
    let bad = |why: String| {
        Err(Error::Protocol(format!(
            "frame {} at offset {}: {why}",
            h.seq, h.offset
        )))
    };
    if h.offset != expected_offset {
        return bad(format!("expected offset {expected_offset}"));
    }
    match h.kind {
        Kind::End => {
            if h.offset != size {
                return bad(format!("END before the end of the {size}-byte disk"));
            }
            return Ok(());
        }
        Kind::Data if h.length == 0 || h.length > chunk => {
            return bad(format!("data length {} outside 1..={chunk}", h.length))
        }
        Kind::Zero | Kind::Trim if h.length == 0 || h.length > MAX_ZERO_LEN => {
            return bad(format!(
                "zero length {} outside 1..={MAX_ZERO_LEN}",
                h.length
            ))
        }
        _ => {}
    }
    match h.offset.checked_add(h.length) {
        Some(e) if e <= size => Ok(()),
        _ => bad(format!(
            "length {} runs past the end of the {size}-byte disk",
            h.length
        )),
    }
}

/// Answer the open handshake: wait for the sender's request, check it, prepare the target.
async fn accept(
    conn: &DataConn,
    sink: &Arc<dyn Sink>,
    opens: &mut async_nats::Subscriber,
    opts: &RecvOptions,
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
        match negotiate(&request, conn.max_payload, opts, sink).await {
            Ok((chunk, window)) => {
                let reply = OpenReply {
                    v: PROTOCOL_VERSION,
                    ok: true,
                    session,
                    chunk_size: chunk,
                    window,
                    max_payload: conn.max_payload,
                    target: sink.caps(),
                    target_size: sink.size(),
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
    let room = chunk_room(max_payload);
    let chunk = req.chunk_size.min(room & !4095);
    if chunk < MIN_CHUNK {
        return Err(Error::Nats(format!(
            "the receiver's server max_payload of {max_payload} bytes is too small"
        )));
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
