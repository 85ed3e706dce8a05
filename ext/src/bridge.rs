//! Producers for the push engine, on local unix sockets: an NBD server that QEMU's mirror
//! writes into, and a byte stream (QEMU's outgoing migration). Each serves exactly one
//! client and removes its socket once that client is connected.
//!
//! The NBD server speaks the fixed-newstyle handshake (`NBD_OPT_GO`, `NBD_OPT_INFO`,
//! `NBD_OPT_EXPORT_NAME`, `NBD_OPT_LIST`, `NBD_OPT_ABORT`; everything else is answered
//! "unsupported", so clients fall back to simple replies) and serves WRITE, WRITE_ZEROES,
//! TRIM, FLUSH and DISC. A write is answered only when the destination acknowledged it as
//! written, and FLUSH once everything before it is: a client that sees its write complete
//! knows the destination has it. READ is refused (EINVAL): the destination is written, not
//! read, and nothing here could answer for it.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, IoContext, Result};
use crate::frame::HEADER_LEN;
use crate::io::stdio::OnConnect;
use crate::push::Item;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
const REP_ERR_INVALID: u32 = (1 << 31) | 3;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags: HAS_FLAGS, SEND_FLUSH, SEND_TRIM, SEND_WRITE_ZEROES.
const TRANSMISSION_FLAGS: u16 = 1 | 4 | 32 | 64;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;

const EIO: u32 = 5;
const EINVAL: u32 = 22;

/// The largest request we accept (advertised as the maximum block size).
pub const MAX_REQUEST: u32 = 32 << 20;
/// Option payloads larger than this are not from a real client.
const MAX_OPTION: u32 = 64 << 10;

pub type ItemSender = mpsc::Sender<Result<Item>>;

/// Bind a unix socket for one client (the caller passes it to `serve_*`).
pub fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener> {
    let listener = std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| Error::Endpoint(format!("cannot listen on {}: {e}", path.display())))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::Endpoint(format!("{}: {e}", path.display())))?;
    Ok(listener)
}

/// Wait for the one client, then remove the socket so no other can come.
async fn accept_one(
    listener: std::os::unix::net::UnixListener,
    path: &Path,
    cancel: &CancellationToken,
) -> Result<UnixStream> {
    let listener = UnixListener::from_std(listener)
        .map_err(|e| Error::Endpoint(format!("{}: {e}", path.display())))?;
    let accepted = tokio::select! {
        _ = cancel.cancelled() => Err(Error::Cancelled),
        r = listener.accept() => r.map_err(|e| Error::Endpoint(format!("accepting on {}: {e}", path.display()))),
    };
    let _ = std::fs::remove_file(path);
    Ok(accepted?.0)
}

/// Serve one NBD client of an export of `size` bytes, cutting its writes into `chunk`s.
pub async fn serve_nbd(
    listener: std::os::unix::net::UnixListener,
    path: PathBuf,
    size: u64,
    chunk: u64,
    items: ItemSender,
    cancel: CancellationToken,
) {
    let result = async {
        let stream = accept_one(listener, &path, &cancel).await?;
        let (mut rd, mut wr) = stream.into_split();
        if !handshake(&mut rd, &mut wr, size).await? {
            return Ok(()); // the client only listed exports, or gave up
        }
        transmission(rd, wr, size, chunk, &items, &cancel).await
    }
    .await;
    if let Err(e) = result {
        let _ = items.send(Err(e)).await;
    }
}

async fn read_u32(rd: &mut (impl AsyncReadExt + Unpin)) -> Result<u32> {
    rd.read_u32().await.endpoint("NBD client")
}

