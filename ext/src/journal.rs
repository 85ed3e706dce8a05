//! The receiver's durable journal: what part of the target is known written.
//!
//! An append-only file of records `[u32 len][u8 type][body][u64 xxh3(type+body)]`: one
//! header (JSON: target and its identity, size, chunk size, the sender's key hash), then
//! checkpoints and key changes. A checkpoint says "every frame below `next_seq` is written
//! *and flushed*" and carries each of those frames' kind, length and checksum, so a resumed
//! receiver can rebuild the transfer digest, check that the target still holds what was
//! written (`recv` re-reads it before it continues) and verify all of it at the end. The
//! target is always flushed before a checkpoint is appended; a torn last record is ignored
//! and cut off. The file is locked while a receiver uses it, so two receivers never share
//! one journal.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checksum::{xxh3_64, Digest};
use crate::error::{Error, Result};
use crate::frame::Kind;

/// The journal's own format version (independent of the wire protocol's).
pub const JOURNAL_VERSION: u8 = 3;
const HEADER: u8 = 1;
const CHECKPOINT: u8 = 2;
/// The sender's key hash changed (it resumed with its key and chose a new one).
const KEY: u8 = 3;
/// Longest record we will read (a checkpoint of about 900k frames); bigger means damage.
const MAX_RECORD: usize = 16 << 20;
/// Bytes of one frame in a checkpoint: kind, length, checksum.
const FRAME_LEN: usize = 1 + 8 + 8;
/// Bytes of a checkpoint's fixed part: next_seq, offset, data and zero bytes, frame count.
const CHECKPOINT_HEAD: usize = 36;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub v: u8,
    pub transfer_id: String,
    pub target: String,
    pub size: u64,
    pub chunk_size: u64,
    /// sha256 (hex) of the secret key of the sender this transfer belongs to: only a sender
    /// that shows the key may continue it.
    pub key_hash: String,
    /// Device, inode and birth time of a file or block-device target, to notice a replaced
    /// target.
    pub identity: Option<(u64, u64, u64)>,
}

/// One written frame as the journal remembers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub length: u64,
    pub checksum: u64,
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
    /// Every frame below `next_seq`, in order (frame `i` starts where `i - 1` ended).
    pub frames: Vec<Frame>,
}

impl Progress {
    /// The progress of `frames` from the start (a prefix that checked out).
    pub fn prefix(frames: &[Frame]) -> Option<Progress> {
        let mut p = Progress::default();
        for f in frames {
            p.push(*f)?;
        }
        Some(p)
    }

    /// One more frame; `None` if a counter would overflow (a damaged journal).
    fn push(&mut self, f: Frame) -> Option<()> {
        self.next_seq = self.next_seq.checked_add(1)?;
        self.offset = self.offset.checked_add(f.length)?;
        if f.kind == Kind::Data {
            self.data_bytes = self.data_bytes.checked_add(f.length)?;
        } else {
            self.zero_bytes = self.zero_bytes.checked_add(f.length)?;
        }
        self.digest.update(f.checksum);
        self.frames.push(f);
        Some(())
    }
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

fn checkpoint_body(p: &Progress, frames: &[Frame]) -> Vec<u8> {
    let mut body = Vec::with_capacity(CHECKPOINT_HEAD + FRAME_LEN * frames.len());
    for v in [p.next_seq, p.offset, p.data_bytes, p.zero_bytes] {
        body.extend_from_slice(&v.to_le_bytes());
    }
    body.extend_from_slice(&(frames.len() as u32).to_le_bytes());
    for f in frames {
        body.push(f.kind as u8);
        body.extend_from_slice(&f.length.to_le_bytes());
        body.extend_from_slice(&f.checksum.to_le_bytes());
    }
    body
}

/// Take the journal's lock, or say which receiver holds it.
fn lock(file: &File, path: &Path) -> Result<()> {
    use rustix::fs::{flock, FlockOperation};
    flock(file, FlockOperation::NonBlockingLockExclusive).map_err(|e| {
        if e == rustix::io::Errno::WOULDBLOCK {
            Error::Busy(format!(
                "another receiver is using the journal {} (it is still running): stop it first, \
                 or let it finish",
                path.display()
            ))
        } else {
            io(path, e.into())
        }
    })
}

fn sync_dir(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(dir, e))?;
    }
    Ok(())
}

