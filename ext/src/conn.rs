//! The data-plane NATS connection (async-nats), sized so memory is bounded by the window.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::{Client, ConnectOptions, ServerAddr, Subject};
use bytes::Bytes;

use crate::error::{Error, Result};
use crate::frame::HEADER_LEN;
use crate::window::{max_frames_in_window, MAX_WINDOW};

/// 1 MiB less 4 KiB. About 1 MiB rather than 4 MiB: qemu-nbd serves requests up to about
/// 1 MiB without faulting in fresh buffers, and both sides keep less memory. Not 1 MiB
/// itself: async-nats reads each message into a buffer that grows by doubling from
/// `READ_BUFFER` bytes, and two frames of a power-of-two chunk (with their header and the
/// MSG line) need just over such a doubled size, so every other frame the receiver copied
/// its partial message into a fresh, larger allocation. At 2^k - 4 KiB two frames fit
/// (bench/README.md, "Chunk sizes"). It also fits nats-server's default `max_payload` of
/// 1 MiB.
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
/// How long a peer may stay silent (not show up, not answer) before a transfer fails, in
/// seconds; every timeout option of the CLI, the Python API and the ctl plane defaults to it.
pub const DEFAULT_TIMEOUT_S: f64 = 60.0;

pub struct DataConn {
    pub client: Client,
    /// The servers this connection was given, passwords and tokens masked.
    pub servers: String,
    pub max_payload: u64,
    /// How to dial the same servers again (`sibling`); holds credentials, never shown.
    redial: Redial,
}

#[derive(Clone)]
struct Redial {
    servers: String,
    name: String,
    login: Login,
}

/// How the data connection logs in besides credentials in its URLs: a `.creds` file
/// (JWT and seed) or a file holding an NKey seed, as the nats tools take them; and its TLS
/// files: a client certificate and its key (for servers that verify clients), and the CA
/// that server certificates are verified with (instead of the system's). The files are
/// read by this process only.
#[derive(Debug, Default, Clone)]
pub struct Login {
    pub creds: Option<PathBuf>,
    pub nkey: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
}

/// Credentials carried by a server URL (`user:password@` or `token@`), percent-decoded.
#[derive(Debug, PartialEq, Eq)]
enum UrlAuth {
    UserPassword(String, String),
    Token(String),
}

/// The credentials of the first server in `addrs` that carries any (applied to every
/// server of the list, as nats-py applies its options), and the list without them, so
/// no error or log of the client can show them.
fn take_url_auth(addrs: Vec<ServerAddr>) -> Result<(Option<UrlAuth>, Vec<ServerAddr>)> {
    let mut auth = None;
    let mut bare = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let mut url = addr.into_inner();
        if auth.is_none() && !url.username().is_empty() {
            let user = percent_decode(url.username())?;
            auth = Some(match url.password() {
                Some(pass) => UrlAuth::UserPassword(user, percent_decode(pass)?),
                None => UrlAuth::Token(user),
            });
        }
        // Setting these cannot fail on a nats:// or tls:// URL, which has a host.
        let _ = url.set_username("");
        let _ = url.set_password(None);
        let stripped = redact_servers(url.as_str());
        bare.push(
            ServerAddr::from_url(url)
                .map_err(|e| Error::Usage(format!("invalid NATS server URL '{stripped}': {e}")))?,
        );
    }
    Ok((auth, bare))
}

/// `%XX` escapes of a URL's user or password to the bytes they stand for (UTF-8).
fn percent_decode(s: &str) -> Result<String> {
    let bad = || {
        Error::Usage(
            "the credentials in a NATS server URL are not valid percent-encoded UTF-8".into(),
        )
    };
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or_else(bad)?;
            let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// `servers` (a comma-separated list, parseable or not, or text holding URLs) with the
/// password or token of every userinfo replaced by `***`; users and hosts are kept. The
/// Python side's `nbdnats.planes.redact_url` does the same (tests/redact_cases.txt holds
/// their cases).
pub fn redact_servers(servers: &str) -> String {
    servers
        .split_inclusive(|c: char| c == ',' || c.is_whitespace())
        .map(|piece| {
            let word = piece.trim_end_matches(|c: char| c == ',' || c.is_whitespace());
            format!("{}{}", mask_userinfo(word), &piece[word.len()..])
        })
        .collect()
}

/// One word (no comma or white space in it) with its userinfo masked.
fn mask_userinfo(word: &str) -> String {
    let start = word.find("://").map_or(0, |i| i + 3);
    let rest = &word[start..];
    // The last `@` ends the credentials, wherever it is: a password may hold an
    // unescaped `/`, `?` or `@`, and NATS URLs have no path to mistake.
    let Some(at) = rest.rfind('@') else {
        return word.to_string();
    };
    let masked = match rest[..at].split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_string(),
    };
    format!("{}{masked}{}", &word[..start], &rest[at..])
}

