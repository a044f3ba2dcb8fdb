//! Blocks: maximal runs of interchangeable units. Two neighbouring units are
//! interchangeable when they cost the same on every device, need the same
//! memory, hand on the same bytes and read the same skip tensors, and
//! neither makes one. Which of them a device runs then does not matter,
//! only how many, so the program counts units per block instead of
//! deciding each one. The first and last units are always blocks of their
//! own (the token's trip back and privacy pin them).
//!
//! Measured times of identical layers differ by noise. [`smooth`] treats
//! neighbouring units whose times agree within a tolerance as alike, giving
//! each the run's mean time, so that they form one block.

use std::ops::Range;

use crate::instance::Instance;

/// Runs shorter than this stay single units: a block costs the program a
/// binary arc between every two devices inside it and an ordering of them,
/// which only pays off once it stands for a few units.
const SHORTEST_BLOCK: usize = 4;

/// The blocks of `instance`, in order, covering every unit.
pub(crate) fn blocks(instance: &Instance) -> Vec<Range<usize>> {
    let units = instance.units;
    let mut runs: Vec<Range<usize>> = Vec::new();
    for u in 0..units {
        match runs.last_mut() {
            Some(run) if alike(instance, u - 1, u) => run.end = u + 1,
            _ => runs.push(u..u + 1),
        }
    }
    runs.into_iter()
        .flat_map(|run| if run.len() >= SHORTEST_BLOCK { vec![run] } else { run.map(|u| u..u + 1).collect() })
        .collect()
}

/// `instance` with each run of neighbouring units that are alike but for
/// their times, whose times spread by at most `tolerance` of the run's mean
/// on every device, given that mean time. Runs are grown greedily from the
/// left, which gives the fewest runs (a sub-run of a run that qualifies
/// qualifies too, up to the shift of its mean).
pub(crate) fn smooth(instance: &Instance, tolerance: f64) -> Instance {
    if tolerance.is_nan() || tolerance <= 0.0 {
        return instance.clone();
    }
    let units = instance.units;
    let mut compute = instance.compute.clone();
    let mut start = 0;
    while start < units {
        let mut end = start + 1;
        while end < units && alike_but_time(instance, end - 1, end) && within(instance, start..end + 1, tolerance) {
            end += 1;
        }
        for (row, times) in compute.iter_mut().zip(&instance.compute) {
            let run = &times[start..end];
            // Equal times stay exactly as they are.
            if run.iter().any(|t| t.to_bits() != run[0].to_bits()) {
                let mean = run.iter().sum::<f64>() / run.len() as f64;
                row[start..end].iter_mut().for_each(|t| *t = mean);
            }
        }
        start = end;
    }
    instance.with_compute(compute)
}

/// Whether the times of `run` spread (slowest less fastest) by at most
/// `tolerance` of their mean on every device.
fn within(instance: &Instance, run: Range<usize>, tolerance: f64) -> bool {
    instance.compute.iter().all(|times| {
        let slice = &times[run.clone()];
        let mean = slice.iter().sum::<f64>() / slice.len() as f64;
        let (low, high) = slice.iter().fold((f64::INFINITY, 0.0f64), |(l, h), t| (l.min(*t), h.max(*t)));
        high - low <= tolerance * mean
    })
}

fn alike(instance: &Instance, a: usize, b: usize) -> bool {
    alike_but_time(instance, a, b) && instance.compute.iter().all(|row| row[a].to_bits() == row[b].to_bits())
}

fn alike_but_time(instance: &Instance, a: usize, b: usize) -> bool {
    let last = instance.units - 1;
    a != 0
        && b != last
        && instance.need[a] == instance.need[b]
        && instance.out[a] == instance.out[b]
        && instance.skips.iter().all(|s| {
            s.producer != a
                && s.producer != b
                && s.consumers.binary_search(&a).is_ok() == s.consumers.binary_search(&b).is_ok()
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::cost::{ModelCost, TransformerShape};
    use crate::phone;

    #[test]
    fn a_transformer_is_prologue_layers_epilogue() {
        let model = ModelCost::transformer(&TransformerShape::tiny_llama());
        let devices = phone::mesh(&[phone::PIXEL_7, phone::REDMI_9A]);
        let instance = Instance::new(&model, &devices, &Config::default()).unwrap();
        assert_eq!(blocks(&instance), vec![0..1, 1..23, 23..24]);
    }

    #[test]
    fn short_runs_stay_single_units() {
        let model = ModelCost::transformer(&TransformerShape { layers: 3, ..TransformerShape::tiny_llama() });
        let devices = phone::mesh(&[phone::PIXEL_7]);
        let instance = Instance::new(&model, &devices, &Config::default()).unwrap();
        assert_eq!(blocks(&instance), vec![0..1, 1..2, 2..3, 3..4, 4..5]);
    }

    #[test]
    fn a_measured_difference_splits_a_block() {
        let model = ModelCost::transformer(&TransformerShape::tiny_llama());
        let mut devices = phone::mesh(&[phone::PIXEL_7, phone::REDMI_9A]);
        let mut times: Vec<f64> = (0..24).map(|u| devices[0].compute_s(u, &model.units[u])).collect();
        times[10] *= 1.5;
        devices[0].unit_time_s = Some(times);
        let instance = Instance::new(&model, &devices, &Config::default()).unwrap();
        assert_eq!(blocks(&instance), vec![0..1, 1..10, 10..11, 11..23, 23..24]);
        // Within a 60% spread the odd layer joins the others, at the mean time.
        let smoothed = smooth(&instance, 0.6);
        assert_eq!(blocks(&smoothed), vec![0..1, 1..23, 23..24]);
        let total = |i: &Instance| i.range_compute(0, &(1..23));
        assert!((total(&smoothed) - total(&instance)).abs() < 1e-12);
        assert_eq!(blocks(&smooth(&instance, 0.0)), blocks(&instance));
    }
}
