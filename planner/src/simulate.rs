//! Replays a plan on device profiles, token by token, with several
//! sequences in flight, and reports per-token latency and pipelined
//! throughput.
//!
//! The model of a device: one worker that, for each token of each sequence
//! reaching one of its stages, computes the stage's units, then sends the
//! skip tensors it produces and the boundary tensor to the next stage (the
//! last stage sends the sampled token back to the first), each message
//! costing bytes over bandwidth plus a round trip. Tokens wait their turn in
//! arrival order. A sequence's next token enters the first stage when its
//! previous token comes back. Receiving costs nothing.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::Config;
use crate::cost::ModelCost;
use crate::instance::Instance;
use crate::plan::{Plan, PlanCheckError, PlanError};
use crate::profile::DeviceProfile;

/// Tokens each sequence decodes in a simulation; the first quarter warms the
/// pipeline up and is not measured.
pub const TOKENS: usize = 64;

/// What a replay measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Simulation {
    pub sequences: usize,
    /// Mean seconds between two tokens of one sequence.
    pub latency_s: f64,
    /// Tokens per second over all sequences.
    pub tokens_per_s: f64,
    /// Share of the measured time each stage's device was busy, by stage.
    pub utilisation: Vec<f64>,
}

/// Why a plan could not be replayed.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum SimulateError {
    #[error("the devices cannot be costed: {0}")]
    Devices(#[from] PlanError),
    #[error("the plan does not fit the model and devices: {0}")]
    Plan(#[from] PlanCheckError),
    #[error("stage {stage} runs on '{device}', which may take no work (left out: low battery or overheating)")]
    Unavailable { stage: usize, device: String },
    #[error("a simulation needs at least one sequence")]
    NoSequences,
}

/// Replays `plan` with `sequences` sequences decoding at once.
pub fn simulate(
    plan: &Plan,
    model: &ModelCost,
    devices: &[DeviceProfile],
    config: &Config,
    sequences: usize,
) -> Result<Simulation, SimulateError> {
    if sequences == 0 {
        return Err(SimulateError::NoSequences);
    }
    plan.check(model, devices)?;
    let config = Config { privacy: None, ..config.clone() };
    let instance = Instance::new(model, devices, &config)?;
    let mut stages = Vec::with_capacity(plan.stages.len());
    for (i, stage) in plan.stages.iter().enumerate() {
        let d = instance
            .ids
            .iter()
            .position(|id| *id == stage.device)
            .ok_or_else(|| SimulateError::Unavailable { stage: i, device: stage.device.clone() })?;
        stages.push((d, stage.units.clone()));
    }
    // Costs per stage: the replay takes them from the same tables as every
    // solver, so that they agree; what it adds is the queueing.
    let evaluation = instance.evaluate(&stages);
    let busy: Vec<f64> = evaluation.compute.iter().zip(&evaluation.send).map(|(c, s)| c + s).collect();
    Ok(replay(&stages.iter().map(|(d, _)| *d).collect::<Vec<_>>(), &busy, instance.devices(), sequences))
}

/// A token of a sequence ready for a stage at a time.
#[derive(PartialEq)]
struct Job {
    ready: f64,
    sequence: usize,
    token: usize,
    stage: usize,
}

impl Eq for Job {}

impl Ord for Job {
    fn cmp(&self, other: &Self) -> Ordering {
        // Earliest first (BinaryHeap is a max-heap), ties by sequence.
        other.ready.total_cmp(&self.ready).then(other.sequence.cmp(&self.sequence)).then(other.stage.cmp(&self.stage))
    }
}

impl PartialOrd for Job {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Event-driven replay: stage `i` runs on `device_of[i]` for `busy[i]`
/// seconds per token. Throughput and utilisation are measured while every
/// sequence is past its warm-up and none has finished.
fn replay(device_of: &[usize], busy: &[f64], devices: usize, sequences: usize) -> Simulation {
    let stages = device_of.len();
    let warm = TOKENS / 4;
    let mut free = vec![0.0f64; devices];
    let mut queue: BinaryHeap<Job> =
        (0..sequences).map(|sequence| Job { ready: 0.0, sequence, token: 0, stage: 0 }).collect();
    // When each sequence's tokens came back to the first stage, and when
    // each stage worked.
    let mut done = vec![Vec::with_capacity(TOKENS); sequences];
    let mut work: Vec<(usize, f64, f64)> = Vec::new();
    while let Some(job) = queue.pop() {
        let d = device_of[job.stage];
        let start = job.ready.max(free[d]);
        let end = start + busy[job.stage];
        free[d] = end;
        work.push((job.stage, start, end));
        if job.stage + 1 < stages {
            queue.push(Job { ready: end, stage: job.stage + 1, ..job });
            continue;
        }
        done[job.sequence].push(end);
        if job.token + 1 < TOKENS {
            queue.push(Job { ready: end, token: job.token + 1, stage: 0, ..job });
        }
    }
    let measured = (TOKENS - warm) as f64;
    let latency_s =
        done.iter().map(|times| (times[TOKENS - 1] - times[warm - 1]) / measured).sum::<f64>() / sequences as f64;
    let from = done.iter().map(|t| t[warm - 1]).fold(0.0, f64::max);
    let to = done.iter().map(|t| t[TOKENS - 1]).fold(f64::INFINITY, f64::min);
    let (tokens_per_s, span) = if to > from {
        let count = done.iter().flatten().filter(|&&t| t > from && t <= to).count();
        (count as f64 / (to - from), to - from)
    } else {
        (sequences as f64 / latency_s, f64::MIN_POSITIVE)
    };
    let mut utilisation = vec![0.0; stages];
    for (stage, start, end) in work {
        utilisation[stage] += (end.min(to) - start.max(from)).max(0.0) / span;
    }
    Simulation {
        sequences,
        latency_s,
        tokens_per_s,
        utilisation: utilisation.into_iter().map(|u| u.min(1.0)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assign;
    use crate::instance::tests::{devices, model};

    #[test]
    fn one_sequence_runs_at_the_plan_latency() {
        let plan = assign::plan(&model(), &devices(), &Config::default()).unwrap();
        let sim = simulate(&plan, &model(), &devices(), &Config::default(), 1).unwrap();
        assert!((sim.latency_s - plan.latency_s).abs() < 1e-9, "{sim:?}");
        assert!((sim.tokens_per_s - 1.0 / plan.latency_s).abs() < 1e-6);
    }

    #[test]
    fn many_sequences_run_at_the_slowest_stage() {
        let plan = assign::plan(&model(), &devices(), &Config::default()).unwrap();
        let sim = simulate(&plan, &model(), &devices(), &Config::default(), 8).unwrap();
        let bound = 1.0 / plan.bottleneck_s;
        assert!((sim.tokens_per_s - bound).abs() / bound < 0.02, "{sim:?} vs {bound}");
        // The busiest device is busy nearly all the time.
        assert!(sim.utilisation.iter().any(|u| *u > 0.97), "{sim:?}");
    }

    #[test]
    fn bad_plans_are_errors() {
        let mut plan = assign::plan(&model(), &devices(), &Config::default()).unwrap();
        assert_eq!(simulate(&plan, &model(), &devices(), &Config::default(), 0), Err(SimulateError::NoSequences));
        plan.stages.pop();
        assert!(matches!(simulate(&plan, &model(), &devices(), &Config::default(), 1), Err(SimulateError::Plan(_))));
    }

    #[test]
    fn a_device_with_two_stages_serves_both() {
        // Stage 0 and 2 on device 0 (1 s each), stage 1 on device 1 (1 s):
        // one sequence takes 3 s per token; many are held to device 0's 2 s.
        let one = replay(&[0, 1, 0], &[1.0, 1.0, 1.0], 2, 1);
        assert!((one.latency_s - 3.0).abs() < 1e-9);
        let many = replay(&[0, 1, 0], &[1.0, 1.0, 1.0], 2, 6);
        assert!((many.tokens_per_s - 0.5).abs() < 0.02, "{many:?}");
    }
}
