//! What the planner is asked to optimise and under which rules.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::profile::Link;

/// What a plan minimises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Objective {
    /// Seconds per token for one sequence: every stage's compute, every hop
    /// between stages, every skip tensor sent, and the sampled token's trip
    /// back to the prologue's device.
    Latency,
    /// Seconds of the busiest stage (its compute plus what it sends per
    /// token); its inverse is the pipelined throughput with many sequences in
    /// flight.
    Throughput,
}

impl std::fmt::Display for Objective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Objective::Latency => "per-token latency",
            Objective::Throughput => "slowest pipeline stage",
        })
    }
}

/// Planner settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub objective: Objective,
    /// Tokens of context each unit keeps a KV cache for; memory is reserved
    /// for all of them up front.
    pub context_tokens: u64,
    /// When set, the id of the device that asks: the prologue (which sees the
    /// prompt's tokens) and the epilogue (which sees the sampled ones) are
    /// pinned to it, so the text never leaves it.
    pub privacy: Option<String>,
    /// Link assumed between two devices when neither has measured the other.
    /// `None` makes a missing measurement an error.
    pub assumed_link: Option<Link>,
    /// Devices with less battery than this (0 to 1) that are not charging are
    /// left out.
    pub min_battery: f64,
    /// Scale each device's speed by its thermal state
    /// ([`crate::profile::Thermal::speed_factor`]).
    pub thermal_derating: bool,
    /// Time the MIP solver may spend; when it runs out the best plan found so
    /// far is returned with its optimality gap.
    pub time_limit: Duration,
    /// Neighbouring units whose measured times spread by at most this share
    /// of their mean on every device (and that are otherwise alike) are
    /// planned as interchangeable, at their mean time, which keeps the MIP small when
    /// identical layers were measured with noise. The plan's reported times
    /// are always its exact costs. 0 plans every measurement as it is.
    pub interchangeable: f64,
    /// Seed the MIP with the plan of the fast ordered-stage search
    /// ([`crate::assign`] explains it).
    pub warm_start: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            objective: Objective::Latency,
            context_tokens: 1024,
            privacy: None,
            assumed_link: None,
            min_battery: 0.15,
            thermal_derating: true,
            time_limit: Duration::from_secs(10),
            interchangeable: 0.1,
            warm_start: true,
        }
    }
}
