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
//! Its parts: `inbound` (what members say), `ask` (what they ask of the
//! leader), `measure` (links, power, pace against the profile), `publish`
//! (the leader's solve and publication), `view` (what `llnode plan` shows).

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

use crate::actor::Waiter;
use crate::protocol::{NodeMessage, PlanDoc, Readiness, SignedPlan};

mod ask;
mod inbound;
mod measure;
mod publish;
mod view;

pub use measure::PROBE;
pub use publish::same_assignment;
pub use view::PlanView;
use view::describe;

/// Changes arriving within this time are planned for together.
const DEBOUNCE: Duration = Duration::from_millis(300);
/// How long the leader waits for a new member's profile before planning without it.
const PROFILE_WAIT: Duration = Duration::from_secs(5);
/// How often links to members are measured again.
const LINK_INTERVAL: Duration = Duration::from_secs(30);
/// A new assignment for the same devices must beat the held one by this share.
const MIN_GAIN: f64 = 0.1;
/// Tokens over which a plan's gain must make up for the time its units take
/// to load ([`llnode_planner::assign::settle`]): an answer's length.
const SETTLE_HORIZON: f64 = 256.0;
/// A node that has met no member by then leads (and plans for) itself.
const ALONE_GRACE: Duration = Duration::from_secs(10);
/// How long a node that follows no leader listens, once it meets members,
/// for whom they follow before it calls an election: a member tells one it
/// meets at once, so a device joining a mesh follows its leader rather than
/// unseating it with a smaller id. While a member has named a leader this
/// node has not met yet, it waits for it up to [`JOIN_WAITS`] times as long.
const JOIN_GRACE: Duration = Duration::from_millis(500);
const JOIN_WAITS: u32 = 10;
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
    /// This device trusts `peer`, whose certificate names it `name` (before
    /// it is a member: history lines name it before its profile comes).
    Trusted {
        peer: PeerId,
        name: String,
    },
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
    /// Call an election if no member has named a live leader ([`JOIN_GRACE`]);
    /// `waited`: how many graces have passed.
    Elect {
        waited: u32,
    },
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
    /// The balancer's probes found this device `probe / before` times as
    /// slow as when its pace last slowed its profile (under 1: faster):
    /// scale the profile, never faster than the device's first measure.
    /// Answered with how many times slower than that first measure it is then.
    Probed {
        probe: Duration,
        before: Duration,
        reply: RpcReplyPort<f64>,
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

pub struct PlanningState {
    args: PlanningArgs,
    me: String,
    /// This device's speed (FLOP/s) when first measured.
    first_flops: Option<f64>,
    election: Election,
    members: BTreeSet<PeerId>,
    profiles: HashMap<String, DeviceProfile>,
    /// The names trusted devices' certificates give them, by peer id.
    names: HashMap<String, String>,
    held: Option<(SignedPlan, PlanDoc)>,
    problem: Option<String>,
    history: History,
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
    /// Leader: re-plans that kept the held plan since it was published.
    kept_by: usize,
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
            first_flops: None,
            args,
            members: BTreeSet::new(),
            profiles: HashMap::new(),
            names: HashMap::new(),
            held: None,
            problem: Some("waiting for this device's profile".into()),
            history: History::default(),
            generation: 0,
            solving: false,
            replan_queued: false,
            waiting_since: None,
            links: BTreeMap::new(),
            planned_for: 0,
            learning: false,
            announced,
            reasons: Vec::new(),
            kept_by: 0,
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
            PlanningMsg::Trusted { peer, name } => {
                state.names.insert(peer.to_base58(), name);
            }
            PlanningMsg::MemberUp(peer) => {
                state.members.insert(peer);
                state.membership_changed(&myself);
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
                    state.membership_changed(&myself);
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
                state.first_flops = Some(profile.flops_per_s);
                if state.held.is_none() {
                    state.problem = Some("waiting for the members to elect a leader and for its plan".into());
                }
                profile.links = state.links.clone();
                state.profiles.insert(state.me.clone(), profile.clone());
                state.broadcast(NodeMessage::Profile(profile));
                state.changed(&myself);
            }
            PlanningMsg::MeasureLinks => state.measure_links(&myself),
            PlanningMsg::LinksMeasured(links, (battery, thermal)) => {
                state.links_measured(links, battery, thermal, &myself)
            }
            PlanningMsg::Alone => {
                // Plans held by members met later are exchanged then, and the higher epoch wins.
                if state.members.is_empty() && state.election.current().is_none() && state.elect() {
                    state.changed(&myself);
                }
            }
            // A leader named by a member is likely to be met soon: wait for it, a while.
            PlanningMsg::Elect { waited } if state.election.heard().is_some() && waited + 1 < JOIN_WAITS => {
                myself.send_after(JOIN_GRACE, move || PlanningMsg::Elect { waited: waited + 1 });
            }
            PlanningMsg::Elect { .. } => {
                if state.elect() {
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
            PlanningMsg::Probed { probe, before, reply } => {
                let _ = reply.send(state.probed(probe, before, &myself));
            }
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
    /// Something the next plan answers, kept by the leader only (members do not plan).
    fn reason(&mut self, why: String) {
        if self.election.is_leader() {
            self.reasons.push(why);
        }
    }

    fn note(&mut self, event: String) {
        tracing::info!("{event}");
        self.history.push(event);
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

    /// This device and the live members, by peer id.
    fn live(&self) -> Vec<String> {
        std::iter::once(self.me.clone()).chain(self.members.iter().map(|p| p.to_base58())).collect()
    }

    fn broadcast(&self, message: NodeMessage) {
        for peer in &self.members {
            self.send(*peer, message.clone());
        }
    }

    /// Elects a leader when the one followed left; follows one a member
    /// named before this node met it; without any, elects after [`JOIN_GRACE`].
    fn membership_changed(&mut self, myself: &ActorRef<PlanningMsg>) {
        let before = self.election.current().cloned();
        let live = self.members.iter().map(|p| p.to_base58()).collect();
        if let Some(leadership) = self.election.members(live) {
            self.announce(leadership);
        } else if let Some(now) = self.election.current().filter(|now| before.as_ref() != Some(*now)).cloned() {
            self.note(format!("term {}: {} leads", now.term, self.name_of(&now.leader)));
        }
        if self.election.leaderless() && !self.members.is_empty() {
            myself.send_after(JOIN_GRACE, || PlanningMsg::Elect { waited: 0 });
        }
    }

    /// Starts a term if no live leader is followed, and says so; whether it did.
    fn elect(&mut self) -> bool {
        let Some(leadership) = self.election.elect() else { return false };
        self.announce(leadership);
        true
    }

    fn announce(&mut self, leadership: Leadership) {
        self.note(format!(
            "term {}: {} leads (the previous leader left or there was none)",
            leadership.term,
            self.name_of(&leadership.leader)
        ));
        self.broadcast(NodeMessage::Leader(leadership));
    }

    /// A device's name for history lines: its profile's, else its
    /// certificate's, else a short form of its id.
    fn name_of(&self, id: &str) -> String {
        match (self.profiles.get(id), self.names.get(id)) {
            (Some(p), _) => p.name.clone(),
            (None, Some(name)) => name.clone(),
            (None, None) => short(id),
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
}

/// What `llnode plan` shows of how the plan came to be: the last
/// [`History::KEPT`] events.
#[derive(Default)]
struct History(Vec<String>);

impl History {
    const KEPT: usize = 50;

    fn push(&mut self, event: String) {
        self.0.push(event);
        if self.0.len() > Self::KEPT {
            self.0.remove(0);
        }
    }

    /// `event` at the end, in place of the last event that starts with `head`.
    fn renew(&mut self, head: &str, event: String) {
        if let Some(at) = self.0.iter().rposition(|e| e.starts_with(head)) {
            self.0.remove(at);
        }
        self.push(event);
    }

    fn events(&self) -> &[String] {
        &self.0
    }
}

fn short(id: &str) -> String {
    id[id.len().saturating_sub(8)..].to_string()
}

#[cfg(test)]
mod tests {
    use super::History;

    #[test]
    fn history_keeps_the_last_events_and_renews_one_in_place_of_its_last() {
        let mut history = History::default();
        history.push("epoch 1: published".into());
        history.renew("epoch 1 kept", "epoch 1 kept once".into());
        history.push("n2 left".into());
        history.renew("epoch 1 kept", "epoch 1 kept 2 times".into());
        assert_eq!(history.events(), ["epoch 1: published", "n2 left", "epoch 1 kept 2 times"]);
        // Another plan's line is not this one's.
        history.renew("epoch 1 kept", "epoch 1 kept 3 times".into());
        history.renew("epoch 12 kept", "epoch 12 kept once".into());
        assert_eq!(history.events()[2..], ["epoch 1 kept 3 times", "epoch 12 kept once"]);
        for i in 0..History::KEPT {
            history.push(format!("event {i}"));
        }
        assert_eq!(history.events().len(), History::KEPT);
        assert_eq!(history.events()[0], "event 0");
    }
}
