//! A plan: which device runs which consecutive units, in pipeline order, what
//! it is expected to cost, and how it was found. Checks a plan against the
//! model and the devices, and explains it to a person.

use std::collections::HashMap;
use std::ops::Range;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::Objective;
use crate::cost::{Bytes, ModelCost, ModelCostError};
use crate::profile::DeviceProfile;

/// One pipeline stage: a device and the consecutive units it runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    pub device: String,
    pub device_name: String,
    pub units: Range<usize>,
    /// Seconds per token computing.
    pub compute_s: f64,
    /// Seconds per token sending: the boundary tensor to the next stage (the
    /// token back to the first stage, for the last one) and skip tensors.
    pub send_s: f64,
    /// Memory the stage's units take, KV cache included.
    pub mem_bytes: u64,
    pub mem_capacity_bytes: u64,
}

impl Stage {
    /// Seconds per token the stage is busy.
    pub fn time_s(&self) -> f64 {
        self.compute_s + self.send_s
    }
}

/// A device the planner left out, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Excluded {
    pub device: String,
    pub reason: String,
}

/// How a plan was found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Method {
    /// The mixed-integer program of [`crate::assign`].
    Mip {
        /// The solver proved no plan is better (up to its tolerances).
        proven_optimal: bool,
        /// Relative gap to the best bound when not proven.
        gap: Option<f64>,
        /// Branch-and-bound nodes solved.
        nodes: u64,
        /// Whether the ordered-stage search seeded the solver.
        warm_started: bool,
        /// Whether near-identical units were planned at their mean time
        /// ([`crate::config::Config::interchangeable`]); optimality then holds for
        /// those times.
        smoothed: bool,
        elapsed: Duration,
    },
    /// The MIP found no plan within its time limit; this is the plan of the
    /// ordered-stage search that seeds it, a heuristic.
    Search { elapsed: Duration },
    /// Every order of devices and every cut tried ([`crate::exhaustive`]).
    Exhaustive { plans_tried: u64 },
    /// A rule of thumb ([`crate::baseline`]).
    Baseline { name: String },
}

/// A plan for running a model on a set of devices.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub objective: Objective,
    /// The value of the objective, in seconds.
    pub objective_s: f64,
    /// Expected seconds per token for one sequence.
    pub latency_s: f64,
    /// Expected seconds per token of the busiest device (a device running
    /// two stages is busy for both).
    pub bottleneck_s: f64,
    /// Tokens of context the KV cache memory was reserved for.
    pub context_tokens: u64,
    pub stages: Vec<Stage>,
    /// Copies of other stages' units that devices keep on hand in the
    /// memory their own stages leave, so that a device that leaves can be
    /// replaced without waiting for a transfer.
    #[serde(default)]
    pub spares: Vec<Spare>,
    pub excluded: Vec<Excluded>,
    pub method: Method,
}

/// Units a device keeps for failover without running them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spare {
    pub device: String,
    pub units: Range<usize>,
}

/// Why no plan could be made.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum PlanError {
    #[error("the model's cost figures are unusable: {0}")]
    Model(#[from] ModelCostError),
    #[error("there are no devices to plan for")]
    NoDevices,
    #[error("two devices share the id '{id}'")]
    DuplicateDevice { id: String },
    #[error("device '{device}' cannot be planned for: {reason}")]
    BadDevice { device: String, reason: String },
    #[error(
        "the link from '{from}' to '{to}' has bandwidth {bandwidth} B/s and round trip {rtt} s; both must be finite, the bandwidth above zero"
    )]
    BadLink { from: String, to: String, bandwidth: f64, rtt: f64 },
    #[error("nothing is known about the link between '{from}' and '{to}'; measure it or set Config::assumed_link")]
    NoLink { from: String, to: String },
    #[error("privacy asks to keep the text on '{id}', which is not among the devices")]
    UnknownPrivacyDevice { id: String },
    #[error("every device was left out: {reasons}")]
    AllExcluded { reasons: String },
    #[error(
        "the model needs {need} (weights and a KV cache for {context_tokens} tokens); these devices offer {offer}{detail}"
    )]
    Infeasible { need: Bytes, offer: Bytes, context_tokens: u64, detail: String },
    #[error(
        "exhaustive search takes at most {max_devices} devices and {max_units} units; this instance has {devices} and {units}"
    )]
    TooLarge { devices: usize, units: usize, max_devices: usize, max_units: usize },
    #[error("the solver found no plan within {limit:?}; raise Config::time_limit")]
    TimedOut { limit: Duration },
    #[error("the MIP solver failed: {0}")]
    Solver(String),
}

