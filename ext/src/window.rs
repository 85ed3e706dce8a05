//! The sender's byte-counted flow-control window.
//!
//! The receiver grants a window in bytes; the sender never has more than that outstanding
//! (sent but not acknowledged as written). Each frame costs its payload, but at least
//! `MIN_FRAME_COST`, so payload-less zero frames are bounded in number too: that keeps
//! async-nats's message-counted queues within `max_frames_in_window`.

use std::collections::VecDeque;

pub const MIN_FRAME_COST: u64 = 64 * 1024;
/// Largest window a receiver grants: well under nats-server's 64 MiB `max_pending`
/// (publishers stall at 75% of it), since the whole window may sit in the server.
pub const MAX_WINDOW: u64 = 48 * 1024 * 1024;
pub const DEFAULT_WINDOW: u64 = 32 * 1024 * 1024;

pub fn frame_cost(payload_len: u64) -> u64 {
    payload_len.max(MIN_FRAME_COST)
}

/// How many frames can be in a window at most; sizes async-nats's queues.
pub fn max_frames_in_window(window: u64) -> usize {
    (window / MIN_FRAME_COST) as usize + 1
}

#[derive(Debug)]
struct Sent {
    seq: u64,
    cost: u64,
    covered: u64,
}

#[derive(Debug)]
pub struct Window {
    limit: u64,
    outstanding: u64,
    next_acked: u64,
    inflight: VecDeque<Sent>,
}

impl Window {
    pub fn new(limit: u64) -> Window {
        Window {
            limit,
            outstanding: 0,
            next_acked: 0,
            inflight: VecDeque::new(),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn outstanding(&self) -> u64 {
        self.outstanding
    }

    /// One frame may always be outstanding, so a frame larger than the window still moves.
    pub fn can_send(&self, cost: u64) -> bool {
        self.outstanding == 0 || self.outstanding + cost <= self.limit
    }

    pub fn sent(&mut self, seq: u64, cost: u64, covered: u64) {
        self.outstanding += cost;
        self.inflight.push_back(Sent { seq, cost, covered });
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
            covered += front.covered;
            self.inflight.pop_front();
        }
        self.next_acked = self.next_acked.max(next_seq);
        Ok(covered)
    }

    pub fn set_limit(&mut self, limit: u64) {
        self.limit = limit.clamp(MIN_FRAME_COST, MAX_WINDOW);
    }

    pub fn next_acked(&self) -> u64 {
        self.next_acked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_exceeds_limit() {
        let mut w = Window::new(4 * MIN_FRAME_COST);
        let mut seq = 0;
        while w.can_send(MIN_FRAME_COST) {
            w.sent(seq, MIN_FRAME_COST, 10);
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
        w.sent(0, 10 * MIN_FRAME_COST, 1);
        assert!(!w.can_send(MIN_FRAME_COST));
    }

    #[test]
    fn stale_and_bogus_acks() {
        let mut w = Window::new(MAX_WINDOW);
        for s in 0..3 {
            w.sent(s, frame_cost(1), 1);
        }
        assert_eq!(w.ack(2, 3).unwrap(), 2);
        assert_eq!(w.ack(1, 3).unwrap(), 0);
        assert!(w.ack(9, 3).is_err());
        assert_eq!(w.next_acked(), 2);
    }

    #[test]
    fn queue_bound_covers_window() {
        assert!(max_frames_in_window(MAX_WINDOW) as u64 * MIN_FRAME_COST >= MAX_WINDOW);
    }
}
