//! How fast this device really runs its share of the plan, for the balancer:
//! the execution actor times every decode step of its segments and the
//! planning actor compares the average with what the device's profile
//! promised. Also `--throttle`, a test aid that makes a device behave like a
//! slower phone by stretching the time each segment step takes.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Decode steps of every local segment needed before a pace is reported.
pub const MIN_SAMPLES: u32 = 6;

/// `--throttle`: every segment step takes `factor` times as long as it
/// computes (1 = full speed). Shared by the runner and the control socket.
#[derive(Debug)]
pub struct Throttle(AtomicU64);

impl Throttle {
    pub fn new(factor: f64) -> Throttle {
        Throttle(AtomicU64::new(factor.to_bits()))
    }

    pub fn factor(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }

    pub fn set(&self, factor: f64) {
        self.0.store(factor.to_bits(), Ordering::Relaxed);
    }

    /// Sleeps so that work that took `worked` takes `factor` times as long.
    pub fn stretch(&self, worked: Duration) {
        std::thread::sleep(self.stretched(worked).saturating_sub(worked));
    }

    /// How long work that took `worked` takes on the device this one plays.
    pub fn stretched(&self, worked: Duration) -> Duration {
        worked.mul_f64(self.factor().max(1.0))
    }
}

/// A throttle factor from the command line or the control socket.
pub fn parse_factor(text: &str) -> Result<f64, String> {
    let factor: f64 =
        text.parse().map_err(|_| format!("`{text}` is not a number; give a factor such as 2 (twice as slow)"))?;
    if !(1.0..=1000.0).contains(&factor) {
        return Err(format!("the throttle factor must be between 1 (full speed) and 1000, not {factor}"));
    }
    Ok(factor)
}

/// `llnode throttle FACTOR`: sets the running node's throttle.
pub fn cli(data_dir: &std::path::Path, factor: f64) -> anyhow::Result<()> {
    use crate::control::{LocalRequest, LocalResponse};
    match crate::runtime()?.block_on(crate::control::call(data_dir, LocalRequest::Throttle { factor }))? {
        LocalResponse::Throttled { was } => {
            crate::outln!("throttle {was} -> {factor}");
            Ok(())
        }
        other => anyhow::bail!("unexpected answer from the node: {other:?}"),
    }
}

/// Measured seconds per decoded token of this device's segments.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Pace {
    /// The plan epoch measured.
    pub epoch: u64,
    /// The units this device ran.
    pub units: Vec<Range<usize>>,
    /// Seconds per token for all of them together.
    pub secs_per_token: f64,
    /// The same from each segment's fastest step: when even that is slow,
    /// every step of the window was (it did not straddle a change).
    #[serde(default)]
    pub fastest_secs_per_token: f64,
    /// Decode steps behind the figure (the fewest of any one segment).
    pub samples: u32,
    /// Queue depth: steps whose inputs were all in, waiting for a segment of
    /// this device as each of its steps ended (the mean over the window, summed
    /// over segments). A stage that holds up the pipeline has a queue; one
    /// that keeps up has none.
    pub queue: f64,
}

impl std::fmt::Display for Pace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let units: Vec<String> = self.units.iter().map(|u| format!("{}..{}", u.start, u.end)).collect();
        write!(
            f,
            "{:.2} ms/token on units {} over {} steps, queue depth {:.1} (epoch {})",
            self.secs_per_token * 1e3,
            units.join(" and "),
            self.samples,
            self.queue,
            self.epoch
        )
    }
}

/// Decode-step timings since the last report, per local segment.
#[derive(Default)]
pub struct PaceWindow {
    epoch: u64,
    /// Segment index → (its units, seconds, steps, steps queued summed over steps, fastest step).
    segments: BTreeMap<usize, (Range<usize>, f64, u32, u64, f64)>,
}

impl PaceWindow {
    /// Starts over for a new plan.
    pub fn reset(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.segments.clear();
    }

    /// A decode step of `segment` took `secs`; `queued` steps waited for it as it ended.
    pub fn record(&mut self, segment: usize, units: Range<usize>, secs: f64, queued: usize) {
        let entry = self.segments.entry(segment).or_insert((units, 0.0, 0, 0, f64::INFINITY));
        entry.1 += secs;
        entry.2 += 1;
        entry.3 += queued as u64;
        entry.4 = entry.4.min(secs);
    }

    /// The pace so far, once every segment has [`MIN_SAMPLES`] steps; the window then starts over.
    pub fn take(&mut self) -> Option<Pace> {
        let samples = self.segments.values().map(|(_, _, n, _, _)| *n).min()?;
        if samples < MIN_SAMPLES {
            return None;
        }
        let pace = Pace {
            epoch: self.epoch,
            units: self.segments.values().map(|(u, _, _, _, _)| u.clone()).collect(),
            secs_per_token: self.segments.values().map(|(_, secs, n, _, _)| secs / *n as f64).sum(),
            fastest_secs_per_token: self.segments.values().map(|(_, _, _, _, fastest)| fastest).sum(),
            samples,
            queue: self.segments.values().map(|(_, _, n, q, _)| *q as f64 / *n as f64).sum(),
        };
        self.segments.clear();
        Some(pace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pace_needs_enough_steps_of_every_segment() {
        let mut w = PaceWindow::default();
        w.reset(3);
        for _ in 0..MIN_SAMPLES {
            w.record(0, 0..2, 0.010, 0);
        }
        w.record(2, 4..6, 0.030, 2);
        assert_eq!(w.take(), None, "segment 2 has one step");
        for _ in 1..MIN_SAMPLES {
            w.record(2, 4..6, 0.030, 1);
        }
        let pace = w.take().unwrap();
        assert_eq!(pace.epoch, 3);
        assert_eq!(pace.units, vec![0..2, 4..6]);
        assert!((pace.secs_per_token - 0.040).abs() < 1e-12);
        assert!((pace.fastest_secs_per_token - 0.040).abs() < 1e-12);
        // Segment 0 never had a queue; segment 2 had 2, then 1 for five steps.
        assert!((pace.queue - 7.0 / MIN_SAMPLES as f64).abs() < 1e-12, "{}", pace.queue);
        assert!(pace.to_string().contains("queue depth 1.2"), "{pace}");
        assert_eq!(w.take(), None, "the window starts over");
    }

    #[test]
    fn throttle_factors_are_checked() {
        assert_eq!(parse_factor("2"), Ok(2.0));
        assert!(parse_factor("0.5").unwrap_err().contains("between 1"));
        assert!(parse_factor("fast").unwrap_err().contains("not a number"));
        let t = Throttle::new(1.0);
        t.set(3.0);
        assert_eq!(t.factor(), 3.0);
    }

    #[test]
    fn a_throttle_stretches_work_and_never_shrinks_it() {
        let worked = Duration::from_millis(10);
        assert_eq!(Throttle::new(3.0).stretched(worked), Duration::from_millis(30));
        assert_eq!(Throttle::new(1.0).stretched(worked), worked);
        assert_eq!(Throttle::new(0.5).stretched(worked), worked);
        let started = std::time::Instant::now();
        Throttle::new(2.0).stretch(worked);
        assert!(started.elapsed() >= worked, "slept {:?} of the 10 ms more", started.elapsed());
    }
}
