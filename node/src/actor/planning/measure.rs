//! What this device measures of itself for planning: its links to members
//! (a round trip and a 1 MiB probe each, every 30 s) and its power state,
//! sent in its profile when they move; and the balancer's pace against the
//! profile, which re-profiles it when it falls behind, or, where no step of
//! its own can be timed, an arithmetic probe against the same probe when it
//! fell behind, which re-profiles it when it has come back.

use std::collections::BTreeMap;
use std::time::Duration;

use llnode_mesh::wire::ControlRequest;
use llnode_mesh::{MeshClient, PeerId};
use llnode_planner::profile::{Battery, Link, Thermal};
use ractor::ActorRef;

use super::publish::for_model;
use super::view::power_text;
use super::{PlanningMsg, PlanningState};
use crate::protocol::NodeMessage;

/// Bytes of the bandwidth probe.
const PROBE_BYTES: usize = 1 << 20;
/// A link measurement that moves by more than this share is worth a new plan.
const LINK_CHANGE: f64 = 0.5;

impl PlanningState {
    /// Measures the links to every member in the background; `LinksMeasured` brings them.
    pub(super) fn measure_links(&self, myself: &ActorRef<PlanningMsg>) {
        let (client, peers, myself) = (self.args.client.clone(), self.members.clone(), myself.clone());
        tokio::spawn(async move {
            let mut links = BTreeMap::new();
            for peer in peers {
                if let Some(link) = measure_link(&client, peer).await {
                    links.insert(peer.to_base58(), link);
                }
            }
            let power = crate::profile::power_state(std::path::Path::new(crate::profile::SYS_CLASS));
            let _ = myself.cast(PlanningMsg::LinksMeasured(links, power));
        });
    }

    /// Links measured (and the power state read): tells members this
    /// device's profile when either moved enough to be worth a new plan.
    pub(super) fn links_measured(
        &mut self,
        links: BTreeMap<String, Link>,
        battery: Option<Battery>,
        thermal: Option<Thermal>,
        myself: &ActorRef<PlanningMsg>,
    ) {
        let mine = self.profiles.get(&self.me);
        let power = mine.is_some_and(|p| crate::profile::power_changed(p, battery, thermal));
        let changed = power
            || links.iter().any(|(peer, new)| match self.links.get(peer) {
                None => true,
                Some(old) => {
                    let moved = |a: f64, b: f64, floor: f64| (a - b).abs() > (LINK_CHANGE * b).max(floor);
                    // Sub-millisecond jitter on a fast link is not worth a new plan.
                    moved(new.bandwidth_bytes_per_s, old.bandwidth_bytes_per_s, 1e6)
                        || moved(new.rtt_s, old.rtt_s, 1e-3)
                }
            });
        self.links.extend(links);
        self.links.retain(|peer, _| self.members.iter().any(|m| m.to_base58() == *peer));
        if changed && let Some(mut profile) = self.profiles.get(&self.me).cloned() {
            if power {
                self.note(format!("this device's power state: {}", power_text(battery, thermal)));
                (profile.battery, profile.thermal) = (battery, thermal);
            }
            profile.links = self.links.clone();
            self.profiles.insert(self.me.clone(), profile.clone());
            self.broadcast(NodeMessage::Profile(profile));
            self.changed(myself);
        }
    }

    /// Seconds per token of a generation on plan `epoch`: the members' last
    /// paces on it, summed (a token passes every stage in turn).
    pub(super) fn token_s(&self, epoch: u64) -> f64 {
        self.paces.values().filter(|p| p.epoch == epoch).map(|p| p.secs_per_token).sum()
    }

    /// Seconds per token this device's profile promises for `units`, if they
    /// are its share of the held plan.
    pub(super) fn expected(&self, units: &[std::ops::Range<usize>]) -> Option<f64> {
        let (model, cost) = self.args.model.as_ref()?;
        let (_, held) = self.held.as_ref().filter(|(_, d)| d.model == *model)?;
        let profile = for_model(self.profiles.get(&self.me)?, model);
        let mine: Vec<std::ops::Range<usize>> =
            held.plan.stages.iter().filter(|s| s.device == self.me).map(|s| s.units.clone()).collect();
        if units != mine {
            return None; // measured on an assignment no longer held
        }
        let expected: f64 =
            mine.iter().flat_map(|r| r.clone()).filter_map(|u| Some(profile.compute_s(u, cost.units.get(u)?))).sum();
        (expected > 0.0).then_some(expected)
    }