/// The option haggling; true once the client entered transmission.
async fn handshake(
    rd: &mut (impl AsyncReadExt + Unpin),
    wr: &mut OwnedWriteHalf,
    size: u64,
) -> Result<bool> {
    let mut hello = BytesMut::with_capacity(18);
    hello.put_u64(NBDMAGIC);
    hello.put_u64(IHAVEOPT);
    hello.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    wr.write_all(&hello).await.endpoint("NBD client")?;
    let client_flags = read_u32(rd).await?;
    if client_flags & u32::from(FLAG_FIXED_NEWSTYLE) == 0 {
        return Err(Error::Protocol(
            "the NBD client does not speak fixed newstyle".into(),
        ));
    }
    let no_zeroes = client_flags & u32::from(FLAG_NO_ZEROES) != 0;
    loop {
        let magic = rd.read_u64().await.endpoint("NBD client")?;
        if magic != IHAVEOPT {
            return Err(Error::Protocol(format!("bad NBD option magic {magic:#x}")));
        }
        let opt = read_u32(rd).await?;
        let len = read_u32(rd).await?;
        if len > MAX_OPTION {
            return Err(Error::Protocol(format!("NBD option of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        rd.read_exact(&mut data).await.endpoint("NBD client")?;
        match opt {
            OPT_EXPORT_NAME => {
                let mut out = BytesMut::with_capacity(10 + 124);
                out.put_u64(size);
                out.put_u16(TRANSMISSION_FLAGS);
                if !no_zeroes {
                    out.put_bytes(0, 124);
                }
                wr.write_all(&out).await.endpoint("NBD client")?;
                return Ok(true);
            }
            OPT_GO | OPT_INFO => {
                if !valid_info_request(&data) {
                    option_reply(wr, opt, REP_ERR_INVALID, &[]).await?;
                    continue;
                }
                let mut export = BytesMut::with_capacity(12);
                export.put_u16(INFO_EXPORT);
                export.put_u64(size);
                export.put_u16(TRANSMISSION_FLAGS);
                option_reply(wr, opt, REP_INFO, &export).await?;
                let mut block = BytesMut::with_capacity(14);
                block.put_u16(INFO_BLOCK_SIZE);
                block.put_u32(1);
                block.put_u32(4096);
                block.put_u32(MAX_REQUEST);
                option_reply(wr, opt, REP_INFO, &block).await?;
                option_reply(wr, opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    return Ok(true);
                }
            }
            OPT_LIST => {
                option_reply(wr, opt, REP_SERVER, &0u32.to_be_bytes()).await?;
                option_reply(wr, opt, REP_ACK, &[]).await?;
            }
            OPT_ABORT => {
                let _ = option_reply(wr, opt, REP_ACK, &[]).await;
                return Ok(false);
            }
            _ => option_reply(wr, opt, REP_ERR_UNSUP, &[]).await?,
        }
    }
}

/// `NBD_OPT_GO`/`INFO` data: name length, name, count of info requests, the requests.
fn valid_info_request(data: &[u8]) -> bool {
    let Some(name_len) = data
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    else {
        return false;
    };
    let rest = 4 + name_len as usize;
    match data.get(rest..rest + 2) {
        Some(n) => data.len() == rest + 2 + 2 * usize::from(u16::from_be_bytes([n[0], n[1]])),
        None => false,
    }
}

async fn option_reply(wr: &mut OwnedWriteHalf, opt: u32, kind: u32, data: &[u8]) -> Result<()> {
    let mut out = BytesMut::with_capacity(20 + data.len());
    out.put_u64(OPT_REPLY_MAGIC);
    out.put_u32(opt);
    out.put_u32(kind);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
    wr.write_all(&out).await.endpoint("NBD client")
}

fn simple_reply(cookie: u64, error: u32) -> Bytes {
    let mut out = BytesMut::with_capacity(16);
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
    out.freeze()
}

/// Requests until DISC or the client hangs up; replies go through one writer task, in
/// whatever order the destination acknowledges them.
async fn transmission(
    mut rd: impl AsyncReadExt + Unpin,
    mut wr: OwnedWriteHalf,
    size: u64,
    chunk: u64,
    items: &ItemSender,
    cancel: &CancellationToken,
) -> Result<()> {
    let (replies, mut outbox) = mpsc::channel::<Bytes>(64);
    let writer = tokio::spawn(async move {
        while let Some(reply) = outbox.recv().await {
            if wr.write_all(&reply).await.is_err() {
                break;
            }
        }
    });
    let answer = |cookie: u64, done: oneshot::Receiver<Result<()>>| {
        let replies = replies.clone();
        tokio::spawn(async move {
            let error = match done.await {
                Ok(Ok(())) => 0,
                _ => EIO,
            };
            let _ = replies.send(simple_reply(cookie, error)).await;
        });
    };
    loop {
        let mut head = [0u8; 28];
        let read = tokio::select! {
            _ = cancel.cancelled() => return Err(Error::Cancelled),
            r = rd.read_exact(&mut head) => r,
        };
        match read {
            Ok(_) => {}
            // The client hung up without DISC: its writes so far still count.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(Error::Endpoint(format!("NBD client: {e}"))),
        }
        let field = |at: usize, n: usize| {
            head[at..at + n]
                .iter()
                .fold(0u64, |v, b| v << 8 | u64::from(*b))
        };
        let (magic, kind, cookie) = (field(0, 4) as u32, field(6, 2) as u16, field(8, 8));
        let (offset, length) = (field(16, 8), field(24, 4));
        if magic != REQUEST_MAGIC {
            return Err(Error::Protocol(format!("bad NBD request magic {magic:#x}")));
        }
        let in_bounds = offset.checked_add(length).is_some_and(|end| end <= size);
        match kind {
            CMD_WRITE => {
                if length > u64::from(MAX_REQUEST) {
                    return Err(Error::Protocol(format!("NBD write of {length} bytes")));
                }
                let pieces = read_pieces(&mut rd, length, chunk).await?;
                if !in_bounds {
                    replies.send(simple_reply(cookie, EINVAL)).await.ok();
                    continue;
                }
                let (done, wait) = oneshot::channel();
                let item = Item::Write {
                    offset,
                    pieces,
                    done: Some(done),
                };
                if items.send(Ok(item)).await.is_err() {
                    break;
                }
                answer(cookie, wait);
            }
            CMD_WRITE_ZEROES | CMD_TRIM => {
                if !in_bounds {
                    replies.send(simple_reply(cookie, EINVAL)).await.ok();
                    continue;
                }
                let (done, wait) = oneshot::channel();
                let trim = kind == CMD_TRIM;
                let item = Item::Zero {
                    offset,
                    len: length,
                    trim,
                    done: Some(done),
                };
                if items.send(Ok(item)).await.is_err() {
                    break;
                }
                answer(cookie, wait);
            }
            CMD_FLUSH => {
                let (done, wait) = oneshot::channel();
                if items.send(Ok(Item::Barrier { done })).await.is_err() {
                    break;
                }
                answer(cookie, wait);
            }
            CMD_DISC => break,
            CMD_READ => {
                replies.send(simple_reply(cookie, EINVAL)).await.ok();
            }
            _ => {
                replies.send(simple_reply(cookie, EINVAL)).await.ok();
            }
        }
    }
    drop(replies);
    let _ = writer.await;
    Ok(())
}

/// A write's payload, straight from the socket into frame buffers of one chunk each.
async fn read_pieces(
    rd: &mut (impl AsyncReadExt + Unpin),
    length: u64,
    chunk: u64,
) -> Result<Vec<BytesMut>> {
    let mut pieces = Vec::with_capacity(length.div_ceil(chunk.max(1)) as usize);
    let mut left = length;
    while left > 0 {
        let n = left.min(chunk) as usize;
        // Only the header's room is zeroed; the payload is read into the spare capacity,
        // and never past this write's end (the next request follows on the socket).
        let mut buf = BytesMut::with_capacity(HEADER_LEN + n);
        buf.resize(HEADER_LEN, 0);
        let mut payload = (&mut *rd).take(n as u64);
        while buf.len() < HEADER_LEN + n {
            if payload.read_buf(&mut buf).await.endpoint("NBD client")? == 0 {
                return Err(Error::Endpoint(
                    "NBD client: the write's data ended early".into(),
                ));
            }
        }
        pieces.push(buf);
        left -= n as u64;
    }
    Ok(pieces)
}

/// Relay one client's byte stream: each read becomes a write at the stream position.
/// `on_accept` gets a second descriptor of the connection, to write what comes back.
pub async fn serve_stream(
    listener: std::os::unix::net::UnixListener,
    path: PathBuf,
    chunk: u64,
    items: ItemSender,
    cancel: CancellationToken,
    on_accept: Option<OnConnect>,
) {
    let result = async {
        let mut stream = accept_one(listener, &path, &cancel).await?;
        if let Some(hand_over) = on_accept {
            let std = stream.into_std().endpoint("stream client")?;
            hand_over(OwnedFd::from(std.try_clone().endpoint("stream client")?));
            stream = UnixStream::from_std(std).endpoint("stream client")?;
        }
        let mut pos = 0u64;
        loop {
            let mut buf = BytesMut::with_capacity(HEADER_LEN + chunk as usize);
            buf.resize(HEADER_LEN, 0);
            let n = tokio::select! {
                _ = cancel.cancelled() => return Err(Error::Cancelled),
                r = stream.read_buf(&mut buf) => r.endpoint("stream client")?,
            };
            if n == 0 {
                return Ok(());
            }
            let item = Item::Write {
                offset: pos,
                pieces: vec![buf],
                done: None,
            };
            pos += n as u64;
            if items.send(Ok(item)).await.is_err() {
                return Ok(());
            }
        }
    }
    .await;
    if let Err(e) = result {
        let _ = items.send(Err(e)).await;
    }
}

/// Bytes per read of a return stream (a migration's return path carries little).
const RETURN_PIECE: usize = 64 << 10;

/// Relay what the other end of a connection writes back (a migration's return path): a
/// thread reads the descriptor and hands each read to the push engine; the end of the
/// connection ends the stream.
pub fn relay_back(fd: OwnedFd, items: ItemSender) {
    std::thread::spawn(move || {
        let mut pos = 0u64;
        let mut read = vec![0u8; RETURN_PIECE];
        loop {
            let n = match rustix::io::read(&fd, &mut read) {
                Ok(0) => return,
                Ok(n) => n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    let err = Error::Endpoint(format!("reading the return stream: {e}"));
                    let _ = items.blocking_send(Err(err));
                    return;
                }
            };
            // A frame buffer the size of what came (the return path carries little).
            let mut buf = BytesMut::with_capacity(HEADER_LEN + n);
            buf.resize(HEADER_LEN, 0);
            buf.extend_from_slice(&read[..n]);
            let item = Item::Write {
                offset: pos,
                pieces: vec![buf],
                done: None,
            };
            if items.blocking_send(Ok(item)).is_err() {
                return;
            }
            pos += n as u64;
        }
    });
}
