//! The data-plane NATS connection (async-nats), sized so memory is bounded by the window.

use std::time::Duration;

use async_nats::{Client, ConnectOptions, ServerAddr, Subject};
use bytes::Bytes;

use crate::error::{Error, Result};
use crate::frame::HEADER_LEN;
use crate::window::{max_frames_in_window, MAX_WINDOW};

/// 1 MiB less 4 KiB. About 1 MiB is measured faster than 4 MiB end to end (qemu-nbd serves
/// requests up to about 1 MiB without faulting in fresh buffers) and keeps both sides'
/// memory lower. Not 1 MiB itself: async-nats reads each message into a buffer that grows
/// by doubling from `READ_BUFFER` bytes, and two frames of a power-of-two chunk (with their
/// header and the MSG line) need just over such a doubled size, so every other frame the
/// receiver copied its partial message into a fresh, larger allocation. At 2^k - 4 KiB two
/// frames fit: the receiver's CPU per GiB fell by a quarter and its peak RSS from 160 to
/// 95 MiB (bench/README.md). It also fits nats-server's default `max_payload` of 1 MiB.
pub const DEFAULT_CHUNK: u64 = (1 << 20) - 4096;
/// async-nats's read buffer starts this large (its default, pinned here because the chunk
/// sizes above are chosen against its growth).
const READ_BUFFER: u16 = 65535;
pub const MIN_CHUNK: u64 = 4096;
/// qemu-nbd serves requests of at most 32 MiB.
pub const MAX_CHUNK: u64 = 32 << 20;

/// How often the client pings its server. Two unanswered pings mark the connection dead
/// and async-nats reconnects (to another server of the list, if there is one): a server
/// that went silent (a blackholed link, a frozen host) is noticed in 10 to 15 s, where TCP
/// alone keeps backing off its retransmissions for minutes.
pub const PING_INTERVAL: Duration = Duration::from_secs(5);
/// Longest pause between reconnect attempts, so a path that comes back is used at once.
const RECONNECT_MAX: Duration = Duration::from_secs(1);
/// Bound on a flush or publish that only tidies up (after a failure, at close): a server
/// that is gone must not hold the process.
pub const TIDY_BOUND: Duration = Duration::from_secs(2);

pub struct DataConn {
    pub client: Client,
    pub servers: String,
    pub max_payload: u64,
}

/// Parse a comma-separated server list as the nats tools take it.
pub fn parse_servers(servers: &str) -> Result<Vec<ServerAddr>> {
    let addrs: Vec<ServerAddr> = servers
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<ServerAddr>()
                .map_err(|e| Error::Usage(format!("invalid NATS server URL '{s}': {e}")))
        })
        .collect::<Result<_>>()?;
    if addrs.is_empty() {
        return Err(Error::Usage(
            "no NATS server given; pass --data-url nats://HOST:PORT".into(),
        ));
    }
    Ok(addrs)
}

pub async fn connect(servers: &str, name: &str) -> Result<DataConn> {
    let addrs = parse_servers(servers)?;
    // async-nats queues count messages, not bytes. The window bounds how many frames can
    // be outstanding, so these capacities never fill, and their memory is that window.
    let queue = max_frames_in_window(MAX_WINDOW) + 256;
    let client = ConnectOptions::new()
        .name(name)
        .client_capacity(queue)
        .subscription_capacity(queue)
        .read_buffer_capacity(READ_BUFFER)
        .connection_timeout(Duration::from_secs(5))
        .ping_interval(PING_INTERVAL)
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis(100 * attempts.min(10) as u64).min(RECONNECT_MAX)
        })
        .connect(addrs)
        .await
        .map_err(|e| {
            Error::Nats(format!(
                "cannot connect to NATS at {servers}: {e}; check --data-url and that nats-server is running"
            ))
        })?;
    let max_payload = client.server_info().max_payload as u64;
    Ok(DataConn {
        client,
        servers: servers.to_string(),
        max_payload,
    })
}

impl DataConn {
    /// Publish, waiting at most `bound` for room in the client's queue (it fills while the
    /// connection is down). `Ok(false)`: not queued in time.
    pub async fn publish_within(
        &self,
        subject: &Subject,
        payload: Bytes,
        bound: Duration,
    ) -> Result<bool> {
        match tokio::time::timeout(bound, self.client.publish(subject.clone(), payload)).await {
            Ok(Ok(())) => Ok(true),
            Ok(Err(e)) => Err(Error::Nats(format!("NATS: {e}"))),
            Err(_) => Ok(false),
        }
    }