    /// The balancer measured this device `ratio` times slower than its
    /// profile: scale the profile, tell every member, and let the leader re-plan.
    pub(super) fn reprofile(
        &mut self,
        ratio: f64,
        pace: crate::pace::Pace,
        expected: f64,
        myself: &ActorRef<PlanningMsg>,
    ) {
        let note = format!(
            "this device ran its units in {:.2} ms/token over {} tokens (queue depth {:.1}), {ratio:.2}× its profile's {:.2} ms; re-profiled",
            pace.secs_per_token * 1e3,
            pace.samples,
            pace.queue,
            expected * 1e3
        );
        self.rescale(ratio, note, myself);
    }

    /// How many times slower than its first measure this device's profile says it is.
    fn slowdown(&self) -> f64 {
        let now = self.profiles.get(&self.me).map_or(0.0, |p| p.flops_per_s);
        self.first_flops.filter(|_| now > 0.0).map_or(1.0, |first| first / now)
    }

    /// The balancer's probe took `probe`, against `before` when the pace
    /// last slowed this device: scale its profile by as much, never faster
    /// than its first measure; how many times slower than that it is then.
    pub(super) fn probed(&mut self, probe: Duration, before: Duration, myself: &ActorRef<PlanningMsg>) -> f64 {
        let ratio = (probe.as_secs_f64() / before.as_secs_f64()).max(1.0 / self.slowdown());
        if ratio < 1.0 {
            let note = format!(
                "this device ran the arithmetic probe in {:.2} ms ({:.2} ms when its pace slowed it): {}; re-profiled",
                probe.as_secs_f64() * 1e3,
                before.as_secs_f64() * 1e3,
                against_profile(ratio)
            );
            self.rescale(ratio, note, myself);
        }
        self.slowdown()
    }

    /// Scales this device's profile by `ratio` (its times; under 1: faster),
    /// tells every member, and lets the leader re-plan.
    fn rescale(&mut self, ratio: f64, note: String, myself: &ActorRef<PlanningMsg>) {
        let Some(mut profile) = self.profiles.get(&self.me).cloned() else { return };
        profile.slow_down(ratio);
        self.note(note);
        self.profiles.insert(self.me.clone(), profile.clone());
        self.reason(measured_itself(&profile.name, ratio));
        self.broadcast(NodeMessage::Profile(profile));
        self.reprofiled(myself);
    }
}

/// Why the leader plans again when a device's times changed by `ratio`.
pub(super) fn measured_itself(name: &str, ratio: f64) -> String {
    format!("{name} measured itself {} as before", times(ratio))
}

/// A device `ratio` times as slow as its profile, in words.
fn against_profile(ratio: f64) -> String {
    format!("{} as its profile", times(ratio))
}

/// Times `ratio` (under 1: faster) as "N× as slow" or "N× as fast".
fn times(ratio: f64) -> String {
    if ratio >= 1.0 { format!("{ratio:.2}× as slow") } else { format!("{:.2}× as fast", 1.0 / ratio) }
}

/// Round trip (the best of a few small echoes) and bandwidth (a 1 MiB probe) to `peer`.
async fn measure_link(client: &MeshClient, peer: PeerId) -> Option<Link> {
    let mut rtt = f64::MAX;
    for _ in 0..5 {
        let started = std::time::Instant::now();
        client.request(peer, ControlRequest::Echo(vec![0; 32])).await.ok()?;
        rtt = rtt.min(started.elapsed().as_secs_f64());
    }
    let probe = llnode_mesh::wire::Tensor {
        header: llnode_mesh::wire::TensorHeader {
            session: 0,
            step: 0,
            tokens: 0,
            epoch: 0,
            name: PROBE.into(),
            dtype: llnode_mesh::wire::DType::U8,
            shape: vec![PROBE_BYTES as u64],
            top_logits: 0,
            no_logits: false,
            compute_us: 0,
        },
        data: vec![0; PROBE_BYTES],
    };
    let started = std::time::Instant::now();
    client.send_tensor(peer, probe).await.ok()?;
    let transfer = (started.elapsed().as_secs_f64() - rtt).max(1e-6);
    Some(Link { bandwidth_bytes_per_s: PROBE_BYTES as f64 / transfer, rtt_s: rtt })
}

/// The name of bandwidth probes, which every node acknowledges and drops.
pub const PROBE: &str = "llnode.probe";
