//! What the probes know of a device its pace slowed: the probe taken then,
//! how long they hold off, and whether the last one found it faster. Kept
//! apart from the actor so that when a probe may recover a device, and how
//! a device that flaps is held off, can be tested without a mesh.

use std::time::{Duration, Instant};

/// Probes wait this long after the pace slowed a device ...
const HOLD: Duration = Duration::from_secs(2);
/// ... doubled each time the pace undoes their recovery within
/// [`FLAPPING`], up to this.
const MAX_HOLD: Duration = Duration::from_secs(300);
/// A slowdown this soon after a probe's recovery undoes it.
const FLAPPING: Duration = Duration::from_secs(120);

pub(super) struct Recovery {
    /// The probe when the pace last slowed this device (or, after a
    /// partial recovery, when the probes last re-profiled it); none when it
    /// is not slowed.
    before: Option<Duration>,
    /// When the pace last slowed it, and how long after that probes wait.
    slowed: Instant,
    hold: Duration,
    /// When probes last re-profiled it.
    recovered: Option<Instant>,
    /// The last probe found it faster by the threshold.
    faster: bool,
}

impl Recovery {
    pub(super) fn new(now: Instant) -> Recovery {
        Recovery { before: None, slowed: now, hold: HOLD, recovered: None, faster: false }
    }

    /// The pace slowed this device at `now`, when the probe took `probe`.
    pub(super) fn slowed(&mut self, now: Instant, probe: Duration) {
        if self.recovered.is_some_and(|at| now.saturating_duration_since(at) < FLAPPING) {
            self.hold = (self.hold * 2).min(MAX_HOLD);
        }
        (self.before, self.slowed, self.faster) = (Some(probe), now, false);
    }

    /// The pace found this device faster than its profile: nothing is left for probes.
    pub(super) fn sped_up(&mut self) {
        (self.before, self.faster) = (None, false);
    }

    /// Whether a probe may run at `now` (the actor also waits until no pace judged the device for a while).
    pub(super) fn due(&self, now: Instant) -> bool {
        self.before.is_some() && now.saturating_duration_since(self.slowed) >= self.hold
    }

    /// A probe took `probe`: the probe to compare it with when it is the
    /// second in a row faster by `threshold`, for planning to re-profile the device.
    pub(super) fn probed(&mut self, probe: Duration, threshold: f64) -> Option<Duration> {
        let before = self.before?;
        let faster = probe.as_secs_f64() / before.as_secs_f64() <= 1.0 / threshold;
        let second = faster && self.faster;
        self.faster = faster && !second;
        second.then_some(before)
    }

    /// Planning re-profiled the device at `now` from `probe`: it is now
    /// `slowdown` times slower than its first measure. Still slower by
    /// `threshold`, a further recovery is measured from this probe.
    pub(super) fn recovered(&mut self, now: Instant, probe: Duration, slowdown: f64, threshold: f64) {
        self.recovered = Some(now);
        self.before = (slowdown >= threshold).then_some(probe);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn two_faster_probes_in_a_row_recover_a_device() {
        let t0 = Instant::now();
        let mut r = Recovery::new(t0);
        assert!(!r.due(t0 + HOLD), "never slowed: nothing to probe");
        assert_eq!(r.probed(MS, 1.5), None);
        r.slowed(t0, 20 * MS);
        assert!(!r.due(t0 + HOLD / 2) && r.due(t0 + HOLD));
        // Not faster by the threshold, then faster once: no recovery yet.
        assert_eq!(r.probed(15 * MS, 1.5), None);
        assert_eq!(r.probed(MS, 1.5), None);
        // A slower probe in between starts over.
        assert_eq!(r.probed(20 * MS, 1.5), None);
        assert_eq!(r.probed(MS, 1.5), None);
        assert_eq!(r.probed(MS, 1.5), Some(20 * MS));
        // Back within its first measure: no more probes.
        r.recovered(t0 + 10 * HOLD, MS, 1.0, 1.5);
        assert!(!r.due(t0 + 20 * HOLD));
    }

    #[test]
    fn a_partial_recovery_is_the_next_ones_baseline() {
        let t0 = Instant::now();
        let mut r = Recovery::new(t0);
        r.slowed(t0, 40 * MS);
        r.probed(10 * MS, 1.5);
        assert_eq!(r.probed(10 * MS, 1.5), Some(40 * MS));
        // Still 4x slower than at first: further probes compare with 10 ms.
        r.recovered(t0 + HOLD, 10 * MS, 4.0, 1.5);
        assert!(r.due(t0 + 2 * HOLD));
        assert_eq!(r.probed(8 * MS, 1.5), None, "not faster than 10 ms by 1.5x");
        r.probed(MS, 1.5);
        assert_eq!(r.probed(MS, 1.5), Some(10 * MS));
    }

    #[test]
    fn a_device_that_flaps_is_held_off_longer_each_time() {
        let t0 = Instant::now();
        let mut r = Recovery::new(t0);
        r.slowed(t0, 20 * MS);
        r.recovered(t0 + HOLD, MS, 1.0, 1.5);
        // The pace slows it again a minute later: its probes now wait twice as long.
        let t1 = t0 + Duration::from_secs(60);
        r.slowed(t1, 20 * MS);
        assert!(!r.due(t1 + HOLD) && r.due(t1 + 2 * HOLD));
        // Again and again: up to MAX_HOLD.
        let mut t = t1;
        for _ in 0..20 {
            r.recovered(t, MS, 1.0, 1.5);
            t += Duration::from_secs(1);
            r.slowed(t, 20 * MS);
        }
        assert!(!r.due(t + MAX_HOLD - MS) && r.due(t + MAX_HOLD));
        // A slowdown long after the last recovery does not lengthen the hold.
        let mut r = Recovery::new(t0);
        r.slowed(t0, 20 * MS);
        r.recovered(t0 + HOLD, MS, 1.0, 1.5);
        let later = t0 + HOLD + FLAPPING;
        r.slowed(later, 20 * MS);
        assert!(r.due(later + HOLD));
    }

    #[test]
    fn a_device_the_pace_finds_faster_is_not_probed() {
        let t0 = Instant::now();
        let mut r = Recovery::new(t0);
        r.slowed(t0, 20 * MS);
        r.probed(MS, 1.5);
        r.sped_up();
        assert!(!r.due(t0 + MAX_HOLD));
        assert_eq!(r.probed(MS, 1.5), None);
    }
}
