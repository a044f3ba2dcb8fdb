//! PlanningActor: child of `llnode start`. Owns the election state, the
//! members' profiles and the plan this node holds. Every member measures
//! itself and sends its profile to every member; the elected leader solves
//! the assignment MIP (on the blocking pool) whenever membership or profiles
//! change, signs the plan with its device key, numbers it by epoch and sends
//! it to every member. Members keep only plans signed by a live member and
//! newer than the one they hold.
//!
//! Balancing: when the balancing actor finds this device's pace off its
//! profile, planning re-profiles it and sends the new profile; the leader
//! re-plans, and publishes a new assignment only when it beats the held one,
//! costed on the same new profiles, by [`MIN_GAIN`]. Generations under way
//! move to the new plan at a token boundary ([`crate::prompt`]).
//!
//! Its parts: `inbound` (what members say), `publish` (the leader's solve and publication).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use llnode_mesh::wire::{ControlRequest, ControlResponse};
use llnode_mesh::{DeviceKey, MeshClient, PeerId};
use llnode_planner::config::Objective;
use llnode_planner::cost::ModelCost;
use llnode_planner::election::{Election, Leadership};
use llnode_planner::plan::{Plan, PlanError};
use llnode_planner::profile::{Battery, DeviceProfile, Link, Thermal};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};

use crate::actor::Waiter;
use crate::protocol::{NodeMessage, PlanDoc, Readiness, SignedPlan};

mod inbound;
mod publish;

use publish::for_model;
pub use publish::same_assignment;

/// Changes arriving within this time are planned for together.
const DEBOUNCE: Duration = Duration::from_millis(300);
/// How long the leader waits for a new member's profile before planning without it.
const PROFILE_WAIT: Duration = Duration::from_secs(5);
/// How often links to members are measured again.
const LINK_INTERVAL: Duration = Duration::from_secs(30);
/// Bytes of the bandwidth probe.
const PROBE_BYTES: usize = 1 << 20;
/// A link measurement that moves by more than this share is worth a new plan.
const LINK_CHANGE: f64 = 0.5;
/// A new assignment for the same devices must beat the held one by this share.
const MIN_GAIN: f64 = 0.1;
/// Tokens over which a plan's gain must make up for the time its units take
/// to load ([`llnode_planner::assign::settle`]): an answer's length.
const SETTLE_HORIZON: f64 = 256.0;
/// A node that has met no member by then leads (and plans for) itself.
const ALONE_GRACE: Duration = Duration::from_secs(10);
/// How often the models this device can serve (fetching adds some) are announced anew.
const TICK: Duration = Duration::from_secs(1);

pub struct PlanningActor;

pub struct PlanningArgs {
    pub key: DeviceKey,
    pub client: MeshClient,
    /// The package this node plans for (leaders need one), with its id and cost.
    pub model: Option<(String, ModelCost)>,
    pub objective: Objective,
    /// Told about every plan this node comes to hold.
    pub execution: ActorRef<crate::actor::execution::ExecutionMsg>,
    /// Which members have which models; where a leader without one gets its manifest.
    pub store: std::sync::Arc<crate::store::Store>,
    pub traffic: std::sync::Arc<crate::traffic::Traffic>,
    /// Where this device stands with its plan, as the execution actor sets it.
    pub readiness: tokio::sync::watch::Receiver<Option<(u64, Readiness)>>,
}

/// What [`PlanningMsg::ReadinessOf`] says of one device.
pub struct DeviceReadiness {
    pub name: String,
    /// Whether it is a live member.
    pub live: bool,
    /// The last it said: a plan epoch and where it stands with it.
    pub said: Option<(u64, Readiness)>,
}