    /// Publish and flush something that only tidies up (an abort, a last ack): best effort,
    /// bounded by `TIDY_BOUND`.
    pub async fn tidy(&self, subject: &Subject, payload: Bytes) {
        if let Ok(true) = self.publish_within(subject, payload, TIDY_BOUND).await {
            self.flush_within(TIDY_BOUND).await;
        }
    }

    /// Flush, waiting at most `bound`; whether it completed.
    pub async fn flush_within(&self, bound: Duration) -> bool {
        matches!(
            tokio::time::timeout(bound, self.client.flush()).await,
            Ok(Ok(()))
        )
    }
}

/// The largest chunk a frame can carry within `max_payload`.
pub fn chunk_room(max_payload: u64) -> u64 {
    max_payload.saturating_sub(HEADER_LEN as u64)
}

/// Pick the chunk size: the one asked for, if it fits, or the largest `2^k - 4 KiB` up to
/// `DEFAULT_CHUNK` that does (see `DEFAULT_CHUNK` for why not a power of two).
pub fn fit_chunk(requested: Option<u64>, max_payload: u64) -> Result<u64> {
    let room = chunk_room(max_payload);
    match requested {
        Some(c) => {
            if !(MIN_CHUNK..=MAX_CHUNK).contains(&c) || c % 4096 != 0 {
                return Err(Error::Usage(format!(
                    "--chunk-size {c} must be a multiple of 4096 between {MIN_CHUNK} and {MAX_CHUNK}"
                )));
            }
            let fits = room & !4095; // the largest multiple of 4096 that fits
            if c <= room {
                Ok(c)
            } else if fits < MIN_CHUNK {
                Err(too_small(max_payload))
            } else {
                Err(Error::Usage(format!(
                    "--chunk-size {c} does not fit the server's max_payload of {max_payload} bytes \
                     (each frame adds a {HEADER_LEN}-byte header); use --chunk-size {fits} or less, \
                     or raise max_payload in the nats-server config"
                )))
            }
        }
        None => {
            let c = largest_pow2(room.min(DEFAULT_CHUNK) + 4096) - 4096;
            if c < MIN_CHUNK {
                return Err(too_small(max_payload));
            }
            Ok(c)
        }
    }
}

fn too_small(max_payload: u64) -> Error {
    Error::Nats(format!(
        "the server's max_payload of {max_payload} bytes is too small for block frames; raise it to at least 1 MiB"
    ))
}

fn largest_pow2(n: u64) -> u64 {
    if n == 0 {
        0
    } else {
        1 << (63 - n.leading_zeros())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_chunk_fits_the_server() {
        assert_eq!(fit_chunk(None, 8 << 20).unwrap(), DEFAULT_CHUNK);
        assert_eq!(fit_chunk(None, 1 << 20).unwrap(), DEFAULT_CHUNK);
        assert_eq!(fit_chunk(None, 512 << 10).unwrap(), (512 << 10) - 4096);
        assert_eq!(fit_chunk(None, (1 << 20) - 100).unwrap(), DEFAULT_CHUNK);
        let just_short = DEFAULT_CHUNK + HEADER_LEN as u64 - 1;
        assert_eq!(fit_chunk(None, just_short).unwrap(), (512 << 10) - 4096);
        assert_eq!(fit_chunk(None, 8192 + 40).unwrap(), 4096);
        assert!(fit_chunk(None, 1000).is_err());
    }

    #[test]
    fn explicit_chunk_is_checked() {
        assert_eq!(fit_chunk(Some(1 << 20), 8 << 20).unwrap(), 1 << 20);
        let too_big = fit_chunk(Some(1 << 20), 1 << 20).unwrap_err().to_string();
        assert!(too_big.contains("max_payload of 1048576"), "{too_big}");
        assert!(too_big.contains("--chunk-size 1044480"), "{too_big}");
        assert!(fit_chunk(Some(5000), 8 << 20).is_err());
        let tiny = fit_chunk(Some(8192), 1000).unwrap_err().to_string();
        assert!(tiny.contains("too small"), "{tiny}");
        assert!(fit_chunk(Some(64 << 20), 128 << 20).is_err());
    }

    #[test]
    fn server_lists() {
        assert_eq!(parse_servers("nats://a:1, nats://b:2").unwrap().len(), 2);
        assert!(parse_servers(" , ").is_err());
    }
}
