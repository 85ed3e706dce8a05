//! The receiver's durable journal: what part of the target is known written.
//!
//! An append-only file of records `[u32 len][u8 type][body][u64 xxh3(type+body)]`:
//! one header (JSON: target, size, chunk size), then checkpoints. A checkpoint says "every
//! frame below `next_seq` is written *and flushed*" and carries those frames' checksums, so a
//! resumed receiver rebuilds the transfer digest without re-reading the target. The target is
//! always flushed before a checkpoint is appended; a torn last record is ignored and cut off.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checksum::{xxh3_64, Digest};
use crate::error::{Error, Result};

const HEADER: u8 = 1;
const CHECKPOINT: u8 = 2;
/// Longest record we will read (a checkpoint of 2M frames); bigger means a damaged file.
const MAX_RECORD: usize = 16 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub v: u8,
    pub transfer_id: String,
    pub target: String,
    pub size: u64,
    pub chunk_size: u64,
}

/// Where the last checkpoint left the transfer.
#[derive(Clone, Default)]
pub struct Progress {
    pub next_seq: u64,
    pub offset: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    /// Folded checksums of every frame below `next_seq`.
    pub digest: Digest,
}

pub struct Journal {
    path: PathBuf,
    file: File,
    pub header: Header,
    pub progress: Progress,
}

pub fn path_for(state_dir: &Path, transfer_id: &str) -> PathBuf {
    state_dir
        .join("journals")
        .join(format!("recv-{transfer_id}.journal"))
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Endpoint(format!("journal {}: {e}", path.display()))
}

fn record(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(13 + body.len());
    out.extend_from_slice(&((body.len() + 1) as u32).to_le_bytes());
    out.push(kind);
    out.extend_from_slice(body);
    out.extend_from_slice(&xxh3_64(&out[4..]).to_le_bytes());
    out
}

