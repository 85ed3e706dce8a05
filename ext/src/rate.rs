//! Rate caps: a token bucket in front of the data frames a sender publishes.
//!
//! The bucket counts debt in bytes rather than a time of next departure, so a cap changed
//! mid-transfer (`Transfer.set_rate`) applies to what is still owed at once, at the new
//! rate. A frame of `n` bytes may go while the debt is at most `n`: the sender runs ahead
//! of the cap by at most one frame (one chunk), and a sleep that overshoots is not lost
//! (the debt it paid off is still counted), so the average rate is the cap, not below it.

use std::time::{Duration, Instant};

/// The highest cap a transfer takes, in bytes per second (1 TiB/s): beyond any link, and
/// far enough from `u64`'s end that no arithmetic on it overflows.
pub const MAX_RATE: u64 = 1 << 40;

/// Bytes owed to the cap, paid off at the cap's rate as time passes.
#[derive(Debug, Default)]
pub struct Bucket {
    debt: f64,
    last: Option<Instant>,
}

impl Bucket {
    /// May `n` bytes go at `now` under a cap of `rate` bytes/s (0: no cap)? `None`: yes,
    /// and they are counted; otherwise how long until they may (ask again then: the cap
    /// may have changed meanwhile).
    pub fn take(&mut self, now: Instant, rate: u64, n: u64) -> Option<Duration> {
        let last = self.last.replace(now).unwrap_or(now);
        if n == 0 {
            return None; // nothing to pay for
        }
        if rate == 0 {
            // Uncapped: a cap set later starts from nothing owed.
            self.debt = 0.0;
            return None;
        }
        let rate = rate.min(MAX_RATE) as f64;
        let paid = now.saturating_duration_since(last).as_secs_f64() * rate;
        self.debt = (self.debt - paid).max(0.0);
        let n = n as f64;
        if self.debt <= n {
            self.debt += n;
            return None;
        }
        // Finite and positive: debt > n >= 0 and rate >= 1.
        Some(Duration::try_from_secs_f64((self.debt - n) / rate).unwrap_or(Duration::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Send `frames` frames of `n` bytes as fast as the bucket lets them, on a fake clock
    /// that wakes `late` after each wait; returns when the last one went, from the start.
    fn run(
        bucket: &mut Bucket,
        start: Instant,
        rate: u64,
        n: u64,
        frames: u64,
        late: Duration,
    ) -> Duration {
        let mut now = start;
        for _ in 0..frames {
            while let Some(wait) = bucket.take(now, rate, n) {
                now += wait + late;
            }
        }
        now - start
    }

    #[test]
    fn uncapped_never_waits() {
        let mut b = Bucket::default();
        let t = Instant::now();
        for _ in 0..1000 {
            assert_eq!(b.take(t, 0, MIB), None);
        }
    }

    #[test]
    fn a_cap_holds_the_average_rate() {
        // 256 MiB in 1 MiB frames at 50 MiB/s: the first two go at once (one chunk of
        // burst), the rest at the cap: 254 frames' worth of waiting.
        let mut b = Bucket::default();
        let took = run(&mut b, Instant::now(), 50 * MIB, MIB, 256, Duration::ZERO);
        let want = 254.0 / 50.0;
        assert!((took.as_secs_f64() - want).abs() < 1e-3, "{took:?}");
    }

    #[test]
    fn late_wakeups_are_not_lost() {
        // Timers fire late; what accrued meanwhile pays the next frame, so the average
        // stays at the cap as long as the lateness is below one frame's time (20 ms here).
        let mut b = Bucket::default();
        let took = run(
            &mut b,
            Instant::now(),
            50 * MIB,
            MIB,
            256,
            Duration::from_millis(3),
        );
        let want = 254.0 / 50.0;
        assert!(took.as_secs_f64() - want < 0.03, "{took:?}");
    }

    #[test]
    fn burst_is_bounded_by_one_frame() {
        // After a long idle spell the bucket does not save up: two frames at once, then
        // the third waits a frame's time.
        let mut b = Bucket::default();
        let t0 = Instant::now();
        assert_eq!(b.take(t0, MIB, MIB), None);
        let t1 = t0 + Duration::from_secs(3600);
        assert_eq!(b.take(t1, MIB, MIB), None);
        assert_eq!(b.take(t1, MIB, MIB), None);
        let wait = b.take(t1, MIB, MIB).expect("third frame waits");
        assert!((wait.as_secs_f64() - 1.0).abs() < 1e-9, "{wait:?}");
    }

    #[test]
    fn a_new_cap_applies_to_what_is_owed() {
        // 10 frames owed at 1 MiB/s would take 9 s; raised to 100 MiB/s they take 0.09 s.
        let mut b = Bucket::default();
        let t = Instant::now();
        for _ in 0..2 {
            assert_eq!(b.take(t, MIB, MIB), None);
        }
        let slow = b.take(t, MIB, MIB).expect("waits");
        assert!((slow.as_secs_f64() - 1.0).abs() < 1e-9);
        let fast = b.take(t, 100 * MIB, MIB).expect("waits less");
        assert!((fast.as_secs_f64() - 0.01).abs() < 1e-9, "{fast:?}");
        // Lifting the cap lets everything go and forgets the debt.
        assert_eq!(b.take(t, 0, MIB), None);
        assert_eq!(b.take(t, MIB, MIB), None);
    }

    #[test]
    fn empty_frames_never_wait() {
        let mut b = Bucket::default();
        let t = Instant::now();
        for _ in 0..5 {
            let _ = b.take(t, MIB, MIB);
        }
        assert!(b.take(t, MIB, MIB).is_some());
        assert_eq!(b.take(t, MIB, 0), None);
    }

    #[test]
    fn huge_caps_do_not_overflow() {
        let mut b = Bucket::default();
        let t = Instant::now();
        assert_eq!(b.take(t, u64::MAX, u64::MAX), None);
        let _ = b.take(t + Duration::from_secs(1), u64::MAX, u64::MAX);
    }
}