/// Write a new journal file whole (header, then one checkpoint of `progress`), durably, and
/// open it for appending. `replace` swaps it in for an existing one atomically.
fn write_new(path: &Path, header: &Header, progress: &Progress, replace: bool) -> Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    let body =
        serde_json::to_vec(header).map_err(|e| Error::Endpoint(format!("journal header: {e}")))?;
    let mut bytes = record(HEADER, &body);
    if progress.next_seq > 0 {
        bytes.extend(record(
            CHECKPOINT,
            &checkpoint_body(progress, &progress.frames),
        ));
    }
    let staged = if replace {
        path.with_extension("journal.new")
    } else {
        path.to_path_buf()
    };
    let mut options = OpenOptions::new();
    options.mode(0o600);
    if replace {
        // Written from its start, so later records follow on at its end as appends would.
        options.write(true).create(true).truncate(true);
    } else {
        options.append(true).create_new(true);
    }
    let mut file = options.open(&staged).map_err(|e| io(&staged, e))?;
    lock(&file, path)?;
    file.write_all(&bytes).map_err(|e| io(&staged, e))?;
    file.sync_all().map_err(|e| io(&staged, e))?;
    if replace {
        std::fs::rename(&staged, path).map_err(|e| io(path, e))?;
    }
    sync_dir(path)?;
    Ok(file)
}

impl Journal {
    /// Start a new journal (replacing none: an existing one is the caller's to handle).
    pub fn create(path: &Path, header: Header) -> Result<Journal> {
        let file = write_new(path, &header, &Progress::default(), false)?;
        Ok(Journal {
            path: path.to_path_buf(),
            file,
            header,
            progress: Progress::default(),
        })
    }

    /// Read a journal back: its header and the last complete checkpoint.
    pub fn open(path: &Path) -> Result<Journal> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(path)
            .map_err(|e| match e.kind() {
                ErrorKind::NotFound => Error::Usage(format!(
                    "nothing to resume: no journal at {} (start without --resume)",
                    path.display()
                )),
                _ => io(path, e),
            })?;
        lock(&file, path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(|e| io(path, e))?;
        let (header, progress, pos) = parse(&bytes, path)?;
        // Cut off a torn tail so the next append starts on a record boundary.
        file.set_len(pos as u64).map_err(|e| io(path, e))?;
        Ok(Journal {
            path: path.to_path_buf(),
            file,
            header,
            progress,
        })
    }

    /// Record that `frames` (from `progress.next_seq` on) are durable and where that leaves
    /// the transfer. The caller has flushed the target first.
    pub fn checkpoint(&mut self, frames: &[Frame]) -> Result<()> {
        let mut next = self.progress.clone();
        for f in frames {
            next.push(*f)
                .ok_or_else(|| Error::Endpoint("journal checkpoint past 2^64 bytes".into()))?;
        }
        let body = checkpoint_body(&next, frames);
        self.append(CHECKPOINT, &body)?;
        self.progress = next;
        Ok(())
    }

    /// The sender resumed and chose a new key: only the new one opens the transfer now.
    pub fn set_key(&mut self, key_hash: &str) -> Result<()> {
        self.append(KEY, key_hash.as_bytes())?;
        self.header.key_hash = key_hash.to_string();
        Ok(())
    }

    fn append(&mut self, kind: u8, body: &[u8]) -> Result<()> {
        self.file
            .write_all(&record(kind, body))
            .map_err(|e| io(&self.path, e))?;
        self.file.sync_data().map_err(|e| io(&self.path, e))
    }

    /// Keep only the first `n` frames: the target no longer holds what the rest wrote.
    /// The file is rewritten (atomically) so a crash leaves either version.
    pub fn truncate(&mut self, n: usize) -> Result<()> {
        let kept = Progress::prefix(&self.progress.frames[..n.min(self.progress.frames.len())])
            .unwrap_or_default();
        self.file = write_new(&self.path, &self.header, &kept, true)?;
        self.progress = kept;
        Ok(())
    }