/// Why a plan does not fit the model or the devices.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum PlanCheckError {
    #[error("the plan has no stages")]
    NoStages,
    #[error("stage {stage} starts at unit {start}, but unit {expected} is next")]
    NotConsecutive { stage: usize, start: usize, expected: usize },
    #[error("stage {stage} runs no units")]
    EmptyStage { stage: usize },
    #[error("the plan covers units 0..{covered} but the model has {units}")]
    WrongCoverage { covered: usize, units: usize },
    #[error("stage {stage} runs on '{device}', which is not among the devices")]
    UnknownDevice { stage: usize, device: String },
    #[error(
        "'{device}' runs two stages; each device runs one range of units, except that the first stage's device may also run the last"
    )]
    RepeatedDevice { device: String },
    #[error("'{device}' would need {need} for units {units:?} but offers {offer}")]
    OutOfMemory { device: String, units: Vec<Range<usize>>, need: Bytes, offer: Bytes },
}

impl Plan {
    /// Who runs what: (device id, units) per stage, in order.
    pub fn assignment(&self) -> Vec<(String, Range<usize>)> {
        self.stages.iter().map(|s| (s.device.clone(), s.units.clone())).collect()
    }

    /// The device that runs the prologue, where each step starts.
    pub fn prologue(&self) -> Option<&str> {
        self.stages.first().map(|s| s.device.as_str())
    }

    /// Verifies that every unit is assigned exactly once, the ranges are
    /// consecutive and in order, each device runs one stage (or, under
    /// privacy, the first and the last), and each device's units fit its
    /// memory with the plan's KV cache reservation.
    pub fn check(&self, model: &ModelCost, devices: &[DeviceProfile]) -> Result<(), PlanCheckError> {
        if self.stages.is_empty() {
            return Err(PlanCheckError::NoStages);
        }
        let last = self.stages.len() - 1;
        let mut next = 0;
        let mut need: HashMap<&str, (u64, Vec<Range<usize>>)> = HashMap::new();
        for (stage, s) in self.stages.iter().enumerate() {
            if s.units.start != next {
                return Err(PlanCheckError::NotConsecutive { stage, start: s.units.start, expected: next });
            }
            if s.units.end <= s.units.start {
                return Err(PlanCheckError::EmptyStage { stage });
            }
            if s.units.end > model.units.len() {
                return Err(PlanCheckError::WrongCoverage { covered: s.units.end, units: model.units.len() });
            }
            let Some(device) = devices.iter().find(|d| d.id == s.device) else {
                return Err(PlanCheckError::UnknownDevice { stage, device: s.device.clone() });
            };
            let wraps = stage == last && stage > 0 && s.device == self.stages[0].device;
            let bytes =
                s.units.clone().fold(0u64, |sum, u| sum.saturating_add(model.unit_memory(u, self.context_tokens)));
            let entry = need.entry(s.device.as_str());
            let total = match entry {
                std::collections::hash_map::Entry::Occupied(mut o) if wraps => {
                    let (sum, units) = o.get_mut();
                    *sum = sum.saturating_add(bytes);
                    units.push(s.units.clone());
                    (*sum, units.clone())
                }
                std::collections::hash_map::Entry::Occupied(_) => {
                    return Err(PlanCheckError::RepeatedDevice { device: s.device.clone() });
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert((bytes, vec![s.units.clone()]));
                    (bytes, vec![s.units.clone()])
                }
            };
            if total.0 > device.mem_bytes {
                return Err(PlanCheckError::OutOfMemory {
                    device: s.device.clone(),
                    units: total.1,
                    need: Bytes(total.0),
                    offer: Bytes(device.mem_bytes),
                });
            }
            next = s.units.end;
        }
        if next != model.units.len() {
            return Err(PlanCheckError::WrongCoverage { covered: next, units: model.units.len() });
        }
        Ok(())
    }

    /// Pipelined tokens per second with many sequences in flight.
    pub fn throughput_tokens_per_s(&self) -> f64 {
        1.0 / self.bottleneck_s
    }

