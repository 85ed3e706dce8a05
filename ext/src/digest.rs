//! The sha256 of an image's contents, as approvals name it: what `sha256sum` prints for the
//! raw disk, whatever the container (qcow2 behind qemu-nbd, a sparse file, a device).
//!
//! Reads run ahead of the hash a few chunks at a time; ranges the source reports as zeros
//! are hashed from a shared zero buffer without being read.

use std::sync::Arc;

use futures::stream::{self, StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::io::{read_owned, zeros, Source};

/// Bytes per read, and reads in flight ahead of the hash.
const PIECE: u64 = 1 << 20;
const AHEAD: usize = 8;

enum Piece {
    Data(u64, usize),
    Zero(u64),
}

/// The sha256 of `source`'s first `length` bytes (all of it by default), with the length.
pub async fn sha256(source: Arc<dyn Source>, length: Option<u64>) -> Result<(String, u64)> {
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
    let mut hasher = Sha256::new();
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
            Hashed::Data(buf) => hasher.update(&buf),
            Hashed::Zeros(mut n) => {
                while n > 0 {
                    let z = zeros(n.min(PIECE) as usize);
                    hasher.update(&z);
                    n -= z.len() as u64;
                }
            }
        }
    }
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((format!("sha256:{hex}"), length))
}

enum Hashed {
    Data(bytes::Bytes),
    Zeros(u64),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::file::File;

    fn hex(data: &[u8]) -> String {
        let d = Sha256::digest(data);
        format!(
            "sha256:{}",
            d.iter().map(|b| format!("{b:02x}")).collect::<String>()
        )
    }

    /// A sparse file: data, a 3 MiB hole, data at an odd length.
    fn image() -> (std::path::PathBuf, Vec<u8>) {
        use std::io::{Seek, SeekFrom, Write};
        let path = std::env::temp_dir().join(format!("nbdnats-digest-{}", std::process::id()));
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
        let (path, all) = image();
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
}