/// Parse a comma-separated server list as the nats tools take it.
pub fn parse_servers(servers: &str) -> Result<Vec<ServerAddr>> {
    let addrs: Vec<ServerAddr> = servers
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<ServerAddr>().map_err(|e| {
                let s = redact_servers(s);
                Error::Usage(format!("invalid NATS server URL '{s}': {e}"))
            })
        })
        .collect::<Result<_>>()?;
    if addrs.is_empty() {
        return Err(Error::Usage(
            "no NATS server given; pass --data-url nats://HOST:PORT".into(),
        ));
    }
    Ok(addrs)
}

pub async fn connect(servers: &str, name: &str, login: &Login) -> Result<DataConn> {
    dial(servers, name, login, None).await
}

/// Connect to `servers`: in random order as usual, or with `Some(r)` to the list turned
/// left `r` places, tried in that order (a sub-stream's own server first).
async fn dial(servers: &str, name: &str, login: &Login, rotate: Option<usize>) -> Result<DataConn> {
    let shown = redact_servers(servers);
    let (url_auth, mut addrs) = take_url_auth(parse_servers(servers)?)?;
    let mut options = ConnectOptions::new();
    if let Some(r) = rotate {
        let n = addrs.len();
        addrs.rotate_left(r % n);
        options = options.retain_servers_order();
    }
    match (&login.creds, &login.nkey, url_auth) {
        (Some(_), Some(_), _) => {
            return Err(Error::Usage("give --creds or --nkey, not both".into()));
        }
        (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
            return Err(Error::Usage(format!(
                "the data URL {shown} carries credentials and --creds/--nkey is given too; use one"
            )));
        }
        (Some(path), None, None) => {
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| Error::Usage(format!("cannot use --creds {}: {e}", path.display())))?;
        }
        (None, Some(path), None) => options = options.nkey(read_seed(path)?),
        (None, None, Some(UrlAuth::UserPassword(user, pass))) => {
            options = options.user_and_password(user, pass);
        }
        (None, None, Some(UrlAuth::Token(token))) => options = options.token(token),
        (None, None, None) => {}
    }
    options = tls_options(options, login)?;
    // async-nats queues count messages, not bytes. The window bounds how many frames can
    // be outstanding, so these capacities never fill, and their memory is that window.
    let queue = max_frames_in_window(MAX_WINDOW) + 256;
    let client = options
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
            let e = e.to_string();
            Error::Nats(format!(
                "cannot connect to NATS at {shown}: {e}; {}",
                connect_hint(&e)
            ))
        })?;
    let max_payload = client.server_info().max_payload as u64;
    Ok(DataConn {
        client,
        servers: shown,
        max_payload,
        redial: Redial {
            servers: servers.to_string(),
            name: name.to_string(),
            login: login.clone(),
        },
    })
}

impl DataConn {
    /// Another connection to the same servers, for sub-stream `k` of a striped transfer:
    /// it tries server `k` of the list first (counting round), so the sub-streams of a
    /// transfer spread over a cluster, and fails over to the others in order.
    pub async fn sibling(&self, k: usize) -> Result<DataConn> {
        let r = &self.redial;
        let name = format!("{}-s{k}", r.name);
        dial(&r.servers, &name, &r.login, Some(k)).await
    }

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

    /// Whether the client is connected to a server right now (it reconnects by itself).
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Flush, waiting at most `bound`; whether it completed.
    pub async fn flush_within(&self, bound: Duration) -> bool {
        matches!(
            tokio::time::timeout(bound, self.client.flush()).await,
            Ok(Ok(()))
        )
    }
}