impl Journal {
    /// Start a new journal (replacing none: an existing one is the caller's to handle).
    pub fn create(path: &Path, header: Header) -> Result<Journal> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        }
        let mut file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(path)
            .map_err(|e| io(path, e))?;
        let body = serde_json::to_vec(&header)
            .map_err(|e| Error::Endpoint(format!("journal header: {e}")))?;
        file.write_all(&record(HEADER, &body))
            .map_err(|e| io(path, e))?;
        file.sync_all().map_err(|e| io(path, e))?;
        if let Some(dir) = path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io(dir, e))?;
        }
        Ok(Journal {
            path: path.to_path_buf(),
            file,
            header,
            progress: Progress::default(),
        })
    }

    /// Read a journal back: its header and the last complete checkpoint.
    pub fn open(path: &Path) -> Result<Journal> {
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| match e.kind() {
                ErrorKind::NotFound => Error::Usage(format!(
                    "nothing to resume: no journal at {} (start without --resume)",
                    path.display()
                )),
                _ => io(path, e),
            })?;
        let mut header: Option<Header> = None;
        let mut progress = Progress::default();
        let mut pos = 0usize;
        while let Some((kind, body, next)) = next_record(&bytes, pos) {
            match kind {
                HEADER if header.is_none() => {
                    header = serde_json::from_slice(body).ok();
                }
                CHECKPOINT if header.is_some() => match apply_checkpoint(&progress, body) {
                    Some(p) => progress = p,
                    None => break,
                },
                _ => break,
            }
            pos = next;
        }
        let header = header.ok_or_else(|| {
            Error::Endpoint(format!(
                "journal {} is damaged: no header; delete it to start over",
                path.display()
            ))
        })?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| io(path, e))?;
        // Cut off a torn tail so the next append starts on a record boundary.
        file.set_len(pos as u64).map_err(|e| io(path, e))?;
        Ok(Journal {
            path: path.to_path_buf(),
            file,
            header,
            progress,
        })
    }

    /// Record that frames `[progress.next_seq, next_seq)` with `checksums` are durable.
    /// The caller has flushed the target first.
    pub fn checkpoint(
        &mut self,
        next_seq: u64,
        offset: u64,
        data_bytes: u64,
        zero_bytes: u64,
        checksums: &[u64],
    ) -> Result<()> {
        let mut body = Vec::with_capacity(36 + 8 * checksums.len());
        for v in [next_seq, offset, data_bytes, zero_bytes] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        body.extend_from_slice(&(checksums.len() as u32).to_le_bytes());
        for c in checksums {
            body.extend_from_slice(&c.to_le_bytes());
        }
        let next = apply_checkpoint(&self.progress, &body).ok_or_else(|| {
            Error::Endpoint("journal checkpoint does not follow the last one".into())
        })?;
        self.file
            .write_all(&record(CHECKPOINT, &body))
            .map_err(|e| io(&self.path, e))?;
        self.file.sync_data().map_err(|e| io(&self.path, e))?;
        self.progress = next;
        Ok(())
    }

    /// The transfer finished: the journal has served its purpose.
    pub fn remove(self) -> Result<()> {
        std::fs::remove_file(&self.path).map_err(|e| io(&self.path, e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn next_record(bytes: &[u8], pos: usize) -> Option<(u8, &[u8], usize)> {
    let len = u32::from_le_bytes(bytes.get(pos..pos + 4)?.try_into().ok()?) as usize;
    if len == 0 || len > MAX_RECORD {
        return None;
    }
    let end = pos.checked_add(4 + len + 8)?;
    let typed = bytes.get(pos + 4..pos + 4 + len)?;
    let sum = u64::from_le_bytes(bytes.get(pos + 4 + len..end)?.try_into().ok()?);
    (xxh3_64(typed) == sum).then(|| (typed[0], &typed[1..], end))
}

/// The progress after checkpoint `body`, if it extends `prev` consistently.
fn apply_checkpoint(prev: &Progress, body: &[u8]) -> Option<Progress> {
    let u64_at = |at: usize| {
        body.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let (next_seq, offset, data_bytes, zero_bytes) =
        (u64_at(0)?, u64_at(8)?, u64_at(16)?, u64_at(24)?);
    let n = u32::from_le_bytes(body.get(32..36)?.try_into().ok()?) as u64;
    if next_seq != prev.next_seq.checked_add(n)?
        || body.len() as u64 != 36 + 8 * n
        || offset < prev.offset
    {
        return None;
    }
    let mut digest = prev.digest.clone();
    for i in 0..n as usize {
        digest.update(u64_at(36 + 8 * i)?);
    }
    Some(Progress {
        next_seq,
        offset,
        data_bytes,
        zero_bytes,
        digest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            v: 2,
            transfer_id: "t".into(),
            target: "/dev/x".into(),
            size: 100,
            chunk_size: 10,
        }
    }

    #[test]
    fn checkpoints_survive_reopen_and_rebuild_the_digest() {
        let dir = std::env::temp_dir().join(format!("nbdnats-journal-{}", std::process::id()));
        let path = path_for(&dir, "t1");
        let _ = std::fs::remove_file(&path);
        let mut j = Journal::create(&path, header()).unwrap();
        j.checkpoint(2, 20, 20, 0, &[11, 12]).unwrap();
        j.checkpoint(3, 30, 20, 10, &[13]).unwrap();
        assert!(
            j.checkpoint(9, 40, 0, 0, &[1]).is_err(),
            "gap must be refused"
        );
        drop(j);
        // A torn record at the end (a crash mid-append) is ignored and cut off.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[40, 0, 0, 0, 2, 1, 2, 3]).unwrap();
        drop(f);
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.header, header());
        assert_eq!(
            (
                j.progress.next_seq,
                j.progress.offset,
                j.progress.zero_bytes
            ),
            (3, 30, 10)
        );
        let mut want = Digest::default();
        for c in [11, 12, 13] {
            want.update(c);
        }
        assert_eq!(j.progress.digest.value(), want.value());
        j.remove().unwrap();
        assert!(matches!(Journal::open(&path), Err(Error::Usage(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn garbage_is_no_journal() {
        assert!(next_record(&[255, 255, 255, 255, 1], 0).is_none());
        assert!(next_record(&[], 0).is_none());
        assert!(apply_checkpoint(&Progress::default(), &[0; 10]).is_none());
    }
}