pub enum PlanningMsg {
    /// Trust became mutual with `peer` (it can receive our messages).
    MemberUp(PeerId),
    MemberDown(PeerId),
    /// A member's message; answer through the mesh with `respond(id, ..)`.
    Inbound {
        peer: PeerId,
        id: llnode_mesh::event::InboundId,
        message: NodeMessage,
    },
    /// The manifest a node without a model asked a member for, or why it could not get it.
    ModelLearnt(Result<(String, ModelCost), String>),
    /// This device's own profile, measured.
    Measured(DeviceProfile),
    /// Measure round trips and bandwidth to every member.
    MeasureLinks,
    /// Links to members, and this device's battery and thermal state.
    LinksMeasured(BTreeMap<String, Link>, (Option<Battery>, Option<Thermal>)),
    /// Plan now if this node leads and something changed.
    Replan,
    /// If no member has turned up, lead alone.
    Alone,
    /// `held_now`: the held assignment's objective on the same profiles, when it still fits.
    Solved {
        generation: u64,
        result: Result<Plan, PlanError>,
        held_now: Option<f64>,
    },
    /// Announce the models this device can serve, if they changed.
    Tick,
    /// The balancer measured `pace` and asks what this device's profile
    /// promises for its units (seconds per token), if they are its share of
    /// the held plan.
    Expected {
        pace: crate::pace::Pace,
        reply: RpcReplyPort<Option<Expectation>>,
    },
    /// The balancer measured this device `ratio` times slower than `expected`.
    Reprofile {
        ratio: f64,
        pace: crate::pace::Pace,
        expected: f64,
    },
    /// Something worth a line in `llnode plan`'s history (a generation that moved).
    Note(String),
    /// Asked locally: plan again with this objective (sent to the leader).
    SetObjective(Objective),
    Show(RpcReplyPort<PlanView>),
    /// The execution actor's readiness changed.
    OwnReadiness(u64, Readiness),
    /// A prompt here wants privacy mode: ask the leader for plans that keep
    /// the first and last units on this device; answered once one is published.
    Private(RpcReplyPort<Result<(), String>>),
    /// A prompt here wants this model (a full package id): ask the leader to
    /// plan for it; answered once such a plan is published.
    UseModel {
        model: String,
        reply: RpcReplyPort<Result<(), String>>,
    },
    /// What these devices last said of their readiness (for an initiator).
    ReadinessOf {
        devices: Vec<PeerId>,
        reply: RpcReplyPort<Vec<DeviceReadiness>>,
    },
}

/// What this device's profile promises for the units it measured, against
/// what a whole token takes on the plan (the balancer weighs drifts by it).
pub struct Expectation {
    pub secs_per_token: f64,
    pub token_s: f64,
}

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
}

pub struct PlanningState {
    args: PlanningArgs,
    me: String,
    election: Election,
    members: BTreeSet<PeerId>,
    profiles: HashMap<String, DeviceProfile>,
    held: Option<(SignedPlan, PlanDoc)>,
    problem: Option<String>,
    history: Vec<String>,
    /// Bumped on every change a plan must reflect; a solve for an older one is stale.
    generation: u64,
    solving: bool,
    replan_queued: bool,
    /// Since when a live member's profile has been missing.
    waiting_since: Option<std::time::Instant>,
    /// Measured links to members, kept apart from the profile they join.
    links: BTreeMap<String, Link>,
    /// How many devices were live when the held plan was made here.
    planned_for: usize,
    /// A manifest fetch for planning is under way.
    learning: bool,
    /// The models last announced to members with `Have`.
    announced: Vec<String>,
    /// Why the leader is planning again, for the next plan's history line.
    reasons: Vec<String>,
    /// What each member (and this device) last said of its readiness, by peer id.
    readiness: HashMap<String, (u64, Readiness)>,
    /// Leader: the member whose prompts run in privacy mode (plans keep the
    /// first and last units on it), until it leaves or another asks.
    private: Option<String>,
    /// Each member's last measured pace (this device's from its balancer,
    /// the others' as they send them), by peer id, for `llnode plan`.
    paces: BTreeMap<String, crate::pace::Pace>,
    /// Leader: who asked for privacy and waits for the plan that gives it.
    private_waiters: Vec<Waiter>,
    /// The model a member asked for (leader), or the held plan runs, while
    /// its manifest is fetched: planning moves to it once it comes.
    wanted_model: Option<String>,
    /// Leader: who asked for which model and waits for a plan of it.
    model_waiters: Vec<(String, Waiter)>,
    /// Leader: the model planned for before a member asked for another, to
    /// go back to if the other cannot be planned.
    previous_model: Option<(String, ModelCost)>,
}

