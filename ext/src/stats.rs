//! Live transfer statistics, shared by the engine (writer) and Python (reader).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    Connecting = 0,
    Waiting = 1,
    Running = 2,
    Finishing = 3,
    Done = 4,
    Failed = 5,
}

impl State {
    pub fn name(self) -> &'static str {
        [
            "connecting",
            "waiting",
            "running",
            "finishing",
            "done",
            "failed",
        ][self as usize]
    }
}

pub struct Progress {
    pub transfer_id: String,
    pub role: &'static str,
    pub size: AtomicU64,
    /// Disk bytes acknowledged as written (sender) or written (receiver).
    pub done_bytes: AtomicU64,
    pub data_bytes: AtomicU64,
    pub zero_bytes: AtomicU64,
    /// Bytes the source's dirty bitmap marked changed (a dirty transfer; 0 otherwise).
    pub dirty_bytes: AtomicU64,
    pub frames: AtomicU64,
    /// Messages on the transfer's subjects that were not valid frames of it.
    pub bad_frames: AtomicU64,
    pub duplicate_frames: AtomicU64,
    /// Frames of this transfer that failed their checksum (asked for again).
    pub corrupt_frames: AtomicU64,
    /// Frames the sender sent again (lost or damaged on the way).
    pub retransmits: AtomicU64,
    /// Payload bytes the sender published, retransmissions and resends included.
    pub sent_bytes: AtomicU64,
    /// Payload bytes as they went on the wire (sender: published, compressed where that
    /// paid; receiver: of the frames it took in), against the disk bytes they carry.
    pub wire_bytes: AtomicU64,
    /// Times the transfer continued from a resume point.
    pub resumes: AtomicU64,
    pub chunk_size: AtomicU64,
    pub window: AtomicU64,
    /// The sender's rate cap in bytes/s (0: none), read before every data frame, so a
    /// change (`Transfer.set_rate`) applies to the running transfer.
    pub rate_limit: AtomicU64,
    /// Sub-streams the transfer runs as (`--streams`): 1 once it runs as one, 0 before.
    pub streams: AtomicU64,
    pub verified: AtomicBool,
    /// Cancelled on purpose, for good: the cancellation ends it `abandoned`, not resumable.
    pub abandoned: AtomicBool,
    state: AtomicU8,
    times: Mutex<(Option<Instant>, Option<Instant>)>,
    digest: Mutex<Option<String>>,
}

impl Progress {
    /// What a failure of this transfer is: a cancellation on purpose ends it for good.
    pub fn cause(&self, err: crate::error::Error) -> crate::error::Error {
        use crate::error::Error;
        match err {
            Error::Cancelled if self.abandoned.load(Relaxed) => {
                Error::Abandoned("transfer cancelled for good: nothing is kept to resume it".into())
            }
            other => other,
        }
    }

    pub fn new(transfer_id: &str, role: &'static str) -> Progress {
        Progress {
            transfer_id: transfer_id.to_string(),
            role,
            size: AtomicU64::new(0),
            done_bytes: AtomicU64::new(0),
            data_bytes: AtomicU64::new(0),
            zero_bytes: AtomicU64::new(0),
            dirty_bytes: AtomicU64::new(0),
            frames: AtomicU64::new(0),
            bad_frames: AtomicU64::new(0),
            duplicate_frames: AtomicU64::new(0),
            corrupt_frames: AtomicU64::new(0),
            retransmits: AtomicU64::new(0),
            resumes: AtomicU64::new(0),
            sent_bytes: AtomicU64::new(0),
            wire_bytes: AtomicU64::new(0),
            chunk_size: AtomicU64::new(0),
            window: AtomicU64::new(0),
            rate_limit: AtomicU64::new(0),
            streams: AtomicU64::new(0),
            verified: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
            state: AtomicU8::new(State::Connecting as u8),
            times: Mutex::new((None, None)),
            digest: Mutex::new(None),
        }
    }

    pub fn set_state(&self, state: State) {
        self.state.store(state as u8, Relaxed);
        let mut t = self.times.lock().unwrap_or_else(|p| p.into_inner());
        match state {
            State::Running if t.0.is_none() => t.0 = Some(Instant::now()),
            State::Done | State::Failed if t.1.is_none() => t.1 = Some(Instant::now()),
            _ => {}
        }
    }

    pub fn state(&self) -> State {
        match self.state.load(Relaxed) {
            0 => State::Connecting,
            1 => State::Waiting,
            2 => State::Running,
            3 => State::Finishing,
            4 => State::Done,
            _ => State::Failed,
        }
    }

    /// Seconds since data started to flow, until the end.
    pub fn seconds(&self) -> f64 {
        let t = self.times.lock().unwrap_or_else(|p| p.into_inner());
        match t.0 {
            None => 0.0,
            Some(start) => {
                t.1.unwrap_or_else(Instant::now)
                    .duration_since(start)
                    .as_secs_f64()
            }
        }
    }

    pub fn set_digest(&self, digest: String) {
        *self.digest.lock().unwrap_or_else(|p| p.into_inner()) = Some(digest);
    }

    pub fn digest(&self) -> Option<String> {
        self.digest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
}
