//! The sender's byte-counted flow-control window, and the record of what is in flight.
//!
//! The receiver grants a window in bytes; the sender never has more than that outstanding
//! (sent but not acknowledged as written). Each frame costs its payload, but at least
//! `MIN_FRAME_COST`, so payload-less zero frames are bounded in number too: that keeps
//! async-nats's message-counted queues within `max_frames_in_window`. For each outstanding
//! frame the window keeps where it came from (not its data), so a lost frame is re-read
//! from the source rather than buffered.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::frame::Kind;

/// Smallest window a receiver grants, and what any frame costs at least.
pub const MIN_FRAME_COST: u64 = 64 * 1024;
/// Largest window a receiver grants: well under nats-server's 64 MiB `max_pending`
/// (publishers stall at 75% of it), since the whole window may sit in the server.
pub const MAX_WINDOW: u64 = 48 * 1024 * 1024;
pub const DEFAULT_WINDOW: u64 = 32 * 1024 * 1024;

pub fn frame_cost(payload_len: u64) -> u64 {
    payload_len.max(MIN_FRAME_COST)
}

/// How many frames can be in a window at most; sizes async-nats's queues and the
/// receiver's reorder buffer.
pub fn max_frames_in_window(window: u64) -> usize {
    (window / MIN_FRAME_COST) as usize + 1
}

/// An outstanding frame: enough to send it again.
#[derive(Clone, Debug)]
pub struct Sent {
    pub seq: u64,
    pub kind: Kind,
    pub offset: u64,
    pub len: u64,
    cost: u64,
    pub last_sent: Instant,
    pub retries: u32,
}

#[derive(Debug)]
pub struct Window {
    limit: u64,
    outstanding: u64,
    inflight: VecDeque<Sent>,
}

impl Window {
    pub fn new(limit: u64) -> Window {
        Window {
            limit,
            outstanding: 0,
            inflight: VecDeque::new(),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn outstanding(&self) -> u64 {
        self.outstanding
    }

    pub fn is_empty(&self) -> bool {
        self.inflight.is_empty()
    }

    /// One frame may always be outstanding, so a frame larger than the window still moves.
    pub fn can_send(&self, cost: u64) -> bool {
        self.outstanding == 0 || self.outstanding + cost <= self.limit
    }

    pub fn sent(&mut self, seq: u64, kind: Kind, offset: u64, len: u64, cost: u64) {
        self.outstanding += cost;
        let entry = Sent {
            seq,
            kind,
            offset,
            len,
            cost,
            last_sent: Instant::now(),
            retries: 0,
        };
        self.inflight.push_back(entry);
    }

    /// Apply a cumulative ack ("every frame below `next_seq` is written"). Returns the disk
    /// bytes newly acknowledged. Old or repeated acks change nothing; an ack for frames
    /// never sent is the peer's error.
    pub fn ack(&mut self, next_seq: u64, next_unsent: u64) -> Result<u64, String> {
        if next_seq > next_unsent {
            return Err(format!(
                "ack for frame {next_seq} but only {next_unsent} were sent"
            ));
        }
        let mut covered = 0;
        while let Some(front) = self.inflight.front() {
            if front.seq >= next_seq {
                break;
            }
            self.outstanding -= front.cost;
            if front.kind != Kind::End {
                covered += front.len;
            }
            self.inflight.pop_front();
        }
        Ok(covered)
    }

    pub fn set_limit(&mut self, limit: u64) {
        self.limit = limit.clamp(MIN_FRAME_COST, MAX_WINDOW);
    }

    /// The outstanding frame `seq`, if it is still outstanding.
    pub fn get_mut(&mut self, seq: u64) -> Option<&mut Sent> {
        let first = self.inflight.front()?.seq;
        let at = usize::try_from(seq.checked_sub(first)?).ok()?;
        self.inflight.get_mut(at).filter(|s| s.seq == seq)
    }

    /// Frames at or above `received` (the receiver has not seen them) sent longer than
    /// `rto` ago: lost in flight, or the tail of the stream was.
    pub fn overdue(&self, received: u64, rto: Duration) -> Vec<u64> {
        self.inflight
            .iter()
            .filter(|s| s.seq >= received && s.last_sent.elapsed() >= rto)
            .map(|s| s.seq)
            .collect()
    }

    /// Forget everything outstanding (the transfer restarts from a resume point).
    pub fn clear(&mut self) {
        self.inflight.clear();
        self.outstanding = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(w: &mut Window, seq: u64, cost: u64) {
        w.sent(seq, Kind::Data, seq * 10, 10, cost);
    }

    #[test]
    fn never_exceeds_limit() {
        let mut w = Window::new(4 * MIN_FRAME_COST);
        let mut seq = 0;
        while w.can_send(MIN_FRAME_COST) {
            send(&mut w, seq, MIN_FRAME_COST);
            seq += 1;
        }
        assert_eq!(seq, 4);
        assert_eq!(w.outstanding(), 4 * MIN_FRAME_COST);
        assert_eq!(w.ack(2, seq).unwrap(), 20);
        assert!(w.can_send(2 * MIN_FRAME_COST));
        assert!(!w.can_send(3 * MIN_FRAME_COST));
    }

    #[test]
    fn oversized_frame_moves_alone() {
        let mut w = Window::new(MIN_FRAME_COST);
        assert!(w.can_send(10 * MIN_FRAME_COST));
        send(&mut w, 0, 10 * MIN_FRAME_COST);
        assert!(!w.can_send(MIN_FRAME_COST));
    }

    #[test]
    fn stale_and_bogus_acks() {
        let mut w = Window::new(MAX_WINDOW);
        for s in 0..3 {
            send(&mut w, s, frame_cost(1));
        }
        assert_eq!(w.ack(2, 3).unwrap(), 20);
        assert_eq!(w.ack(1, 3).unwrap(), 0);
        assert!(w.ack(9, 3).is_err());
    }

    #[test]
    fn outstanding_frames_can_be_found_and_are_overdue_after_rto() {
        let mut w = Window::new(MAX_WINDOW);
        for s in 5..9 {
            send(&mut w, s, MIN_FRAME_COST);
        }
        assert_eq!(w.get_mut(7).map(|s| s.offset), Some(70));
        assert!(w.get_mut(4).is_none() && w.get_mut(9).is_none());
        assert_eq!(w.overdue(7, Duration::ZERO), vec![7, 8]);
        assert!(w.overdue(0, Duration::from_secs(60)).is_empty());
        w.clear();
        assert!(w.is_empty() && w.outstanding() == 0);
    }

    #[test]
    fn queue_bound_covers_window() {
        assert!(max_frames_in_window(MAX_WINDOW) as u64 * MIN_FRAME_COST >= MAX_WINDOW);
    }
}
