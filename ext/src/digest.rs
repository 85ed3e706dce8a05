//! The digest of an image's contents, whatever the container (qcow2 behind qemu-nbd, a
//! sparse file, a device): its sha256, as approvals name it (what `sha256sum` prints for
//! the raw disk), or its content digest (`checksum::CONTENT_ALGORITHM`), what a transfer
//! of it reports.
//!
//! Reads run ahead of the hash a few chunks at a time; ranges the source reports as zeros
//! are not read (sha256 hashes them from a shared zero buffer, the content digest adds a
//! precomputed value per zero block).

use std::sync::Arc;

use futures::stream::{self, StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use crate::checksum::{content_hex, ContentDigest, CONTENT_ALGORITHM};
use crate::error::{Error, Result};
use crate::io::{read_owned, zeros, Source};

/// Bytes per read, and reads in flight ahead of the hash.
const PIECE: u64 = 1 << 20;
const AHEAD: usize = 8;

enum Piece {
    Data(u64, usize),
    Zero(u64),
}

/// The algorithms `image` offers, by the names they are asked for and printed with.
pub const ALGORITHMS: [&str; 2] = ["sha256", CONTENT_ALGORITHM];

/// What a digest is computed with.
enum Hasher {
    Sha256(Box<Sha256>),
    Content(Box<ContentDigest>),
}

impl Hasher {
    fn named(algo: &str) -> Result<Hasher> {
        match algo {
            "sha256" => Ok(Hasher::Sha256(Box::default())),
            CONTENT_ALGORITHM => Ok(Hasher::Content(Box::default())),
            other => Err(Error::Usage(format!(
                "unknown digest algorithm {other:?}; use one of {}",
                ALGORITHMS.join(", ")
            ))),
        }
    }

    fn data(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Content(c) => c.data(data),
        }
    }

    fn zeros(&mut self, mut n: u64) {
        match self {
            Hasher::Sha256(h) => {
                while n > 0 {
                    let z = zeros(n.min(PIECE) as usize);
                    h.update(&z);
                    n -= z.len() as u64;
                }
            }
            Hasher::Content(c) => c.zeros(n),
        }
    }

    fn text(self) -> String {
        match self {
            Hasher::Sha256(h) => {
                let hex: String = (*h).finalize().iter().map(|b| format!("{b:02x}")).collect();
                format!("sha256:{hex}")
            }
            Hasher::Content(c) => content_hex(&c.value()),
        }
    }
}

/// The digest (`algo`, one of [`ALGORITHMS`]) of `source`'s first `length` bytes (all of it
/// by default) as `<algo>:<hex>`, with the length.
pub async fn image(
    source: Arc<dyn Source>,
    length: Option<u64>,
    algo: &str,
) -> Result<(String, u64)> {
    let mut hasher = Hasher::named(algo)?;
    let size = source.size();
    let length = length.unwrap_or(size);
    if length > size {
        return Err(Error::Usage(format!(
            "cannot hash {length} bytes of a {size}-byte image"
        )));
    }
    let mut pieces = Vec::new();
    let mut pos = 0;
    while pos < length {
        let extents = source.extents(pos, length - pos).await?;
        let mut advanced = false;
        for e in extents {
            let end = e.end().min(length);
            if e.offset != pos || end <= pos {
                break;
            }
            while pos < end {
                let n = (end - pos).min(PIECE);
                pieces.push(if e.zero {
                    Piece::Zero(n)
                } else {
                    Piece::Data(pos, n as usize)
                });
                pos += n;
            }
            advanced = true;
        }
        if !advanced {
            return Err(Error::Endpoint(format!(
                "the source described no extent at offset {pos}"
            )));
        }
    }
    let mut hashed = stream::iter(pieces.into_iter().map(|p| {
        let source = source.clone();
        async move {
            match p {
                Piece::Data(offset, len) => {
                    read_owned(&*source, offset, len).await.map(Hashed::Data)
                }
                Piece::Zero(n) => Ok(Hashed::Zeros(n)),
            }
        }
    }))
    .buffered(AHEAD);
    while let Some(piece) = hashed.try_next().await? {
        match piece {
            Hashed::Data(buf) => hasher.data(&buf),
            Hashed::Zeros(n) => hasher.zeros(n),
        }
    }
    Ok((hasher.text(), length))
}

enum Hashed {
    Data(bytes::Bytes),
    Zeros(u64),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::file::File;

    async fn sha256(source: Arc<dyn Source>, length: Option<u64>) -> Result<(String, u64)> {
        image(source, length, "sha256").await
    }

    fn hex(data: &[u8]) -> String {
        let d = Sha256::digest(data);
        format!(
            "sha256:{}",
            d.iter().map(|b| format!("{b:02x}")).collect::<String>()
        )
    }

    /// A sparse file: data, a 3 MiB hole, data at an odd length.
    fn image_file(name: &str) -> (std::path::PathBuf, Vec<u8>) {
        use std::io::{Seek, SeekFrom, Write};
        let path =
            std::env::temp_dir().join(format!("nbdnats-digest-{name}-{}", std::process::id()));
        let mut all = vec![0u8; 5 * (1 << 20) + 12345];
        for (i, b) in all[..1_500_000].iter_mut().enumerate() {
            *b = (i % 253) as u8 + 1;
        }
        let tail = 4 * (1 << 20) + 100;
        for (i, b) in all[tail..].iter_mut().enumerate() {
            *b = (i % 7) as u8 + 1;
        }
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&all[..1_500_000]).unwrap();
        f.seek(SeekFrom::Start(tail as u64)).unwrap();
        f.write_all(&all[tail..]).unwrap();
        (path, all)
    }

    #[tokio::test]
    async fn digest_matches_sha256_of_the_bytes_holes_included() {
        let (path, all) = image_file("sha256");
        let source: Arc<dyn Source> = Arc::new(File::open_source(path.to_str().unwrap()).unwrap());
        let whole = sha256(source.clone(), None).await.unwrap();
        let part = sha256(source.clone(), Some(1_500_001)).await.unwrap();
        let err = sha256(source, Some(all.len() as u64 + 1))
            .await
            .unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(whole, (hex(&all), all.len() as u64));
        assert_eq!(part, (hex(&all[..1_500_001]), 1_500_001));
        assert_eq!(err.code(), "usage");
    }

    /// The content digest of a sparse file, holes skipped, is that of its bytes; an unknown
    /// algorithm is a usage error naming the known ones.
    #[tokio::test]
    async fn content_digest_of_a_sparse_file_is_that_of_its_bytes() {
        let (path, all) = image_file("content");
        let source: Arc<dyn Source> = Arc::new(File::open_source(path.to_str().unwrap()).unwrap());
        let got = image(source.clone(), None, CONTENT_ALGORITHM)
            .await
            .unwrap();
        let bad = image(source, None, "md5").await.unwrap_err();
        std::fs::remove_file(&path).unwrap();
        let mut want = ContentDigest::default();
        want.data(&all);
        assert_eq!(got, (content_hex(&want.value()), all.len() as u64));
        assert_eq!(bad.code(), "usage");
        assert!(bad.to_string().contains(CONTENT_ALGORITHM), "{bad}");
    }
}