/// What to check after a failed connect, by what the client said (nbdnats.planes says the
/// same for the ctl plane).
fn connect_hint(error: &str) -> &'static str {
    if error.contains("CertificateRequired") {
        "the server asks for a client certificate: give --tlscert and --tlskey"
    } else if error.contains("UnknownIssuer") {
        "the server's certificate is not signed by a CA this host trusts: give its CA with --tlsca"
    } else {
        "check --data-url, the credentials and that nats-server is running"
    }
}

/// The login's TLS files on `options`. TLS itself is used when the server requires it or
/// a URL is `tls://`, as without them.
fn tls_options(mut options: ConnectOptions, login: &Login) -> Result<ConnectOptions> {
    match (&login.tls_cert, &login.tls_key) {
        (Some(cert), Some(key)) => {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        (None, None) => {}
        _ => {
            return Err(Error::Usage(
                "give --tlscert and --tlskey together (a client certificate and its key)".into(),
            ))
        }
    }
    if let Some(ca) = &login.tls_ca {
        options = options.add_root_certificates(ca.clone());
    }
    Ok(options)
}

/// The NKey seed in `path`: its first line that is a user seed (`SU...`), as the nats
/// tools write it (alone, or in a file with comments around it).
fn read_seed(path: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Usage(format!("cannot read --nkey {}: {e}", path.display())))?;
    text.lines()
        .map(str::trim)
        .find(|l| l.starts_with("SU"))
        .map(str::to_string)
        .ok_or_else(|| {
            Error::Usage(format!(
                "--nkey {}: no user NKey seed (a line starting with SU) in it",
                path.display()
            ))
        })
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

    /// The cases nbdnats.planes.redact_url is tested against too.
    #[test]
    fn redacted_servers_show_no_secret() {
        let cases = include_str!("../../tests/redact_cases.txt");
        let mut n = 0;
        for line in cases.lines().filter(|l| !l.starts_with('#')) {
            let (input, want) = line.split_once('\t').expect("a tab in every case");
            assert_eq!(redact_servers(input), want, "{input}");
            n += 1;
        }
        assert!(n >= 10);
    }

    #[test]
    fn url_credentials_are_taken_decoded_and_stripped() {
        let addrs =
            parse_servers("nats://h1:1, nats://alice:p%40ss%3Aw@h2:2, nats://bob:x@h3:3").unwrap();
        let (auth, bare) = take_url_auth(addrs).unwrap();
        assert_eq!(
            auth,
            Some(UrlAuth::UserPassword("alice".into(), "p@ss:w".into()))
        );
        assert!(bare
            .iter()
            .all(|a| !a.has_user_pass() && a.password().is_none()));
        assert_eq!(bare[1].as_url_str(), "nats://h2:2");
        let (auth, _) = take_url_auth(parse_servers("tls://t%2Fok@h:1").unwrap()).unwrap();
        assert_eq!(auth, Some(UrlAuth::Token("t/ok".into())));
        let (auth, _) = take_url_auth(parse_servers("nats://h:1").unwrap()).unwrap();
        assert_eq!(auth, None);
        assert!(take_url_auth(parse_servers("nats://u:%ff@h:1").unwrap()).is_err());
    }

    #[test]
    fn a_bad_url_error_shows_no_password() {
        let err = parse_servers("nats://alice:s3cret@host:notaport")
            .err()
            .unwrap()
            .to_string();
        assert!(!err.contains("s3cret"), "{err}");
        assert!(err.contains("alice:***@host"), "{err}");
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        let login = Login {
            tls_cert: Some("client.pem".into()),
            ..Login::default()
        };
        let err = tls_options(ConnectOptions::new(), &login)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--tlscert and --tlskey together"), "{err}");
        let both = Login {
            tls_key: Some("client.key".into()),
            ..login
        };
        assert!(tls_options(ConnectOptions::new(), &both).is_ok());
    }

    #[test]
    fn server_lists() {
        assert_eq!(parse_servers("nats://a:1, nats://b:2").unwrap().len(), 2);
        assert!(parse_servers(" , ").is_err());
    }
}