    /// The transfer finished, or can never be continued: the journal has served its purpose.
    pub fn remove(self) -> Result<()> {
        std::fs::remove_file(&self.path).map_err(|e| io(&self.path, e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A journal's header and its last complete checkpoint, and where its valid records end.
fn parse(bytes: &[u8], path: &Path) -> Result<(Header, Progress, usize)> {
    let mut header: Option<Header> = None;
    let mut progress = Progress::default();
    let mut pos = 0usize;
    while let Some((kind, body, next)) = next_record(bytes, pos) {
        match (kind, header.as_mut()) {
            (HEADER, None) => {
                let v = serde_json::from_slice::<serde_json::Value>(body)
                    .ok()
                    .and_then(|h| h.get("v").and_then(serde_json::Value::as_u64));
                if v != Some(u64::from(JOURNAL_VERSION)) {
                    return Err(Error::Usage(format!(
                        "the journal {} was written by another version of nbd-nats; \
                         delete it to start the transfer over",
                        path.display()
                    )));
                }
                header = serde_json::from_slice(body).ok();
                if header.is_none() {
                    break;
                }
            }
            (CHECKPOINT, Some(_)) => {
                if !apply_checkpoint(&mut progress, body) {
                    break;
                }
            }
            (KEY, Some(h)) => match std::str::from_utf8(body) {
                Ok(k) if is_key_hash(k) => h.key_hash = k.to_string(),
                _ => break,
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
    Ok((header, progress, pos))
}

/// A sha256 in hex, as key hashes are.
pub fn is_key_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
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

/// Extend `progress` by checkpoint `body`; false (and `progress` unchanged) when the body
/// is malformed or does not follow on consistently.
fn apply_checkpoint(progress: &mut Progress, body: &[u8]) -> bool {
    let u64_at = |at: usize| {
        body.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let parsed = (|| {
        let (next_seq, offset, data_bytes, zero_bytes) =
            (u64_at(0)?, u64_at(8)?, u64_at(16)?, u64_at(24)?);
        let n = u32::from_le_bytes(body.get(32..36)?.try_into().ok()?) as usize;
        if body.len() != CHECKPOINT_HEAD + FRAME_LEN * n {
            return None;
        }
        let mut next = progress.clone();
        for i in 0..n {
            let at = CHECKPOINT_HEAD + FRAME_LEN * i;
            let kind = Kind::from_u8(body[at])?;
            if !matches!(kind, Kind::Data | Kind::Zero | Kind::Trim) {
                return None;
            }
            let (length, checksum) = (u64_at(at + 1)?, u64_at(at + 9)?);
            next.push(Frame {
                kind,
                length,
                checksum,
            })?;
        }
        let expected = (next.next_seq, next.offset, next.data_bytes, next.zero_bytes);
        (expected == (next_seq, offset, data_bytes, zero_bytes)).then_some(next)
    })();
    match parsed {
        Some(next) => {
            *progress = next;
            true
        }
        None => false,
    }
}

/// Whether `id` may name a transfer's files: 1-64 letters, digits, '-' or '_', not starting
/// with '-' (the rule of `nbdnats.subjects.check_token`). Nothing else reaches a path.
pub fn check_id(id: &str) -> Result<&str> {
    let ok = (1..=64).contains(&id.len())
        && !id.starts_with('-')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(id)
    } else {
        Err(Error::Usage(format!(
            "invalid transfer id {id:?}: use 1-64 letters, digits, '-' or '_', not starting \
             with '-'"
        )))
    }
}

/// One file of a state dir's `journals` folder, as `nbd-nats journals` shows it: a
/// receiver's journal (`recv`), a sender's key (`send`), or a file that is neither or
/// cannot be read (`error` says why; the rest may be unknown).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Listed {
    pub file: String,
    pub role: Option<&'static str>,
    pub transfer_id: Option<String>,
    pub target: Option<String>,
    pub size: Option<u64>,
    /// Disk bytes the last checkpoint says are written.
    pub done_bytes: Option<u64>,
    /// Last write, in seconds since the Unix epoch.
    pub modified: Option<f64>,
    /// A receiver holds the journal's lock: the transfer is still running.
    pub running: bool,
    pub error: Option<String>,
}

fn journals_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("journals")
}

/// What kind of file `name` is, and the transfer id in it.
fn classify(name: &str) -> Option<(&'static str, &str)> {
    let (role, id) = if let Some(id) = name
        .strip_prefix("recv-")
        .and_then(|n| n.strip_suffix(".journal"))
    {
        ("recv", id)
    } else {
        let id = name.strip_prefix("send-")?.strip_suffix(".key")?;
        ("send", id)
    };
    check_id(id).ok().map(|id| (role, id))
}

/// Whether a receiver holds the journal's lock (without taking it for longer than a look).
fn locked(file: &File) -> bool {
    use rustix::fs::{flock, FlockOperation};
    match flock(file, FlockOperation::NonBlockingLockShared) {
        Ok(()) => {
            let _ = flock(file, FlockOperation::Unlock);
            false
        }
        Err(e) => e == rustix::io::Errno::WOULDBLOCK,
    }
}

fn describe(path: &Path, name: &str) -> Listed {
    let mut listed = Listed {
        file: name.to_string(),
        ..Listed::default()
    };
    let meta = std::fs::symlink_metadata(path);
    listed.modified = meta
        .as_ref()
        .ok()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64());
    let Some((role, id)) = classify(name).filter(|_| meta.is_ok_and(|m| m.is_file())) else {
        listed.error = Some("not a journal or key of nbd-nats".into());
        return listed;
    };
    listed.role = Some(role);
    listed.transfer_id = Some(id.to_string());
    let mut read = || -> Result<()> {
        if role == "send" {
            crate::handshake::SenderKey::load(path, id)?;
            return Ok(());
        }
        let mut file = File::open(path).map_err(|e| io(path, e))?;
        listed.running = locked(&file);
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(|e| io(path, e))?;
        let (header, progress, _) = parse(&bytes, path)?;
        if header.transfer_id != id {
            return Err(Error::Endpoint(format!(
                "holds transfer {}, not {id}",
                header.transfer_id
            )));
        }
        listed.target = Some(header.target);
        listed.size = Some(header.size);
        listed.done_bytes = Some(progress.offset);
        Ok(())
    };
    if let Err(e) = read() {
        listed.error = Some(e.to_string());
    }
    listed
}

/// Every file in `state_dir`'s journals folder, by name; none if there is no such folder.
/// A damaged or foreign file is listed with its error, not a failure of the listing.
pub fn list(state_dir: &Path) -> Result<Vec<Listed>> {
    let dir = journals_dir(state_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&dir, e)),
    };
    let mut listed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io(&dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        listed.push(describe(&entry.path(), &name));
    }
    listed.sort_by(|a, b| a.file.cmp(&b.file));
    Ok(listed)
}

/// Remove what an interrupted transfer `id` left in `state_dir`: the receiver's journal
/// (refused while a receiver runs on it) and the sender's key. Returns the files removed.
pub fn discard(state_dir: &Path, id: &str) -> Result<Vec<PathBuf>> {
    let id = check_id(id)?;
    let mut removed = Vec::new();
    let journal = path_for(state_dir, id);
    match OpenOptions::new().read(true).write(true).open(&journal) {
        Ok(file) => {
            // Held until the file is gone: no receiver opens it meanwhile.
            lock(&file, &journal)?;
            std::fs::remove_file(&journal).map_err(|e| io(&journal, e))?;
            removed.push(journal);
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io(&journal, e)),
    }
    let key = crate::handshake::key_path(state_dir, id);
    let record = crate::handshake::streams_record(&key);
    for path in [key, record] {
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path, e)),
        }
    }
    if removed.is_empty() {
        return Err(Error::Usage(format!(
            "no journal of transfer {id} in {} (see: nbd-nats journals --state-dir {})",
            journals_dir(state_dir).display(),
            state_dir.display()
        )));
    }
    sync_dir(&removed[0])?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            v: JOURNAL_VERSION,
            transfer_id: "t".into(),
            target: "/dev/x".into(),
            size: 100,
            chunk_size: 10,
            key_hash: "a".repeat(64),
            identity: Some((1, 2, 3)),
        }
    }

    fn data(checksum: u64) -> Frame {
        Frame {
            kind: Kind::Data,
            length: 10,
            checksum,
        }
    }

    fn temp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("nbdnats-journal-{}-{name}", std::process::id()));
        let path = path_for(&dir, "t1");
        let _ = std::fs::remove_file(&path);
        path
    }

    #[test]
    fn checkpoints_survive_reopen_and_rebuild_the_digest() {
        let path = temp("reopen");
        let mut j = Journal::create(&path, header()).unwrap();
        j.checkpoint(&[data(11), data(12)]).unwrap();
        let zero = Frame {
            kind: Kind::Zero,
            length: 10,
            checksum: 13,
        };
        j.checkpoint(&[zero]).unwrap();
        j.set_key(&"b".repeat(64)).unwrap();
        drop(j);
        // A torn record at the end (a crash mid-append) is ignored and cut off.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[40, 0, 0, 0, 2, 1, 2, 3]).unwrap();
        drop(f);
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.header.key_hash, "b".repeat(64));
        assert_eq!(j.header.identity, Some((1, 2, 3)));
        let p = &j.progress;
        assert_eq!(
            (p.next_seq, p.offset, p.data_bytes, p.zero_bytes),
            (3, 30, 20, 10)
        );
        assert_eq!(p.frames, vec![data(11), data(12), zero]);
        let mut want = Digest::default();
        for c in [11, 12, 13] {
            want.update(c);
        }
        assert_eq!(p.digest.value(), want.value());
        j.remove().unwrap();
        assert!(matches!(Journal::open(&path), Err(Error::Usage(_))));
    }

    #[test]
    fn a_journal_in_use_is_not_opened_twice() {
        let path = temp("lock");
        let j = Journal::create(&path, header()).unwrap();
        let again = Journal::open(&path).err().unwrap();
        assert_eq!(again.code(), "busy");
        assert!(again.to_string().contains("still running"), "{again}");
        drop(j);
        let j = Journal::open(&path).unwrap();
        j.remove().unwrap();
    }

    #[test]
    fn truncate_keeps_a_prefix_durably() {
        let path = temp("truncate");
        let mut j = Journal::create(&path, header()).unwrap();
        j.checkpoint(&[data(1), data(2), data(3)]).unwrap();
        j.truncate(1).unwrap();
        assert_eq!(j.progress.next_seq, 1);
        drop(j);
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.progress.frames, vec![data(1)]);
        assert_eq!(j.progress.offset, 10);
        j.remove().unwrap();
    }

    #[test]
    fn an_older_journal_is_refused_with_what_to_do() {
        let path = temp("old");
        let mut old = header();
        old.v = 2;
        drop(Journal::create(&path, old).unwrap());
        let err = Journal::open(&path).err().unwrap().to_string();
        assert!(
            err.contains("another version") && err.contains("delete it"),
            "{err}"
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn ids_that_could_reach_a_path_or_an_argv_are_refused() {
        for bad in ["", "../x", "-rf", "a/b", "a.b", "x y", &"a".repeat(65)] {
            assert_eq!(check_id(bad).err().unwrap().code(), "usage", "{bad:?}");
        }
        for good in ["vm42-disk0", "a_b", "0", &"a".repeat(64)] {
            assert!(check_id(good).is_ok(), "{good}");
        }
        assert_eq!(classify("recv-../x.journal"), None);
        assert_eq!(classify("recv-t1.journal"), Some(("recv", "t1")));
        assert_eq!(classify("send-t1.key"), Some(("send", "t1")));
        assert_eq!(classify("recv-t1.journal.new"), None);
    }

    #[test]
    fn listing_shows_progress_and_names_what_it_cannot_read() {
        let dir = std::env::temp_dir().join(format!("nbdnats-list-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(list(&dir).unwrap(), vec![]);
        let path = path_for(&dir, "t1");
        let mut j = Journal::create(
            &path,
            Header {
                transfer_id: "t1".into(),
                ..header()
            },
        )
        .unwrap();
        j.checkpoint(&[data(1), data(2)]).unwrap();
        std::fs::write(dir.join("journals").join("recv-t2.journal"), b"garbage").unwrap();
        std::fs::write(dir.join("journals").join("notes.txt"), b"hi").unwrap();
        let listed = list(&dir).unwrap();
        let names: Vec<_> = listed.iter().map(|l| l.file.as_str()).collect();
        assert_eq!(names, ["notes.txt", "recv-t1.journal", "recv-t2.journal"]);
        assert!(listed[0].error.is_some());
        let t1 = &listed[1];
        assert_eq!(t1.transfer_id.as_deref(), Some("t1"));
        assert_eq!(t1.target.as_deref(), Some("/dev/x"));
        assert_eq!((t1.size, t1.done_bytes), (Some(100), Some(20)));
        assert!(t1.running && t1.error.is_none() && t1.modified.is_some());
        assert!(listed[2].error.as_deref().unwrap().contains("damaged"));
        // A running receiver's journal is not discarded; an ended one is.
        assert_eq!(discard(&dir, "t1").err().unwrap().code(), "busy");
        drop(j);
        assert!(!list(&dir).unwrap()[1].running);
        assert_eq!(discard(&dir, "t1").unwrap(), vec![path.clone()]);
        assert!(!path.exists());
        let again = discard(&dir, "t1").err().unwrap();
        assert!(again.to_string().contains(&dir.display().to_string()));
        assert_eq!(discard(&dir, "../t2").err().unwrap().code(), "usage");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn garbage_is_no_journal() {
        assert!(next_record(&[255, 255, 255, 255, 1], 0).is_none());
        assert!(next_record(&[], 0).is_none());
        let mut p = Progress::default();
        assert!(!apply_checkpoint(&mut p, &[0; 10]));
        // A frame whose length overflows the offset is damage, not progress.
        let mut body = checkpoint_body(
            &Progress::default(),
            &[Frame {
                kind: Kind::Data,
                length: u64::MAX,
                checksum: 0,
            }; 2],
        );
        body[0] = 2;
        assert!(!apply_checkpoint(&mut p, &body));
        assert_eq!(p.next_seq, 0);
    }
}