impl Actor for PlanningActor {
    type Msg = PlanningMsg;
    type State = PlanningState;
    type Arguments = PlanningArgs;

    async fn pre_start(
        &self,
        _: ActorRef<PlanningMsg>,
        args: PlanningArgs,
    ) -> Result<PlanningState, ActorProcessingErr> {
        let me = args.key.peer_id().to_base58();
        let announced = args.store.models();
        Ok(PlanningState {
            election: Election::new(&me),
            me,
            args,
            members: BTreeSet::new(),
            profiles: HashMap::new(),
            held: None,
            problem: Some("waiting for this device's profile".into()),
            history: Vec::new(),
            generation: 0,
            solving: false,
            replan_queued: false,
            waiting_since: None,
            links: BTreeMap::new(),
            planned_for: 0,
            learning: false,
            announced,
            reasons: Vec::new(),
            readiness: HashMap::new(),
            private: None,
            paces: BTreeMap::new(),
            private_waiters: Vec::new(),
            wanted_model: None,
            model_waiters: Vec::new(),
            previous_model: None,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<PlanningMsg>,
        state: &mut PlanningState,
    ) -> Result<(), ActorProcessingErr> {
        let (mut readiness, to) = (state.args.readiness.clone(), myself.clone());
        tokio::spawn(async move {
            while readiness.changed().await.is_ok() {
                let said = readiness.borrow_and_update().clone();
                if let Some((epoch, state)) = said
                    && to.cast(PlanningMsg::OwnReadiness(epoch, state)).is_err()
                {
                    break;
                }
            }
        });
        myself.send_interval(LINK_INTERVAL, || PlanningMsg::MeasureLinks);
        myself.send_after(ALONE_GRACE, || PlanningMsg::Alone);
        myself.send_interval(TICK, || PlanningMsg::Tick);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<PlanningMsg>,
        msg: PlanningMsg,
        state: &mut PlanningState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PlanningMsg::MemberUp(peer) => {
                state.members.insert(peer);
                state.membership_changed();
                // Bring the newcomer up to date: who leads, our profile, our plan.
                if let Some(l) = state.election.current().cloned() {
                    state.send(peer, NodeMessage::Leader(l));
                }
                if let Some(p) = state.profiles.get(&state.me).cloned() {
                    state.send(peer, NodeMessage::Profile(p));
                }
                if let Some((signed, _)) = state.held.clone() {
                    state.send(peer, NodeMessage::Plan(signed));
                }
                state.send(peer, NodeMessage::Have { models: state.args.store.models() });
                if let Some((epoch, said)) = state.readiness.get(&state.me).cloned() {
                    state.send(peer, NodeMessage::Readiness { epoch, state: said });
                }
                state.changed(&myself);
                myself.send_after(Duration::from_millis(500), || PlanningMsg::MeasureLinks);
            }
            PlanningMsg::MemberDown(peer) => {
                state.args.store.peer_gone(peer);
                if state.members.remove(&peer) {
                    let name = state.name_of(&peer.to_base58());
                    state.note(format!("{name} left the mesh"));
                    state.profiles.remove(&peer.to_base58());
                    state.paces.remove(&peer.to_base58());
                    state.readiness.remove(&peer.to_base58());
                    if state.private.as_deref() == Some(peer.to_base58().as_str()) {
                        state.private = None;
                    }
                    // After the election: the device that left may have led.
                    state.membership_changed();
                    state.reason(format!("{name} left"));
                    state.changed(&myself);
                }
            }
            // Answered when the plan that gives it is published (`answer_private`).
            PlanningMsg::Inbound { peer, id, message: NodeMessage::Private } if state.election.is_leader() => {
                state.want_private(peer.to_base58(), Waiter::Remote(id), &myself);
            }
            PlanningMsg::Inbound { id, message: NodeMessage::UseModel { model }, .. } if state.election.is_leader() => {
                state.want_model(model, Waiter::Remote(id), &myself);
            }
            PlanningMsg::Inbound { peer, id, message } => {
                let answer = state.inbound(peer, message, &myself);
                let response = match answer {
                    Ok(()) => ControlResponse::Ack,
                    Err(reason) => {
                        tracing::info!(%peer, "refused a planning message: {reason}");
                        ControlResponse::Refused { reason }
                    }
                };
                state.args.client.respond(id, response);
            }
            PlanningMsg::Measured(mut profile) => {
                state.note(format!("measured this device: {}", describe(&profile)));
                if state.held.is_none() {
                    state.problem = Some("waiting for the members to elect a leader and for its plan".into());
                }
                profile.links = state.links.clone();
                state.profiles.insert(state.me.clone(), profile.clone());
                state.broadcast(NodeMessage::Profile(profile));
                state.changed(&myself);
            }
            PlanningMsg::MeasureLinks => {
                let (client, peers, myself) = (state.args.client.clone(), state.members.clone(), myself.clone());
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
            PlanningMsg::LinksMeasured(links, (battery, thermal)) => {
                let mine = state.profiles.get(&state.me);
                let power = mine.is_some_and(|p| crate::profile::power_changed(p, battery, thermal));
                let changed = power
                    || links.iter().any(|(peer, new)| match state.links.get(peer) {
                        None => true,
                        Some(old) => {
                            let moved = |a: f64, b: f64, floor: f64| (a - b).abs() > (LINK_CHANGE * b).max(floor);
                            // Sub-millisecond jitter on a fast link is not worth a new plan.
                            moved(new.bandwidth_bytes_per_s, old.bandwidth_bytes_per_s, 1e6)
                                || moved(new.rtt_s, old.rtt_s, 1e-3)
                        }
                    });
                state.links.extend(links);
                state.links.retain(|peer, _| state.members.iter().any(|m| m.to_base58() == *peer));
                if changed && let Some(mut profile) = state.profiles.get(&state.me).cloned() {
                    if power {
                        state.note(format!("this device's power state: {}", power_text(battery, thermal)));
                        (profile.battery, profile.thermal) = (battery, thermal);
                    }
                    profile.links = state.links.clone();
                    state.profiles.insert(state.me.clone(), profile.clone());
                    state.broadcast(NodeMessage::Profile(profile));
                    state.changed(&myself);
                }
            }
            PlanningMsg::Alone => {
                // Plans held by members met later are exchanged then, and the higher epoch wins.
                if state.members.is_empty() && state.election.current().is_none() {
                    state.membership_changed();
                    state.changed(&myself);
                }
            }
            PlanningMsg::Replan => {
                state.replan_queued = false;
                state.replan(&myself);
            }
            PlanningMsg::Solved { generation, result, held_now } => {
                state.solving = false;
                if generation != state.generation {
                    state.changed(&myself); // things moved while solving: solve again
                } else {
                    state.publish(result, held_now, &myself);
                }
            }
            PlanningMsg::Tick => {
                if let Some((epoch, Readiness::Loading(_))) = state.readiness.get(&state.me).cloned() {
                    state.tell_readiness(epoch, Readiness::Loading(String::new()));
                }
                // Units fetched make this device a holder others can fetch from in turn
                // (a failover then need not wait for the source).
                let models = state.args.store.models();
                if models != state.announced {
                    state.broadcast(NodeMessage::Have { models: models.clone() });
                    state.announced = models;
                }
            }
            PlanningMsg::Expected { pace, reply } => {
                state.broadcast(NodeMessage::Pace(pace.clone()));
                state.paces.insert(state.me.clone(), pace.clone());
                let expectation = state
                    .expected(&pace.units)
                    .map(|secs_per_token| Expectation { secs_per_token, token_s: state.token_s(pace.epoch) });
                let _ = reply.send(expectation);
            }
            PlanningMsg::Reprofile { ratio, pace, expected } => state.reprofile(ratio, pace, expected, &myself),
            PlanningMsg::Note(line) => state.note(line),
            PlanningMsg::OwnReadiness(epoch, said) => state.tell_readiness(epoch, said),
            PlanningMsg::Private(reply) => match state.leader() {
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
                Ok(None) => state.want_private(state.me.clone(), Waiter::Local(reply), &myself),
                Ok(Some(leader)) => state.ask_leader(leader, NodeMessage::Private, reply),
            },
            PlanningMsg::UseModel { model, reply } => match state.leader() {
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
                Ok(None) => state.want_model(model, Waiter::Local(reply), &myself),
                Ok(Some(leader)) => state.ask_leader(leader, NodeMessage::UseModel { model }, reply),
            },
            PlanningMsg::ReadinessOf { devices, reply } => {
                let answer = devices
                    .iter()
                    .map(|d| {
                        let id = d.to_base58();
                        DeviceReadiness {
                            name: state.name_of(&id),
                            live: state.members.contains(d),
                            said: state.readiness.get(&id).cloned(),
                        }
                    })
                    .collect();
                let _ = reply.send(answer);
            }
            PlanningMsg::SetObjective(objective) => {
                state.args.objective = objective;
                match state.election.current().map(|l| l.leader.clone()) {
                    Some(leader) if leader != state.me => {
                        if let Ok(peer) = leader.parse() {
                            state.send(peer, NodeMessage::Replan { objective });
                        }
                    }
                    _ => state.changed(&myself),
                }
            }
            PlanningMsg::ModelLearnt(result) => {
                state.learning = false;
                match result {
                    Ok((id, cost)) if state.args.model.is_none() || state.wanted_model.as_ref() == Some(&id) => {
                        state.note(format!("learnt model {} from a member", short(&id)));
                        state.wanted_model = None;
                        if state.args.model.as_ref().is_some_and(|(held, _)| *held != id) {
                            state.previous_model = state.args.model.take();
                        }
                        state.args.model = Some((id, cost));
                        state.changed(&myself);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        state.note(format!("cannot learn a member's model: {e}"));
                        if let Some(id) = state.wanted_model.take() {
                            state.answer_model(
                                &id,
                                Err(format!("cannot get the manifest of model {}: {e}", short(&id))),
                            );
                        }
                    }
                }
            }
            PlanningMsg::Show(reply) => {
                let _ = reply.send(state.view());
            }
        }
        Ok(())
    }
}

impl PlanningState {
    /// The members' paces measured on the plan held, slowest first.
    fn stage_paces(&self) -> Vec<(String, String)> {
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

    /// Seconds per token of a generation on plan `epoch`: the members' last
    /// paces on it, summed (a token passes every stage in turn).
    fn token_s(&self, epoch: u64) -> f64 {
        self.paces.values().filter(|p| p.epoch == epoch).map(|p| p.secs_per_token).sum()
    }

    /// Seconds per token this device's profile promises for `units`, if they
    /// are its share of the held plan.
    fn expected(&self, units: &[std::ops::Range<usize>]) -> Option<f64> {
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
    fn reprofile(&mut self, ratio: f64, pace: crate::pace::Pace, expected: f64, myself: &ActorRef<PlanningMsg>) {
        let Some(mut profile) = self.profiles.get(&self.me).cloned() else { return };
        profile.slow_down(ratio);
        self.note(format!(
            "this device ran its units in {:.2} ms/token over {} tokens (queue depth {:.1}), {ratio:.2}× its profile's {:.2} ms; re-profiled",
            pace.secs_per_token * 1e3,
            pace.samples,
            pace.queue,
            expected * 1e3
        ));
        self.profiles.insert(self.me.clone(), profile.clone());
        self.reason(format!("{} measured itself {ratio:.2}× as slow as before", profile.name));
        self.broadcast(NodeMessage::Profile(profile));
        self.reprofiled(myself);
    }

    /// Something the next plan answers, kept by the leader only (members do not plan).
    fn reason(&mut self, why: String) {
        if self.election.is_leader() {
            self.reasons.push(why);
        }
    }

    fn note(&mut self, event: String) {
        tracing::info!("{event}");
        self.history.push(event);
        if self.history.len() > 50 {
            self.history.remove(0);
        }
    }

    fn send(&self, peer: PeerId, message: NodeMessage) {
        let client = self.args.client.clone();
        let bytes = message.encode();
        tokio::spawn(async move {
            if let Err(e) = client.request(peer, ControlRequest::Node(bytes)).await {
                tracing::debug!(%peer, "planning message not delivered: {e}");
            }
        });
    }

    /// Who leads: `None` when this node does, an error when nobody does yet.
    fn leader(&self) -> Result<Option<PeerId>, String> {
        match self.election.current() {
            None => Err("the mesh has no leader yet; retry in a moment".into()),
            Some(l) if l.leader == self.me => Ok(None),
            Some(l) => l.leader.parse().map(Some).map_err(|_| "the leader's id is not a peer id".to_string()),
        }
    }

    /// Sends the leader an ask it answers once the plan it wants is out.
    fn ask_leader(&self, leader: PeerId, message: NodeMessage, reply: RpcReplyPort<Result<(), String>>) {
        let client = self.args.client.clone();
        tokio::spawn(async move {
            let _ = reply.send(crate::actor::ask(&client, leader, "the leader", &message).await);
        });
    }

    /// A member wants plans of `model`: plan for it (fetching its manifest
    /// first), and answer `waiter` when such a plan is out.
    fn want_model(&mut self, model: String, waiter: Waiter, myself: &ActorRef<PlanningMsg>) {
        let runs = self.held.as_ref().is_some_and(|(_, d)| d.model == model);
        if runs && self.args.model.as_ref().is_some_and(|(id, _)| *id == model) {
            waiter.answer(&self.args.client, Ok(()));
            return;
        }
        self.model_waiters.push((model.clone(), waiter));
        self.reason(format!("a member asked for model {}", short(&model)));
        if self.args.model.as_ref().is_some_and(|(id, _)| *id == model) {
            self.changed(myself);
        } else if self.wanted_model.as_ref() != Some(&model) || !self.learning {
            self.wanted_model = Some(model.clone());
            self.learn(model, myself);
        }
    }

    /// Tells those waiting for plans of `model` how it went.
    fn answer_model(&mut self, model: &str, result: Result<(), String>) {
        let (now, later): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.model_waiters).into_iter().partition(|(m, _)| m == model);
        self.model_waiters = later;
        for (_, waiter) in now {
            waiter.answer(&self.args.client, result.clone());
        }
    }

    /// `device` wants privacy mode: plan again keeping the first and last
    /// units on it, and answer `waiter` when that plan is out.
    fn want_private(&mut self, device: String, waiter: Waiter, myself: &ActorRef<PlanningMsg>) {
        if self.private.as_ref().is_some_and(|held| *held != device) {
            let name = self.name_of(&device);
            self.reason(format!("{name} asked for privacy mode"));
        }
        self.private = Some(device);
        self.private_waiters.push(waiter);
        self.changed(myself);
    }

    /// Tells those waiting for privacy mode how it went.
    fn answer_private(&mut self, result: Result<(), String>) {
        for waiter in self.private_waiters.drain(..) {
            waiter.answer(&self.args.client, result.clone());
        }
    }

    /// Tells everyone waiting for a plan that one is out (`model`'s).
    fn answer_published(&mut self, model: &str) {
        self.answer_private(Ok(()));
        self.answer_model(model, Ok(()));
        self.previous_model = None;
    }

    /// Records this device's readiness and tells the members when it changed; a
    /// load in progress says what the model store is fetching.
    fn tell_readiness(&mut self, epoch: u64, said: Readiness) {
        let said = match said {
            Readiness::Loading(_) => Readiness::Loading(match self.args.store.status() {
                Some(line) if line.starts_with("fetching") => line,
                _ => "loading its units".into(),
            }),
            other => other,
        };
        if self.readiness.get(&self.me) == Some(&(epoch, said.clone())) {
            return;
        }
        self.readiness.insert(self.me.clone(), (epoch, said.clone()));
        self.broadcast(NodeMessage::Readiness { epoch, state: said });
    }

    fn broadcast(&self, message: NodeMessage) {
        for peer in &self.members {
            self.send(*peer, message.clone());
        }
    }

    fn membership_changed(&mut self) {
        let live = self.members.iter().map(|p| p.to_base58()).collect();
        if let Some(leadership) = self.election.members(live) {
            self.note(format!(
                "term {}: {} leads (the previous leader left or there was none)",
                leadership.term,
                self.name_of(&leadership.leader)
            ));
            self.broadcast(NodeMessage::Leader(leadership));
        }
    }

    fn name_of(&self, id: &str) -> String {
        match self.profiles.get(id) {
            Some(p) => p.name.clone(),
            None => short(id),
        }
    }

    /// Something a plan depends on changed: plan again shortly, if leading.
    fn changed(&mut self, myself: &ActorRef<PlanningMsg>) {
        self.replan_after(DEBOUNCE, myself);
    }

    /// A planned device measured itself anew: plan again at once, if leading.
    /// Nothing else is likely to change with it, and every token spent
    /// waiting runs at the slow device's pace.
    fn reprofiled(&mut self, myself: &ActorRef<PlanningMsg>) {
        self.replan_after(Duration::ZERO, myself);
    }

    fn replan_after(&mut self, delay: Duration, myself: &ActorRef<PlanningMsg>) {
        self.generation += 1;
        if self.election.is_leader() && !self.replan_queued {
            self.replan_queued = true;
            myself.send_after(delay, || PlanningMsg::Replan);
        }
    }

    fn view(&self) -> PlanView {
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
            history: self.history.clone(),
            fetch: self.args.store.status(),
            pace: self.paces.get(&self.me).map(|p| p.to_string()),
            paces: self.stage_paces(),
            sent: self.args.traffic.snapshot(),
        }
    }
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

fn describe(p: &DeviceProfile) -> String {
    let power = power_text(p.battery, p.thermal);
    let load = p.load_bytes_per_s.map_or(String::new(), |r| format!(", loads {:.0} MB/s", r / 1e6));
    format!(
        "{:.1} GiB usable, {:.2} GFLOP/s{load}, {power}",
        p.mem_bytes as f64 / (1u64 << 30) as f64,
        p.flops_per_s / 1e9
    )
}

fn power_text(battery: Option<Battery>, thermal: Option<Thermal>) -> String {
    let battery = match battery {
        Some(b) => format!("battery {:.0}%{}", b.level * 100.0, if b.charging { " charging" } else { "" }),
        None => "no battery".into(),
    };
    let thermal = thermal.map_or("thermal state unknown".into(), |t| format!("thermal {t:?}"));
    format!("{battery}, {thermal}")
}

fn short(id: &str) -> String {
    id[id.len().saturating_sub(8)..].to_string()
}
