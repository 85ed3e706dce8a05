//! The data-plane NATS connection (async-nats), sized so memory is bounded by the window.

use std::time::Duration;

use async_nats::{Client, ConnectOptions, ServerAddr};

use crate::error::{Error, Result};
use crate::frame::HEADER_LEN;
use crate::window::{max_frames_in_window, MAX_WINDOW};

/// 1 MiB: measured faster than 4 MiB end to end (qemu-nbd serves requests up to about
/// 1 MiB without faulting in fresh buffers) and it keeps both sides' memory lower.
pub const DEFAULT_CHUNK: u64 = 1 << 20;
pub const MIN_CHUNK: u64 = 4096;
/// qemu-nbd serves requests of at most 32 MiB.
pub const MAX_CHUNK: u64 = 32 << 20;

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
        .connection_timeout(Duration::from_secs(5))
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

/// The largest chunk a frame can carry within `max_payload`.
pub fn chunk_room(max_payload: u64) -> u64 {
    max_payload.saturating_sub(HEADER_LEN as u64)
}

/// Pick the chunk size: the one asked for, if it fits, or the largest power of two up to
/// `DEFAULT_CHUNK` that does.
pub fn fit_chunk(requested: Option<u64>, max_payload: u64) -> Result<u64> {
    let room = chunk_room(max_payload);
    match requested {
        Some(c) => {
            if !(MIN_CHUNK..=MAX_CHUNK).contains(&c) || c % 4096 != 0 {
                return Err(Error::Usage(format!(
                    "--chunk-size {c} must be a multiple of 4096 between {MIN_CHUNK} and {MAX_CHUNK}"
                )));
            }
            if c > room {
                return Err(Error::Usage(format!(
                    "--chunk-size {c} does not fit the server's max_payload of {max_payload} bytes \
                     (each frame adds a {HEADER_LEN}-byte header); use --chunk-size {} or less, \
                     or raise max_payload in the nats-server config",
                    largest_pow2(room)
                )));
            }
            Ok(c)
        }
        None => {
            let c = largest_pow2(room.min(DEFAULT_CHUNK));
            if c < MIN_CHUNK {
                return Err(Error::Nats(format!(
                    "the server's max_payload of {max_payload} bytes is too small for block frames; raise it to at least 1 MiB"
                )));
            }
            Ok(c)
        }
    }
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
        assert_eq!(fit_chunk(None, 1 << 20).unwrap(), 512 << 10);
        assert_eq!(fit_chunk(None, 8 << 20).unwrap(), 1 << 20);
        assert!(fit_chunk(None, 1000).is_err());
    }

    #[test]
    fn explicit_chunk_is_checked() {
        assert_eq!(fit_chunk(Some(1 << 20), 8 << 20).unwrap(), 1 << 20);
        let too_big = fit_chunk(Some(1 << 20), 1 << 20).unwrap_err().to_string();
        assert!(too_big.contains("max_payload of 1048576"), "{too_big}");
        assert!(too_big.contains("--chunk-size 524288"), "{too_big}");
        assert!(fit_chunk(Some(5000), 8 << 20).is_err());
        assert!(fit_chunk(Some(64 << 20), 128 << 20).is_err());
    }

    #[test]
    fn server_lists() {
        assert_eq!(parse_servers("nats://a:1, nats://b:2").unwrap().len(), 2);
        assert!(parse_servers(" , ").is_err());
    }
}