    /// The plan in lines a person can read: who runs what, what each stage
    /// costs, the memory each device uses, and why the plan looks the way it
    /// does.
    pub fn explain(&self) -> Vec<String> {
        let mut lines = Vec::new();
        let n = self.stages.len();
        lines.push(format!(
            "{} stage{} minimising {}: {:.1} ms per token ({:.2} tokens/s for one sequence), slowest stage {:.1} ms ({:.2} tokens/s pipelined)",
            n,
            if n == 1 { "" } else { "s" },
            self.objective,
            self.latency_s * 1e3,
            1.0 / self.latency_s,
            self.bottleneck_s * 1e3,
            self.throughput_tokens_per_s(),
        ));
        for (i, s) in self.stages.iter().enumerate() {
            // Whoever asks samples: the plan cannot know who will, so it costs
            // the token's trip as one from the last stage to the first.
            let next = if n == 1 || (i + 1 == n && s.device == self.stages[0].device) {
                "returns its logits to the member that asked, whose next token starts the next step here".to_string()
            } else if i + 1 == n {
                format!(
                    "returns its logits to the member that asked, whose next token starts the next step on {}",
                    self.stages[0].device
                )
            } else {
                format!("hands off to {}", self.stages[i + 1].device)
            };
            lines.push(format!(
                "stage {i}: {} ({}) runs units {}..{} ({} unit{}): {:.1} ms compute + {:.1} ms sending = {:.1} ms; {} of {} memory ({:.0}%); {}",
                s.device,
                s.device_name,
                s.units.start,
                s.units.end,
                s.units.len(),
                if s.units.len() == 1 { "" } else { "s" },
                s.compute_s * 1e3,
                s.send_s * 1e3,
                s.time_s() * 1e3,
                Bytes(s.mem_bytes),
                Bytes(s.mem_capacity_bytes),
                100.0 * s.mem_bytes as f64 / s.mem_capacity_bytes.max(1) as f64,
                next,
            ));
        }
        if let Some(first) = self.prologue() {
            lines.push(format!(
                "{first} runs the prologue: every step starts there, with the token the asking member sampled (costed as a trip from the last stage)"
            ));
        }
        lines.push(format!(
            "memory: {}",
            self.memory_by_device()
                .iter()
                .map(|(d, used, cap)| format!("{d} {} of {}", Bytes(*used), Bytes(*cap)))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        lines.extend(self.why());
        for spare in &self.spares {
            lines.push(format!(
                "{} keeps units {}..{} on hand, to take over if their device leaves",
                spare.device, spare.units.start, spare.units.end
            ));
        }
        for e in &self.excluded {
            lines.push(format!("{} was left out: {}", e.device, e.reason));
        }
        lines.push(match &self.method {
            Method::Mip { proven_optimal, gap, nodes, warm_started, smoothed, elapsed } => format!(
                "found by the MIP solver in {:.1} ms ({} branch-and-bound nodes{}{}): {}",
                elapsed.as_secs_f64() * 1e3,
                nodes,
                if *warm_started { ", seeded by the ordered-stage search" } else { "" },
                if *smoothed { ", near-identical units at their mean time" } else { "" },
                if *proven_optimal {
                    "proven optimal".to_string()
                } else {
                    match gap {
                        Some(g) => format!("not proven optimal, within {:.1}% of the best bound", g * 100.0),
                        None => "not proven optimal".to_string(),
                    }
                }
            ),
            Method::Search { elapsed } => format!(
                "found by the ordered-stage search in {:.1} ms because the MIP ran out of time: not proven optimal",
                elapsed.as_secs_f64() * 1e3
            ),
            Method::Exhaustive { plans_tried } => {
                format!("found by trying all {plans_tried} plans: optimal")
            }
            Method::Baseline { name } => format!("made by the {name} rule, not optimised"),
        });
        lines
    }

    /// Memory each device uses (a device running two stages counts both)
    /// and offers, in pipeline order.
    pub fn memory_by_device(&self) -> Vec<(String, u64, u64)> {
        let mut memory: Vec<(String, u64, u64)> = Vec::new();
        for s in &self.stages {
            match memory.iter_mut().find(|(d, _, _)| *d == s.device) {
                Some(entry) => entry.1 += s.mem_bytes,
                None => memory.push((s.device.clone(), s.mem_bytes, s.mem_capacity_bytes)),
            }
        }
        memory
    }

    /// What shaped the plan, in a few sentences.
    fn why(&self) -> Vec<String> {
        let mut why = Vec::new();
        let n = self.stages.len();
        let (Some(first), Some(last)) = (self.stages.first(), self.stages.last()) else {
            return why;
        };
        if n > 1 && first.device == last.device {
            why.push(format!(
                "privacy: the prompt and the sampled tokens stay on {}, which runs the first and the last stage",
                first.device
            ));
        }
        let full: Vec<String> = self
            .memory_by_device()
            .into_iter()
            .filter(|(_, used, cap)| *used as f64 >= 0.9 * *cap as f64)
            .map(|(d, _, _)| d)
            .collect();
        why.push(match self.objective {
            Objective::Latency if n == 1 => format!(
                "why: the whole model fits on {}, and splitting it would only add transfers",
                first.device
            ),
            Objective::Latency if !full.is_empty() => format!(
                "why: memory forces the split ({} at 90% or more of capacity), and the fastest devices that hold the model run it",
                full.join(", ")
            ),
            Objective::Latency => {
                "why: running part of the model on faster devices saves more than the transfers cost".to_string()
            }
            Objective::Throughput => {
                let busiest = self
                    .stages
                    .iter()
                    .max_by(|a, b| a.time_s().total_cmp(&b.time_s()))
                    .map_or("", |s| s.device.as_str());
                let quickest = self.stages.iter().map(Stage::time_s).fold(f64::INFINITY, f64::min);
                format!(
                    "why: the busiest device, {busiest}, sets the pace at {:.1} ms per token; the units are spread so that the stages take between {:.1} and {:.1} ms",
                    self.bottleneck_s * 1e3,
                    quickest * 1e3,
                    self.stages.iter().map(Stage::time_s).fold(0.0, f64::max) * 1e3,
                )
            }
        });
        let compute: f64 = self.stages.iter().map(|s| s.compute_s).sum();
        let total = self.latency_s.max(f64::MIN_POSITIVE);
        why.push(format!(
            "per token {:.0}% of the time is compute and {:.0}% is transfer",
            100.0 * compute / total,
            100.0 * (self.latency_s - compute) / total,
        ));
        why
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::instance::Instance;
    use crate::instance::tests::{devices, model};

    fn plan() -> Plan {
        let instance = Instance::new(&model(), &devices(), &Config::default()).unwrap();
        instance.plan(&[(0, 0..2), (1, 2..4)], Method::Baseline { name: "test".into() })
    }

    #[test]
    fn a_good_plan_passes_its_check() {
        plan().check(&model(), &devices()).unwrap();
        assert_eq!(plan().prologue(), Some("a"));
    }

    #[test]
    fn check_catches_each_mistake() {
        let (m, d) = (model(), devices());
        let mut p = plan();
        p.stages[1].units = 3..4;
        assert!(matches!(p.check(&m, &d), Err(PlanCheckError::NotConsecutive { stage: 1, .. })));
        let mut p = plan();
        p.stages[1].units = 2..3;
        assert!(matches!(p.check(&m, &d), Err(PlanCheckError::WrongCoverage { covered: 3, .. })));
        let mut p = plan();
        p.stages.insert(1, p.stages[1].clone());
        p.stages[0].units = 0..1;
        p.stages[1].units = 1..2;
        assert!(matches!(p.check(&m, &d), Err(PlanCheckError::RepeatedDevice { .. })));
        // The first device may run the last stage too (privacy), within its
        // memory: here a would hold all four units.
        let mut p = plan();
        p.stages[1].device = "a".into();
        let err = p.check(&m, &d).unwrap_err();
        assert!(err.to_string().contains("[0..2, 2..4]"), "{err}");
        let mut p = plan();
        p.stages[1].device = "zz".into();
        assert!(matches!(p.check(&m, &d), Err(PlanCheckError::UnknownDevice { .. })));
        let mut p = plan();
        p.stages[0].units = 0..3;
        p.stages[1].units = 3..4;
        let err = p.check(&m, &d).unwrap_err();
        assert!(err.to_string().contains("would need 286.1 MiB"), "{err}");
        let mut p = plan();
        p.stages[0].units = 0..0;
        assert!(matches!(p.check(&m, &d), Err(PlanCheckError::EmptyStage { stage: 0 })));
        let mut p = plan();
        p.stages.clear();
        assert_eq!(p.check(&m, &d), Err(PlanCheckError::NoStages));
    }

    #[test]
    fn explain_names_devices_times_and_memory() {
        let lines = plan().explain();
        let text = lines.join("\n");
        assert!(text.contains("stage 0: a (A) runs units 0..2"), "{text}");
        assert!(text.contains("whose next token starts the next step on a"), "{text}");
        assert!(text.contains("memory: a 190.7 MiB of 238.4 MiB, b 190.7 MiB"), "{text}");
        assert!(text.contains("580.0 ms per token"), "{text}");
        assert!(text.contains("190.7 MiB of 238.4 MiB"), "{text}");
        assert!(text.contains("why:"), "{text}");
    }
}
