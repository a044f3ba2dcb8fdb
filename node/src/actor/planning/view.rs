//! What `llnode plan` shows of planning: the leader, the members, the plan
//! held, its history, the paces measured on it, and the profiles planned with.

use std::collections::BTreeMap;

use llnode_planner::election::Leadership;
use llnode_planner::plan::Plan;
use llnode_planner::profile::{Battery, DeviceProfile, Thermal};
use serde::{Deserialize, Serialize};

use super::PlanningState;

/// What `llnode plan` shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlanView {
    pub me: String,
    pub leadership: Option<Leadership>,
    pub leader_name: Option<String>,
    pub members: Vec<String>,
    pub epoch: Option<u64>,
    pub model: Option<String>,
    pub plan: Option<Plan>,
    /// Why there is no plan (yet).
    pub problem: Option<String>,
    /// Recent planning events, oldest first.
    pub history: Vec<String>,
    /// This device's model fetch, in progress or last done.
    pub fetch: Option<String>,
    /// This device's last measured pace on its share of the plan.
    #[serde(default)]
    pub pace: Option<String>,
    /// Every member's last measured pace (name: pace) on the plan held, slowest
    /// first: the first is the bottleneck.
    #[serde(default)]
    pub paces: Vec<(String, String)>,
    /// Activations this device sent, by member peer id.
    #[serde(default)]
    pub sent: BTreeMap<String, crate::traffic::Sent>,
    /// The profile of this device and each member, as this node last heard
    /// it (what the leader plans with), by name.
    #[serde(default)]
    pub devices: Vec<DeviceView>,
}

/// A device's profile in `llnode plan`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceView {
    pub name: String,
    pub id: String,
    pub flops_per_s: f64,
    /// Memory, speed, power state, in words.
    pub profile: String,
}

impl PlanningState {
    /// What `llnode plan` shows of this node.
    pub(super) fn view(&self) -> PlanView {
        let leadership = self.election.current().cloned();
        PlanView {
            me: self.me.clone(),
            leader_name: leadership.as_ref().map(|l| self.name_of(&l.leader)),
            leadership,
            members: self.members.iter().map(|p| p.to_base58()).collect(),
            epoch: self.held.as_ref().map(|(_, d)| d.epoch),
            model: self.held.as_ref().map(|(_, d)| d.model.clone()),
            plan: self.held.as_ref().map(|(_, d)| d.plan.clone()),
            problem: self.problem.clone(),
            history: self.history.events().to_vec(),
            fetch: self.args.store.status(),
            pace: self.paces.get(&self.me).map(|p| p.to_string()),
            paces: self.stage_paces(),
            sent: self.args.traffic.snapshot(),
            devices: self.devices(),
        }
    }

    /// The profiles known of this device and the live members, by name.
    fn devices(&self) -> Vec<DeviceView> {
        let mut devices: Vec<DeviceView> = self
            .live()
            .into_iter()
            .filter_map(|id| {
                let p = self.profiles.get(&id)?;
                Some(DeviceView { name: p.name.clone(), id, flops_per_s: p.flops_per_s, profile: describe(p) })
            })
            .collect();
        devices.sort_by(|a, b| a.name.cmp(&b.name));
        devices
    }

    /// The members' paces measured on the plan held, slowest first.
    pub(super) fn stage_paces(&self) -> Vec<(String, String)> {
        let Some((_, held)) = &self.held else { return Vec::new() };
        let mut paces: Vec<(&String, &crate::pace::Pace)> = self
            .paces
            .iter()
            .filter(|(id, pace)| {
                held.plan
                    .stages
                    .iter()
                    .filter(|s| s.device == **id)
                    .map(|s| s.units.clone())
                    .eq(pace.units.iter().cloned())
            })
            .collect();
        paces.sort_by(|a, b| b.1.secs_per_token.total_cmp(&a.1.secs_per_token));
        paces.into_iter().map(|(id, pace)| (self.name_of(id), pace.to_string())).collect()
    }
}

pub(super) fn describe(p: &DeviceProfile) -> String {
    let power = power_text(p.battery, p.thermal);
    let load = p.load_bytes_per_s.map_or(String::new(), |r| format!(", loads {:.0} MB/s", r / 1e6));
    format!(
        "{:.1} GiB usable, {:.2} GFLOP/s{load}, {power}",
        p.mem_bytes as f64 / (1u64 << 30) as f64,
        p.flops_per_s / 1e9
    )
}

pub(super) fn power_text(battery: Option<Battery>, thermal: Option<Thermal>) -> String {
    let battery = match battery {
        Some(b) => format!("battery {:.0}%{}", b.level * 100.0, if b.charging { " charging" } else { "" }),
        None => "no battery".into(),
    };
    let thermal = thermal.map_or("thermal state unknown".into(), |t| format!("thermal {t:?}"));
    format!("{battery}, {thermal}")
}
