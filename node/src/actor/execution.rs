//! ExecutionActor: child of `llnode start`. Runs this device's segments of
//! the held plan. When a plan arrives it gets the package's manifest and this
//! device's unit files from the model store (which fetches what is missing
//! from members) and loads their runners; tensors that arrive meanwhile wait.
//! It keeps one KV cache per session per segment (until the initiator ends
//! the session or leaves the mesh, or nothing has come for it in 10 min),
//! gathers each step's inputs (from the initiator and from earlier segments,
//! as the transmission map says), runs the step (on the blocking pool, or on
//! its own thread for a decode step of its only session) and sends each
//! output straight to the segments that read it and the logits to the initiator.
//! Every tensor names the plan epoch it was routed by: one for a newer plan
//! waits until that plan arrives, one for a replaced plan is refused. It
//! times its decode steps for the balancer ([`crate::pace`]).
//!
//! A live move: when a new plan replaces a loaded one whose devices are all
//! still there (the balancer moved units), the old plan keeps serving its
//! sessions while the new one loads. Once the new plan is loaded everywhere,
//! each initiator moves its generation at a token boundary: the devices of
//! the old plan hand each layer's KV cache to the device that runs that layer
//! now ([`CacheMove`]) and the session goes on from there, without replaying
//! its tokens. The old plan is dropped once no session is left on it.
//! On the initiator it also hands out routes and delivers logits, and tells
//! a waiting step when the plan it runs on is gone ([`StepFail::Moved`]).

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::sync::Arc;

use llnode_mesh::wire::{DType, Tensor as WireTensor, TensorAck, TensorHeader};
use llnode_mesh::{MeshClient, PeerId, event::InboundId};
use llnode_models::pipeline::last_logits;
use llnode_models::raw::{self, RawTensor, RawType};
use llnode_models::runner::{Activations, Chain, ChainState, RunError, SegmentRunner};
use llnode_models::sampling::TopLogits;
use llnode_models::segment::is_past;
use llnode_models::transmission::{Endpoint, TransmissionMap};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::oneshot;

use crate::actor::Waiter;
use crate::protocol::{CacheMove, NodeMessage, PlanDoc, Readiness};
use crate::store::Store;

/// Tensors kept while this device's segments load; more are refused.
const MAX_EARLY: usize = 1024;
/// A device that could not get or load its units tries again this often (a source may appear).
const RETRY: std::time::Duration = std::time::Duration::from_secs(3);
/// How long a replaced plan keeps serving once the new one is loaded here;
/// sessions still on it after that replay on the new plan.
const PREVIOUS_GRACE: std::time::Duration = std::time::Duration::from_secs(30);
/// A session nothing has come for in this long is dropped: its initiator
/// gave up on it long ago (a step waits 120 s for its logits, a move 300 s
/// for a plan), and the end it sent was lost.
const SESSION_IDLE: std::time::Duration = std::time::Duration::from_secs(600);
/// How often idle sessions are looked for.
const SWEEP: std::time::Duration = std::time::Duration::from_secs(60);
/// Names of handed-over KV caches on the wire start with this.
const CACHE: &str = "cache:";

/// Why a session is refused when this device holds `max` (`--max-sessions`).
fn busy_sessions(max: usize) -> String {
    format!("{BUSY} this device holds {max} session(s) at once; retry in a moment")
}

/// How a refusal for want of room starts: the initiator ends the generation
/// with it, rather than wait for a plan without the device.
pub const BUSY: &str = "busy:";

/// Whether units `inner` lie inside `outer`.
fn inside(inner: &Range<usize>, outer: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}

/// Where an initiator's step gets its logits, or why they will not come.
type LogitsReply = oneshot::Sender<Result<Vec<f32>, StepFail>>;

/// Why a step's logits will not come.
#[derive(Debug)]
pub enum StepFail {
    /// The plan changed under it (a device left, the balancer moved units):
    /// the initiator can replay the generation on the next plan.
    Moved(String),
    /// The step itself failed.
    Failed(String),
}

impl StepFail {
    /// A step's tensors for segment `s` did not reach its device: one that
    /// cannot be reached or refuses is on its way out of the plan, unless it
    /// is busy; then the generation ends, to be retried.
    pub fn not_taken(s: usize, e: llnode_mesh::MeshError) -> StepFail {
        match e {
            llnode_mesh::MeshError::Refused(reason) if reason.starts_with(BUSY) => StepFail::Failed(reason),
            e => StepFail::Moved(format!("the device running segment {s} did not take the step ({e})")),
        }
    }

    pub fn reason(self) -> String {
        match self {
            StepFail::Moved(why) | StepFail::Failed(why) => why,
        }
    }

    fn text(&self) -> &str {
        match self {
            StepFail::Moved(why) | StepFail::Failed(why) => why,
        }
    }
}

pub struct ExecutionActor;

pub struct ExecutionArgs {
    pub me: PeerId,
    pub client: MeshClient,
    /// Where this device's unit files come from.
    pub store: Arc<Store>,
    /// Counts the activations sent to each member.
    pub traffic: Arc<crate::traffic::Traffic>,
    /// `--throttle`: stretches every segment step.
    pub throttle: Arc<crate::pace::Throttle>,
    /// Where this device stands with the plan it holds, for the planning actor to tell members.
    pub readiness: tokio::sync::watch::Sender<Option<(u64, Readiness)>>,
    /// Sessions whose KV caches this device keeps at once; tensors of new ones are refused beyond it.
    pub max_sessions: usize,
}

/// Where an initiator sends a step's inputs.
#[derive(Clone)]
pub struct Route {
    pub epoch: u64,
    pub model: String,
    pub devices: Vec<PeerId>,
    pub map: TransmissionMap,
}

/// One step's tensors for one segment, as they arrive.
pub struct Delivery {
    pub session: u64,
    /// The plan epoch the sender routed by.
    pub epoch: u64,
    pub initiator: PeerId,
    pub step: u64,
    pub tokens: u32,
    pub name: String,
    pub value: llnode_models::raw::RawTensor,
    /// How many logits the initiator reads ([`TensorHeader::top_logits`]).
    pub top_logits: u32,
}

pub enum ExecutionMsg {
    Plan(PlanDoc),
    /// The outcome of load number `load` (see [`ExecutionState::prepare`]).
    Loaded {
        load: u64,
        result: Result<Ready, String>,
    },
    /// Try again to get and load this device's units for the current plan, if they failed.
    Retry,
    /// A tensor from the mesh: acknowledge it, then deliver it.
    Inbound {
        peer: PeerId,
        id: InboundId,
        tensor: WireTensor,
    },
    /// A tensor for a segment on this device (from the local initiator or a local segment).
    Deliver(Delivery),
    /// `secs`: how long the step took, throttle included.
    StepDone {
        done: Step,
        secs: f64,
        state: ChainState,
        result: Result<Activations, RunError>,
    },
    /// The initiator's view of a plan newer than epoch `after` (answered once it is loaded).
    Route {
        after: u64,
        reply: RpcReplyPort<Result<Route, String>>,
    },
    /// The initiator waits for a step's logits, on its route of plan `epoch`.
    AwaitLogits {
        session: u64,
        epoch: u64,
        step: u64,
        reply: LogitsReply,
    },
    EndSession {
        session: u64,
    },
    /// Device `from` says step `step` of this initiator's session failed there.
    StepFailed {
        from: PeerId,
        session: u64,
        step: u64,
        why: StepFail,
    },
    PeerGone(PeerId),
    /// Time to drop idle sessions ([`SESSION_IDLE`]).
    Sweep,
    /// A peer is a member (again): sessions it starts are served.
    MemberUp(PeerId),
    /// The leader cannot plan (`reason`): initiators waiting for a new plan stop waiting.
    NoPlan(String),
    /// This device's measured pace since the last call, when there are enough steps.
    TakePace(RpcReplyPort<Option<crate::pace::Pace>>),
    /// The initiator's route on the plan held, at once, if its assignment is
    /// newer than epoch `after` and this device has loaded it.
    NewerRoute {
        after: u64,
        reply: RpcReplyPort<Option<Route>>,
    },
    /// Part of a live move, from the initiator `asker`; `waiter` hears when it is done.
    Move {
        asker: PeerId,
        order: CacheMove,
        waiter: Waiter,
    },
    /// Runners of the spare units the plan of load number `load` gives this device, loaded ahead.
    SparesLoaded {
        load: u64,
        runners: Vec<Arc<SegmentRunner>>,
    },
    /// The grace of the plan replaced at `first_epoch` is over: sessions still on it replay.
    DropPrevious {
        first_epoch: u64,
    },
}

struct Current {
    doc: PlanDoc,
    /// The first epoch of this assignment: tensors routed by it or later run here.
    first_epoch: u64,
    devices: Vec<PeerId>,
    /// The load whose outcome `ready` waits for; a newer epoch with the same assignment keeps it.
    load: u64,
    /// Once this device holds its units: `Ok`, or why it cannot run them.
    ready: Option<Result<Ready, String>>,
    /// Tensors that arrived before `ready`.
    early: Vec<Delivery>,
    /// Initiators waiting for a route newer than the epoch each names.
    route_waiters: Vec<(u64, RpcReplyPort<Result<Route, String>>)>,
    /// The leader said it cannot plan for the members left: why.
    no_plan: Option<String>,
    /// Devices of this plan that left the mesh since it came.
    gone: BTreeSet<PeerId>,
}

/// A plan this device can run its share of.
pub struct Ready {
    map: TransmissionMap,
    /// Each local segment, as runners of consecutive units.
    runners: HashMap<usize, Arc<Chain>>,
    /// Every runner this device holds: its segments' parts, and spare units
    /// loaded ahead, so that a move loads only units new to it.
    held: Vec<Arc<SegmentRunner>>,
    /// The spare units the plan gives it.
    spares: Vec<Range<usize>>,
    /// Units loaded for this plan; the others were held already.
    fresh: usize,
    /// The package files its segments read.
    files: BTreeSet<String>,
    /// Files of the spare units the plan gives it ([`llnode_planner::plan::Spare`]), not among `files`.
    spare_files: BTreeSet<String>,
    /// The unit that reads each cache (`past_key_values.N.key|value`): where a layer's cache goes in a live move.
    cache_units: HashMap<String, usize>,
}

impl Ready {
    /// Takes the spares `doc` (an epoch of the same assignment) gives this
    /// device; whether they changed.
    fn refresh_spares(&mut self, doc: &PlanDoc, args: &ExecutionArgs) -> bool {
        let spares = spares_of(doc, &args.me.to_base58());
        let Some(manifest) = args.store.manifest(&doc.model).filter(|_| spares != self.spares) else { return false };
        self.spare_files = spare_files(&manifest, &spares, &self.files);
        // Runners of spares no longer given are freed once no plan uses them.
        let own: Vec<Range<usize>> = self.runners.keys().filter_map(|&s| doc.plan.stages.get(s)).map(|s| s.units.clone()).collect();
        self.held.retain(|r| own.iter().chain(&spares).any(|x| inside(&r.units(), x)));
        self.spares = spares;
        true
    }
}

/// The spare units `doc` gives device `me`.
fn spares_of(doc: &PlanDoc, me: &str) -> Vec<Range<usize>> {
    doc.plan.spares.iter().filter(|s| s.device == me).map(|s| s.units.clone()).collect()
}

/// The files of `spares` not among `files` (those of the device's own segments).
fn spare_files(manifest: &llnode_models::package::Manifest, spares: &[Range<usize>], files: &BTreeSet<String>) -> BTreeSet<String> {
    spares.iter().flat_map(|r| manifest.unit_files(r.clone())).filter(|f| !files.contains(f)).collect()
}

/// The plans this device serves: the one it holds, and during a live move
/// the loaded one it replaced.
#[derive(Default)]
struct Plans {
    current: Option<Current>,
    previous: Option<Current>,
}

impl Plans {
    /// The plan that serves sessions routed by `epoch`.
    fn of(&self, epoch: u64) -> Option<&Current> {
        if self.is_current(epoch) {
            self.current.as_ref()
        } else {
            self.current.as_ref()?;
            self.previous.as_ref().filter(|p| p.covers(epoch))
        }
    }

    fn of_mut(&mut self, epoch: u64) -> Option<&mut Current> {
        if self.is_current(epoch) {
            self.current.as_mut()
        } else {
            self.current.as_ref()?;
            self.previous.as_mut().filter(|p| p.covers(epoch))
        }
    }

    /// Whether sessions routed by `epoch` run on the plan held (not one it replaced).
    fn is_current(&self, epoch: u64) -> bool {
        self.current.as_ref().is_some_and(|c| epoch >= c.first_epoch)
    }
}

impl Current {
    /// Whether sessions routed by `epoch` run on this plan as a replaced one
    /// (from its first epoch to the last it was held at).
    fn covers(&self, epoch: u64) -> bool {
        (self.first_epoch..=self.doc.epoch).contains(&epoch)
    }

    fn ready(&self) -> Option<&Ready> {
        self.ready.as_ref().and_then(|r| r.as_ref().ok())
    }

    /// Answers the waiters this plan satisfies, once it is loaded.
    fn answer_waiters(&mut self) {
        let Some(route) = self.route() else { return };
        let epoch = self.doc.epoch;
        let (now, later): (Vec<_>, Vec<_>) = self.route_waiters.drain(..).partition(|(after, _)| *after < epoch);
        self.route_waiters = later;
        for (_, reply) in now {
            let _ = reply.send(route.clone());
        }
    }

    fn route(&self) -> Option<Result<Route, String>> {
        let ready = self.ready.as_ref()?;
        Some(ready.as_ref().map_err(Clone::clone).map(|r| Route {
            epoch: self.doc.epoch,
            model: self.doc.model.clone(),
            devices: self.devices.clone(),
            map: r.map.clone(),
        }))
    }
}

struct Session {
    initiator: PeerId,
    /// The plan epoch its initiator routes by.
    epoch: u64,
    /// Each local segment's cache; `None` while a step runs.
    states: HashMap<usize, Option<ChainState>>,
    /// The step each local segment runs next (steps may arrive out of order).
    next: HashMap<usize, u64>,
    /// Inputs gathered per (segment, step).
    inbox: HashMap<(usize, u64), (u32, Activations)>,
    /// How many logits the initiator reads, as its tensors say.
    top_logits: u32,
    /// When a tensor of it last came.
    heard: std::time::Instant,
}

/// Which step of which session a segment ran.
#[derive(Clone, Copy)]
pub struct Step {
    session: u64,
    segment: usize,
    step: u64,
    tokens: u32,
}

/// Caches handed over for a session that has not started here yet.
struct Import {
    initiator: PeerId,
    /// By cache name: the tokens it holds, and the tensor.
    caches: HashMap<String, (u32, RawTensor)>,
    /// When a cache of it last came.
    heard: std::time::Instant,
}

pub struct ExecutionState {
    args: ExecutionArgs,
    plans: Plans,
    sessions: HashMap<u64, Session>,
    /// Initiators' steps waiting for logits: the epoch each is routed by, and where the logits go.
    waiting: HashMap<(u64, u64), (u64, LogitsReply)>,
    /// Caches handed over for sessions about to start here ([`CacheMove::Seal`]).
    imports: HashMap<u64, Import>,
    /// Numbers loads, so that only the latest one's outcome counts.
    loads: u64,
    /// Tensors routed by a plan this device has not received yet.
    ahead: Vec<Delivery>,
    /// Decode-step timings for the balancer.
    pace: crate::pace::PaceWindow,
    /// Peers that left and have not come back. A session of theirs is not
    /// opened: a step still between two stages when its initiator left would
    /// otherwise open one after its sessions were dropped, and keep its
    /// caches for good.
    left: std::collections::HashSet<PeerId>,
}

impl Actor for ExecutionActor {
    type Msg = ExecutionMsg;
    type State = ExecutionState;
    type Arguments = ExecutionArgs;

    async fn pre_start(&self, myself: ActorRef<ExecutionMsg>, args: ExecutionArgs) -> Result<ExecutionState, ActorProcessingErr> {
        myself.send_interval(SWEEP, || ExecutionMsg::Sweep);
        Ok(ExecutionState {
            args,
            plans: Plans::default(),
            sessions: HashMap::new(),
            waiting: HashMap::new(),
            imports: HashMap::new(),
            loads: 0,
            ahead: Vec::new(),
            pace: Default::default(),
            left: Default::default(),
        })
    }

    async fn handle(&self, myself: ActorRef<ExecutionMsg>, msg: ExecutionMsg, state: &mut ExecutionState) -> Result<(), ActorProcessingErr> {
        match msg {
            ExecutionMsg::Plan(doc) => state.adopt(doc, &myself),
            ExecutionMsg::Loaded { load, result } => {
                let Some(current) = state.plans.current.as_mut().filter(|c| c.load == load) else {
                    return Ok(());
                };
                let epoch = current.doc.epoch;
                let mut result = result;
                match &mut result {
                    Ok(ready) => {
                        tracing::info!("epoch {epoch}: loaded {} segment(s), {} unit(s) new to this device", ready.runners.len(), ready.fresh);
                        // A newer epoch of the same assignment may have come while loading.
                        ready.refresh_spares(&current.doc, &state.args);
                        hold_spares(&state.args, ready, &current.doc.model, load, &myself);
                    }
                    Err(e) => {
                        tracing::error!("epoch {epoch}: cannot run this device's share of the plan: {e}; trying again in {} s", RETRY.as_secs());
                        myself.send_after(RETRY, || ExecutionMsg::Retry);
                    }
                }
                let loaded = result.is_ok();
                state.args.readiness.send_replace(Some((epoch, readiness(Some(&result)))));
                current.ready = Some(result);
                current.answer_waiters();
                // Tensors that came early wait for a retry that succeeds.
                if !loaded {
                    return Ok(());
                }
                let early = std::mem::take(&mut current.early);
                if let Some(previous) = &state.plans.previous {
                    let first_epoch = previous.first_epoch;
                    myself.send_after(PREVIOUS_GRACE, move || ExecutionMsg::DropPrevious { first_epoch });
                }
                state.drop_previous_if_idle();
                state.redeliver(early, "came while this device loaded its units", &myself);
            }
            ExecutionMsg::Inbound { peer, id, tensor } => {
                let ack = match delivery(peer, tensor) {
                    Ok(d) if d.name == "logits" => {
                        state.logits(d);
                        TensorAck::Received
                    }
                    Ok(d) if d.name.starts_with(CACHE) => match state.import(d) {
                        Ok(()) => TensorAck::Received,
                        Err(reason) => TensorAck::Refused { reason },
                    },
                    Ok(d) => {
                        let (session, initiator, step) = (d.session, d.initiator, d.step);
                        match state.deliver(d, &myself) {
                            Ok(()) => TensorAck::Received,
                            Err(why) => {
                                let ack = TensorAck::Refused { reason: why.text().to_string() };
                                // The sender hears it in the acknowledgement; an
                                // initiator that did not send the tensor hears it too.
                                if initiator != peer {
                                    state.fail(session, initiator, step, why);
                                }
                                ack
                            }
                        }
                    }
                    Err(reason) => TensorAck::Refused { reason },
                };
                state.args.client.ack_tensor(id, ack);
            }
            ExecutionMsg::Retry => {
                // Whatever plan is current now: a newer epoch with the same assignment keeps the failure.
                let Some(current) = state.plans.current.as_ref().filter(|c| matches!(c.ready, Some(Err(_)))) else {
                    return Ok(());
                };
                let doc = current.doc.clone();
                let load = state.prepare(&doc, Vec::new(), &myself);
                let current = state.plans.current.as_mut().expect("checked above");
                current.ready = None;
                current.load = load;
            }
            ExecutionMsg::Deliver(d) => {
                let (session, initiator, step) = (d.session, d.initiator, d.step);
                if let Err(why) = state.deliver(d, &myself) {
                    state.fail(session, initiator, step, why);
                }
            }
            ExecutionMsg::StepDone { done, secs, state: cache, result } => {
                state.step_done(done, secs, cache, result, &myself);
            }
            ExecutionMsg::Route { after, reply } => match &mut state.plans.current {
                Some(c) => match &c.no_plan {
                    // Waiting for a newer plan that the leader said cannot be made.
                    Some(reason) if after >= c.doc.epoch => {
                        let _ = reply.send(Err(format!("the mesh has no plan that can run the model: {reason}")));
                    }
                    _ => {
                        c.route_waiters.push((after, reply));
                        c.answer_waiters();
                    }
                },
                None => {
                    let _ = reply.send(Err("no plan yet; `llnode plan` says what the mesh is waiting for".to_string()));
                }
            },
            ExecutionMsg::AwaitLogits { session, epoch, step, reply } => match state.plans.of(epoch) {
                // A stage of the plan the step runs on has left: no step on it can finish.
                Some(plan) if !plan.gone.is_empty() => {
                    let peer = plan.gone.first().expect("not empty");
                    let _ = reply.send(Err(StepFail::Moved(format!("device {peer} left the mesh"))));
                }
                Some(_) => {
                    state.waiting.insert((session, step), (epoch, reply));
                }
                // A plan this device no longer serves, or a newer one it has not seen yet.
                None => match state.plans.current.as_ref() {
                    Some(current) if epoch < current.first_epoch => {
                        let _ = reply.send(Err(StepFail::Moved(format!("the mesh moved to plan epoch {}", current.doc.epoch))));
                    }
                    _ => {
                        state.waiting.insert((session, step), (epoch, reply));
                    }
                },
            },
            ExecutionMsg::StepFailed { from, session, step, why } => {
                // Only a device of the plan the step runs on can fail it.
                let plan = state.waiting.get(&(session, step)).and_then(|(epoch, _)| state.plans.of(*epoch));
                if plan.is_some_and(|p| p.devices.contains(&from)) {
                    let me = state.args.me;
                    state.fail(session, me, step, why);
                }
            }
            ExecutionMsg::EndSession { session } => {
                state.sessions.remove(&session);
                state.imports.remove(&session);
                state.waiting.retain(|(s, _), _| *s != session);
                state.drop_previous_if_idle();
                if state.sessions.is_empty() {
                    crate::alloc::hand_back();
                }
            }
            ExecutionMsg::PeerGone(peer) => {
                // Sessions started by a device that left end with it.
                state.left.insert(peer);
                state.sessions.retain(|_, s| s.initiator != peer);
                state.imports.retain(|_, i| i.initiator != peer);
                // Steps waiting here for logits cannot finish without a stage's device,
                // nor can later ones until a new plan comes.
                if let Some(current) = state.plans.current.as_mut().filter(|c| c.devices.contains(&peer)) {
                    current.gone.insert(peer);
                    let first_epoch = current.first_epoch;
                    for (_, (_, reply)) in state.waiting.extract_if(|_, (epoch, _)| *epoch >= first_epoch) {
                        let _ = reply.send(Err(StepFail::Moved(format!("device {peer} left the mesh"))));
                    }
                }
                // A replaced plan that lost a device serves nothing more.
                if state.plans.previous.as_ref().is_some_and(|p| p.devices.contains(&peer)) {
                    state.drop_previous(&format!("device {peer} left the mesh"));
                }
                state.drop_previous_if_idle();
            }
            ExecutionMsg::Sweep => {
                let dropped = sweep(&mut state.sessions, &mut state.imports, std::time::Instant::now());
                if dropped > 0 {
                    tracing::info!("dropped {dropped} session(s) nothing came for in {} s", SESSION_IDLE.as_secs());
                    state.drop_previous_if_idle();
                    if state.sessions.is_empty() {
                        crate::alloc::hand_back();
                    }
                }
            }
            ExecutionMsg::MemberUp(peer) => {
                state.left.remove(&peer);
            }
            ExecutionMsg::NewerRoute { after, reply } => {
                let newer = state.plans.current.as_ref().filter(|c| c.first_epoch > after && c.gone.is_empty());
                let _ = reply.send(newer.and_then(Current::route).and_then(Result::ok));
            }
            ExecutionMsg::Move { asker, order, waiter } => state.move_caches(asker, order, waiter),
            ExecutionMsg::SparesLoaded { load, runners } => {
                if let Some(Ok(ready)) = state.plans.current.as_mut().filter(|c| c.load == load).and_then(|c| c.ready.as_mut()) {
                    ready.held.extend(runners);
                }
            }
            ExecutionMsg::DropPrevious { first_epoch } => {
                if state.plans.previous.as_ref().is_some_and(|p| p.first_epoch == first_epoch) {
                    state.drop_previous("the plan it ran on was replaced");
                }
            }
            ExecutionMsg::NoPlan(reason) => {
                let Some(current) = &mut state.plans.current else {
                    return Ok(());
                };
                current.no_plan = Some(reason.clone());
                let epoch = current.doc.epoch;
                for (_, reply) in current.route_waiters.extract_if(.., |(after, _)| *after >= epoch) {
                    let _ = reply.send(Err(format!("the mesh has no plan that can run the model: {reason}")));
                }
            }
            ExecutionMsg::TakePace(reply) => {
                let _ = reply.send(state.pace.take());
            }
        }
        Ok(())
    }
}

/// What a device whose load has this outcome (`None`: still loading) tells the members.
fn readiness(ready: Option<&Result<Ready, String>>) -> Readiness {
    match ready {
        None => Readiness::Loading(String::new()),
        Some(Ok(_)) => Readiness::Ready,
        Some(Err(e)) => Readiness::Failed(e.clone()),
    }
}

/// Reads a tensor off the wire.
fn delivery(initiator_or_sender: PeerId, tensor: WireTensor) -> Result<Delivery, String> {
    let h = tensor.header;
    let dtype = match h.dtype {
        DType::F32 => RawType::F32,
        DType::F16 => RawType::F16,
        DType::I64 => RawType::I64,
        DType::I32 => RawType::I32,
        DType::Bool => RawType::Bool,
        DType::U8 => return Err("u8 tensors are not activations".into()),
    };
    // The initiator's id rides in the name: "<initiator>/<tensor>".
    let (initiator, name) = match h.name.split_once('/') {
        Some((who, name)) => (who.parse().map_err(|_| "bad initiator in tensor name".to_string())?, name.to_string()),
        None => (initiator_or_sender, h.name),
    };
    let shape = h.shape.iter().map(|&d| d as usize).collect();
    Ok(Delivery {
        session: h.session,
        epoch: h.epoch,
        initiator,
        step: h.step,
        tokens: h.tokens,
        name,
        value: RawTensor { dtype, shape, data: tensor.data },
        top_logits: h.top_logits,
    })
}

/// A step's logits for its initiator: all of them, or, for an initiator
/// that reads only the highest `top`, just those ([`TopLogits`]): 16 bytes
/// rather than 4 per token of the vocabulary for a greedy generation.
fn logits_tensor(logits: &[f32], top: u32) -> RawTensor {
    match TopLogits::of(logits, top as usize) {
        Some(top) => {
            let words = top.to_words();
            let data = words.iter().flatten().flat_map(|w| w.to_le_bytes()).collect();
            RawTensor { dtype: RawType::I32, shape: vec![words.len(), 2], data }
        }
        None => {
            let data = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
            RawTensor { dtype: RawType::F32, shape: vec![1, 1, logits.len()], data }
        }
    }
}

/// The logits in a [`logits_tensor`], as the sampler reads them.
fn read_logits(value: RawTensor) -> Result<Vec<f32>, String> {
    fn words(bytes: &[u8]) -> impl Iterator<Item = [u8; 4]> + '_ {
        bytes.chunks_exact(4).map(|w| w.try_into().expect("4 bytes"))
    }
    match value.dtype {
        RawType::F32 => Ok(words(&value.data).map(f32::from_le_bytes).collect()),
        RawType::I32 => {
            let ints: Vec<i32> = words(&value.data).map(i32::from_le_bytes).collect();
            let rows: Vec<[i32; 2]> = ints.chunks_exact(2).map(|r| [r[0], r[1]]).collect();
            Ok(TopLogits::from_words(&rows)?.expand())
        }
        other => Err(format!("logits came as {other:?}")),
    }
}

/// Puts a tensor on the wire.
pub fn wire_tensor(d: Delivery) -> WireTensor {
    let value = d.value;
    let dtype = match value.dtype {
        RawType::F32 => DType::F32,
        RawType::F16 => DType::F16,
        RawType::I64 => DType::I64,
        RawType::I32 => DType::I32,
        RawType::Bool => DType::Bool,
    };
    WireTensor {
        header: TensorHeader {
            session: d.session,
            step: d.step,
            tokens: d.tokens,
            epoch: d.epoch,
            name: format!("{}/{}", d.initiator, d.name),
            dtype,
            shape: value.shape.iter().map(|&d| d as u64).collect(),
            top_logits: d.top_logits,
        },
        data: value.data,
    }
}

impl ExecutionState {
    fn adopt(&mut self, doc: PlanDoc, myself: &ActorRef<ExecutionMsg>) {
        if let Some(current) = &mut self.plans.current {
            if current.doc.epoch >= doc.epoch {
                return;
            }
            // A device that left lost its caches, even if it is back in the same place.
            if current.doc.model == doc.model && current.gone.is_empty() && crate::actor::planning::same_assignment(&current.doc.plan, &doc.plan) {
                // Same segments on the same devices: runners and sessions carry on.
                self.args.readiness.send_replace(Some((doc.epoch, readiness(current.ready.as_ref()))));
                // Its spares may differ (a device that came back, with room for some).
                if let Some(Ok(ready)) = current.ready.as_mut()
                    && ready.refresh_spares(&doc, &self.args)
                {
                    hold_spares(&self.args, ready, &doc.model, current.load, myself);
                }
                current.doc = doc;
                current.no_plan = None;
                current.answer_waiters();
                self.deliver_ahead(myself);
                return;
            }
        }
        let devices: Vec<PeerId> = doc.plan.stages.iter().filter_map(|s| s.device.parse().ok()).collect();
        let mut waiters = Vec::new();
        let mut reuse = Vec::new();
        if let Some(mut outgoing) = self.plans.current.take() {
            waiters = std::mem::take(&mut outgoing.route_waiters);
            if outgoing.doc.model == doc.model {
                reuse = outgoing.ready().map(|r| r.held.clone()).unwrap_or_default();
            }
            // A loaded plan with all its devices serves on while this one
            // loads, until its sessions move (a live move); any other is
            // dropped, and its sessions replay on the new plan. A plan
            // without sessions is dropped at once: keeping it would only
            // hold its units in memory beside the new plan's.
            if self.serves(&outgoing) && outgoing.ready().is_some() && outgoing.gone.is_empty() && outgoing.doc.model == doc.model {
                tracing::info!("epoch {}: serving epoch {} until its sessions move", doc.epoch, outgoing.doc.epoch);
                self.plans.previous = Some(outgoing);
            }
        }
        self.pace.reset(doc.epoch);
        let load = self.prepare(&doc, reuse, myself);
        self.args.readiness.send_replace(Some((doc.epoch, readiness(None))));
        let first_epoch = doc.epoch;
        let epoch = doc.epoch;
        self.plans.current = Some(Current {
            doc,
            first_epoch,
            devices,
            load,
            ready: None,
            early: Vec::new(),
            route_waiters: waiters,
            no_plan: None,
            gone: BTreeSet::new(),
        });
        self.forget_orphans(&format!("the mesh moved to plan epoch {epoch}"));
        self.deliver_ahead(myself);
    }

    /// Sessions and waiting steps of plans this device no longer serves:
    /// gone. Their initiators replay them on the plan held (`why`).
    fn forget_orphans(&mut self, why: &str) {
        let plans = &self.plans;
        for (id, _) in self.sessions.extract_if(|_, s| plans.of(s.epoch).is_none()) {
            tracing::info!(session = id, "{why}: its initiator replays it");
        }
        for (_, (_, reply)) in self.waiting.extract_if(|_, (epoch, _)| plans.of(*epoch).is_none()) {
            let _ = reply.send(Err(StepFail::Moved(why.to_string())));
        }
    }

    /// Drops the replaced plan; its sessions replay (`why`).
    fn drop_previous(&mut self, why: &str) {
        self.plans.previous = None;
        self.forget_orphans(why);
        crate::alloc::hand_back();
    }

    /// Whether a session, or a step waiting for its logits, runs on `plan`.
    fn serves(&self, plan: &Current) -> bool {
        self.sessions.values().any(|s| plan.covers(s.epoch)) || self.waiting.values().any(|(epoch, _)| plan.covers(*epoch))
    }

    /// Drops the replaced plan once the one held is loaded and no session is left on it.
    fn drop_previous_if_idle(&mut self) {
        let loaded = self.plans.current.as_ref().is_some_and(|c| c.ready().is_some());
        let Some(previous) = self.plans.previous.as_ref().filter(|_| loaded) else { return };
        if !self.serves(previous) {
            tracing::info!("epoch {}: no session is left on it", previous.doc.epoch);
            self.plans.previous = None;
            crate::alloc::hand_back();
        }
    }

    /// Delivers the tensors that came ahead of the plan now held.
    fn deliver_ahead(&mut self, myself: &ActorRef<ExecutionMsg>) {
        let ahead = std::mem::take(&mut self.ahead);
        self.redeliver(ahead, "came ahead of its plan", myself);
    }

    /// Delivers tensors that waited (they `came` …); the initiator of one
    /// that cannot be delivered now hears why, as it would have at once.
    fn redeliver(&mut self, held: Vec<Delivery>, came: &str, myself: &ActorRef<ExecutionMsg>) {
        for d in held {
            let (session, initiator, step) = (d.session, d.initiator, d.step);
            if let Err(why) = self.deliver(d, myself) {
                tracing::info!(session, "a tensor that {came} cannot be delivered: {}", why.text());
                self.fail(session, initiator, step, why);
            }
        }
    }

    /// Gets and loads this device's share of `doc` in the background;
    /// `Loaded` brings the result under the number returned.
    fn prepare(&mut self, doc: &PlanDoc, reuse: Vec<Arc<SegmentRunner>>, myself: &ActorRef<ExecutionMsg>) -> u64 {
        self.loads += 1;
        let load = self.loads;
        let me = self.args.me.to_base58();
        let segments: Vec<Range<usize>> = doc.plan.stages.iter().map(|s| s.units.clone()).collect();
        let mine: Vec<usize> = doc.plan.stages.iter().enumerate().filter(|(_, s)| s.device == me).map(|(i, _)| i).collect();
        let spares = spares_of(doc, &me);
        let model = doc.model.clone();
        let (store, client, myself) = (self.args.store.clone(), self.args.client.clone(), myself.clone());
        tokio::spawn(async move {
            let result = prepare(&store, &client, &model, segments, mine, spares, reuse).await;
            let _ = myself.cast(ExecutionMsg::Loaded { load, result });
        });
        load
    }

    /// A tensor for segments on this device: file it with every local segment that reads it.
    /// A plan that moved on is [`StepFail::Moved`]; anything else wrong, [`StepFail::Failed`].
    fn deliver(&mut self, d: Delivery, myself: &ActorRef<ExecutionMsg>) -> Result<(), StepFail> {
        let failed = |why: &str| Err(StepFail::Failed(why.to_string()));
        let newer = self.plans.current.as_ref().is_none_or(|c| d.epoch > c.doc.epoch);
        if newer {
            if self.ahead.len() >= MAX_EARLY {
                return failed("busy: this device has not received the plan it is asked to run yet; retry in a moment");
            }
            self.ahead.push(d);
            return Ok(());
        }
        let held = self.plans.current.as_ref().map_or(0, |c| c.doc.epoch);
        let Some(current) = self.plans.of_mut(d.epoch) else {
            return Err(StepFail::Moved(format!(
                "routed by plan epoch {}, but this device runs epoch {held}; the initiator moves to the new plan",
                d.epoch
            )));
        };
        let ready = match &current.ready {
            None if current.early.len() >= MAX_EARLY => {
                return failed("busy: this device is still loading its units; retry in a moment");
            }
            None => {
                current.early.push(d);
                return Ok(());
            }
            Some(Err(e)) => {
                return Err(StepFail::Failed(format!("this device cannot run its share of the plan yet: {e}")));
            }
            Some(Ok(ready)) => ready,
        };
        let me = self.args.me;
        let readers: Vec<usize> = ready
            .map
            .transfers
            .iter()
            .filter(|t| t.tensor == d.name)
            .filter_map(|t| match t.to {
                Endpoint::Segment(s) if current.devices.get(s) == Some(&me) => Some(s),
                _ => None,
            })
            .collect();
        if !self.sessions.contains_key(&d.session) {
            if self.left.contains(&d.initiator) {
                return Err(StepFail::Failed(format!("the initiator of this session, {}, left the mesh", d.initiator)));
            }
            if self.sessions.len() >= self.args.max_sessions {
                return Err(StepFail::Failed(busy_sessions(self.args.max_sessions)));
            }
        }
        let value = raw::from_raw(&d.value).map_err(|e| StepFail::Failed(format!("bad tensor {}: {e}", d.name)))?;
        let session = self.sessions.entry(d.session).or_insert_with(|| Session {
            initiator: d.initiator,
            epoch: d.epoch,
            states: HashMap::new(),
            next: HashMap::new(),
            inbox: HashMap::new(),
            top_logits: d.top_logits,
            heard: std::time::Instant::now(),
        });
        session.top_logits = d.top_logits;
        session.heard = std::time::Instant::now();
        for s in &readers {
            let entry = session.inbox.entry((*s, d.step)).or_insert_with(|| (d.tokens, Activations::new()));
            entry.1.insert(d.name.clone(), value.clone());
        }
        for s in readers {
            self.try_run(d.session, s, d.step, myself);
        }
        Ok(())
    }

    /// Steps, over all sessions, whose inputs for segment `s` are all in and
    /// that wait for it: its queue depth.
    fn queued(&self, s: usize) -> usize {
        let Some(ready) = self.plans.current.as_ref().and_then(Current::ready) else {
            return 0;
        };
        let needed: Vec<&str> = ready.map.inputs_of(s).map(|t| t.tensor.as_str()).collect();
        self.sessions
            .values()
            .filter(|sess| self.plans.is_current(sess.epoch))
            .flat_map(|sess| sess.inbox.iter())
            .filter(|((seg, _), (_, acts))| *seg == s && needed.iter().all(|n| acts.contains_key(*n)))
            .count()
    }

    /// Runs segment `s` for `step` once all its inputs are in, every earlier
    /// step has run and its cache is free.
    fn try_run(&mut self, session: u64, s: usize, step: u64, myself: &ActorRef<ExecutionMsg>) {
        let Some(sess) = self.sessions.get_mut(&session) else {
            return;
        };
        let Some(ready) = self.plans.of(sess.epoch).and_then(Current::ready) else {
            return;
        };
        let Some(runner) = ready.runners.get(&s).cloned() else {
            return;
        };
        let needed: Vec<String> = ready.map.inputs_of(s).map(|t| t.tensor.clone()).collect();
        let ready = sess.inbox.get(&(s, step)).is_some_and(|(_, acts)| needed.iter().all(|n| acts.contains_key(n)));
        let turn = sess.next.get(&s).copied().unwrap_or(1) == step;
        let free = !matches!(sess.states.get(&s), Some(None));
        if !ready || !turn || !free {
            return;
        }
        let (tokens, acts) = sess.inbox.remove(&(s, step)).expect("ready");
        let inline = tokens == 1 && self.alone();
        let sess = self.sessions.get_mut(&session).expect("looked up above");
        let mut cache = sess.states.insert(s, None).flatten().unwrap_or_else(|| runner.new_state());
        let done = Step { session, segment: s, step, tokens };
        let throttle = self.args.throttle.clone();
        let run = move |cache: &mut ChainState| {
            let started = std::time::Instant::now();
            // A panic in tract fails the step, not the thread: on the
            // actor's own thread it would stop the actor.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runner.run(cache, tokens as usize, &acts)))
                .unwrap_or_else(|panic| Err(RunError::Run { units: runner.units(), reason: panic_message(&*panic) }));
            throttle.stretch(started.elapsed());
            (started.elapsed().as_secs_f64(), result)
        };
        if inline {
            // One session and nothing else running: its decode step runs on
            // this thread. Handing it to the blocking pool and its outputs
            // back would wake two threads, 150-200 µs of the token's time on
            // loopback. The actor is held for the step; with one session it
            // has nothing else to do but acknowledge tensors and answer
            // `llnode plan`, which wait until the step ends.
            let (secs, result) = tokio::task::block_in_place(|| run(&mut cache));
            self.step_done(done, secs, cache, result, myself);
            return;
        }
        let myself = myself.clone();
        tokio::task::spawn_blocking(move || {
            let (secs, result) = run(&mut cache);
            let _ = myself.cast(ExecutionMsg::StepDone { done, secs, state: cache, result });
        });
    }

    /// Whether this device serves one session and runs no step, on a runtime
    /// that can lend the actor's thread to a step ([`tokio::task::block_in_place`]).
    fn alone(&self) -> bool {
        let idle = |sess: &Session| sess.states.values().all(Option::is_some);
        self.sessions.len() == 1
            && self.sessions.values().all(idle)
            && tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
    }

    /// A step of `segment` has run: its cache goes back, its outputs go on,
    /// and the segment's next step runs if its inputs are in.
    fn step_done(&mut self, done: Step, secs: f64, cache: ChainState, result: Result<Activations, RunError>, myself: &ActorRef<ExecutionMsg>) {
        let Step { session, segment, step, tokens } = done;
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        s.states.insert(segment, Some(cache));
        s.next.insert(segment, step + 1);
        let (initiator, epoch) = (s.initiator, s.epoch);
        // The balancer compares the plan held with this device's profile: steps of a replaced plan do not count.
        if tokens == 1
            && result.is_ok()
            && self.plans.is_current(epoch)
            && let Some(stage) = self.plans.current.as_ref().and_then(|c| c.doc.plan.stages.get(segment))
        {
            let queued = self.queued(segment);
            self.pace.record(segment, stage.units.clone(), secs, queued);
        }
        match result {
            Ok(outputs) => self.forward(session, initiator, segment, step, tokens, outputs, myself),
            Err(e) => {
                tracing::error!(session, "segment {segment} failed at step {step}: {e}");
                self.fail(session, initiator, step, StepFail::Failed(format!("segment {segment} failed: {e}")));
            }
        }
        // The next step's inputs may already be here.
        self.try_run(session, segment, step + 1, myself);
    }

    /// Sends segment `s`'s outputs where the transmission map says.
    #[allow(clippy::too_many_arguments)]
    fn forward(&mut self, session: u64, initiator: PeerId, s: usize, step: u64, tokens: u32, outputs: Activations, myself: &ActorRef<ExecutionMsg>) {
        let Some((epoch, top_logits)) = self.sessions.get(&session).map(|sess| (sess.epoch, sess.top_logits)) else {
            return;
        };
        let Some(current) = self.plans.of(epoch) else { return };
        let Some(ready) = current.ready() else { return };
        let (transfers, devices): (Vec<_>, _) = (ready.map.outputs_of(s).cloned().collect(), current.devices.clone());
        let me = self.args.me;
        let mut local = Vec::new();
        // Each device's tensors of the step go together, in one write; named
        // by the first segment they feed.
        let mut remote: HashMap<PeerId, (usize, Vec<WireTensor>)> = HashMap::new();
        for t in &transfers {
            let Some(value) = outputs.get(&t.tensor) else {
                continue;
            };
            let converted = match t.to {
                Endpoint::Initiator => last_logits(value).map(|logits| (initiator, s, logits_tensor(&logits, top_logits))),
                Endpoint::Segment(d) => raw::to_raw(value).map(|raw| (devices[d], d, raw)).map_err(|e| RunError::Remote(e.to_string())),
            };
            let (to, feeds, raw) = match converted {
                Ok(sent) => sent,
                Err(e) => {
                    self.fail(session, initiator, step, StepFail::Failed(e.to_string()));
                    return;
                }
            };
            let d = Delivery { session, epoch, initiator, step, tokens, name: t.tensor.clone(), value: raw, top_logits };
            if to == me {
                local.push(d);
            } else {
                remote.entry(to).or_insert_with(|| (feeds, Vec::new())).1.push(wire_tensor(d));
            }
        }
        for (to, (first, tensors)) in remote {
            let (client, traffic) = (self.args.client.clone(), self.args.traffic.clone());
            // A device that refuses tells the initiator when the tensors did
            // not come from it; when they did, the initiator is this device.
            let initiator_here = (initiator == me).then(|| myself.clone());
            tokio::spawn(async move {
                let sizes: Vec<usize> = tensors.iter().map(|t| t.data.len()).collect();
                match client.send_tensors(to, tensors).await {
                    Ok(()) => sizes.into_iter().for_each(|bytes| traffic.record(&to, bytes)),
                    Err(e) => {
                        tracing::warn!(session, "cannot send a step's tensors to {to}: {e}");
                        if let Some(myself) = initiator_here {
                            let why = StepFail::not_taken(first, e);
                            let _ = myself.cast(ExecutionMsg::StepFailed { from: to, session, step, why });
                        }
                    }
                }
            });
        }
        for d in local {
            if d.name == "logits" {
                self.logits(d);
            } else if let Err(why) = self.deliver(d, myself) {
                self.fail(session, initiator, step, why);
            }
        }
    }

    /// A step of an initiator's live move ([`CacheMove`]); `waiter` hears when it is done.
    fn move_caches(&mut self, asker: PeerId, order: CacheMove, waiter: Waiter) {
        let client = self.args.client.clone();
        match order {
            CacheMove::HandOver { from, to, epoch, past, stages } => {
                let handed = match self.hand_over(asker, from, to, epoch, past, &stages) {
                    Ok(handed) => handed,
                    Err(why) => return waiter.answer(&client, Err(why)),
                };
                let mut sends = Vec::new();
                for (device, d) in handed {
                    if device == self.args.me {
                        if let Err(why) = self.import(d) {
                            return waiter.answer(&client, Err(why));
                        }
                    } else {
                        sends.push((device, wire_tensor(d)));
                    }
                }
                self.drop_previous_if_idle();
                let traffic = self.args.traffic.clone();
                tokio::spawn(async move {
                    let sent = futures::future::join_all(sends.into_iter().map(|(device, tensor)| {
                        let (client, traffic) = (client.clone(), traffic.clone());
                        async move {
                            let bytes = tensor.data.len();
                            client.send_tensor(device, tensor).await.map_err(|e| format!("cannot hand a cache to {device}: {e}"))?;
                            traffic.record(&device, bytes);
                            Ok::<(), String>(())
                        }
                    }))
                    .await;
                    waiter.answer(&client, sent.into_iter().collect());
                });
            }
            CacheMove::Seal { session, epoch, past } => {
                let result = self.seal(asker, session, epoch, past as usize);
                waiter.answer(&client, result);
            }
        }
    }

    /// Takes session `from`'s caches out of this device's segments, each
    /// addressed to the device that runs its layer in `stages` (the plan of
    /// `epoch`) for session `to`, and forgets `from`.
    fn hand_over(
        &mut self,
        asker: PeerId,
        from: u64,
        to: u64,
        epoch: u64,
        past: u64,
        stages: &[(String, Range<usize>)],
    ) -> Result<Vec<(PeerId, Delivery)>, String> {
        let session = self.sessions.get(&from).ok_or("this device holds no such session (it may have restarted); replay it")?;
        if session.initiator != asker {
            return Err("only a session's initiator can move it".into());
        }
        let ready = self.plans.of(session.epoch).and_then(Current::ready).ok_or("this device no longer runs the session's plan; replay it")?;
        let mut handed = Vec::new();
        for (s, state) in &session.states {
            let state = state.as_ref().ok_or_else(|| format!("segment {s} is still running a step of the session"))?;
            if state.past() as u64 != past {
                return Err(format!("segment {s} has run {} tokens of the session, not {past}", state.past()));
            }
            for (name, value) in state.caches() {
                let unit = ready.cache_units.get(name).ok_or_else(|| format!("no unit reads {name}"))?;
                let (device, _) = stages.iter().find(|(_, units)| units.contains(unit)).ok_or_else(|| format!("the new plan runs no unit {unit}"))?;
                let device: PeerId = device.parse().map_err(|_| format!("{device} is not a peer id"))?;
                let value = raw::to_raw(value).map_err(|e| e.to_string())?;
                let name = format!("{CACHE}{name}");
                handed.push((device, Delivery { session: to, epoch, initiator: asker, step: 0, tokens: past as u32, name, value, top_logits: 0 }));
            }
        }
        self.sessions.remove(&from);
        Ok(handed)
    }

    /// Keeps a handed-over cache until its session is sealed.
    fn import(&mut self, d: Delivery) -> Result<(), String> {
        if self.left.contains(&d.initiator) {
            return Err(format!("the initiator of this session, {}, left the mesh", d.initiator));
        }
        if !self.imports.contains_key(&d.session) && self.imports.len() >= self.args.max_sessions {
            return Err(busy_sessions(self.args.max_sessions));
        }
        let heard = std::time::Instant::now();
        let import = self.imports.entry(d.session).or_insert_with(|| Import { initiator: d.initiator, caches: HashMap::new(), heard });
        import.heard = heard;
        if import.initiator != d.initiator {
            return Err("this session belongs to another initiator".into());
        }
        let name = d.name.strip_prefix(CACHE).unwrap_or(&d.name).to_string();
        import.caches.insert(name, (d.tokens, d.value));
        Ok(())
    }

    /// Starts session `session` of plan `epoch` here, `past` tokens in, from
    /// the caches handed over: every segment of it here must have all of its own.
    fn seal(&mut self, asker: PeerId, session: u64, epoch: u64, past: usize) -> Result<(), String> {
        let ready = self.plans.of(epoch).and_then(Current::ready).ok_or_else(|| format!("this device does not run plan epoch {epoch} (any more)"))?;
        let mut import =
            self.imports.remove(&session).unwrap_or(Import { initiator: asker, caches: HashMap::new(), heard: std::time::Instant::now() });
        if import.initiator != asker {
            return Err("this session belongs to another initiator".into());
        }
        if !self.sessions.contains_key(&session) && self.sessions.len() >= self.args.max_sessions {
            return Err(busy_sessions(self.args.max_sessions));
        }
        let mut states = HashMap::new();
        for (&s, runner) in &ready.runners {
            let mut take = |name: &str| {
                let (tokens, raw) = import.caches.remove(name)?;
                (tokens as usize == past).then(|| raw::from_raw(&raw).ok()).flatten()
            };
            let state = runner.resume(past, &mut take).map_err(|e| format!("segment {s} cannot resume the session: {e}"))?;
            states.insert(s, Some(state));
        }
        // The session's next tensors say how many logits its initiator reads.
        let top_logits = 0;
        let heard = std::time::Instant::now();
        self.sessions.insert(session, Session { initiator: asker, epoch, states, next: HashMap::new(), inbox: HashMap::new(), top_logits, heard });
        Ok(())
    }

    fn logits(&mut self, d: Delivery) {
        let Some((_, reply)) = self.waiting.remove(&(d.session, d.step)) else {
            return;
        };
        let _ = reply.send(read_logits(d.value).map_err(StepFail::Failed));
    }

    /// Step `step` of `session` failed here: its initiator hears why, here
    /// or by a message (it would otherwise wait for logits that never come).
    fn fail(&mut self, session: u64, initiator: PeerId, step: u64, why: StepFail) {
        if initiator != self.args.me {
            let moved = matches!(why, StepFail::Moved(_));
            let message = NodeMessage::StepFailed { session, step, reason: why.reason(), moved }.encode();
            let client = self.args.client.clone();
            tokio::spawn(async move {
                if let Err(e) = client.request(initiator, llnode_mesh::wire::ControlRequest::Node(message)).await {
                    tracing::warn!(session, "cannot tell initiator {initiator} that step {step} failed: {e}");
                }
            });
        } else if let Some((_, reply)) = self.waiting.remove(&(session, step)) {
            let _ = reply.send(Err(why));
        }
    }
}

/// Drops the sessions and handed-over caches nothing has come for in
/// [`SESSION_IDLE`] by `now`, but not a session whose step is running; how many.
fn sweep(sessions: &mut HashMap<u64, Session>, imports: &mut HashMap<u64, Import>, now: std::time::Instant) -> usize {
    let before = sessions.len() + imports.len();
    let quiet = |heard: std::time::Instant| now.saturating_duration_since(heard) >= SESSION_IDLE;
    sessions.retain(|_, s| !quiet(s.heard) || s.states.values().any(Option::is_none));
    imports.retain(|_, i| !quiet(i.heard));
    before - sessions.len() - imports.len()
}

/// What a caught panic said.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let said = panic.downcast_ref::<&str>().copied().or_else(|| panic.downcast_ref::<String>().map(String::as_str));
    format!("it panicked: {}", said.unwrap_or("no message"))
}

/// How to run units `range` with the runners `held`: each held runner that
/// lies inside it (the longest where several start at one unit), and the
/// units between them, to load (`Err`).
fn cover(range: Range<usize>, held: &[Arc<SegmentRunner>]) -> Vec<Result<Arc<SegmentRunner>, Range<usize>>> {
    let within: Vec<&Arc<SegmentRunner>> = held.iter().filter(|r| inside(&r.units(), &range)).collect();
    let mut parts = Vec::new();
    let mut at = range.start;
    while at < range.end {
        match within.iter().filter(|r| r.units().start == at).max_by_key(|r| r.units().end) {
            Some(runner) => {
                at = runner.units().end;
                parts.push(Ok(Arc::clone(runner)));
            }
            None => {
                let next = within.iter().map(|r| r.units().start).filter(|&start| start > at).min().unwrap_or(range.end);
                parts.push(Err(at..next));
                at = next;
            }
        }
    }
    parts
}

/// In the background, after this device's own units: files of units it
/// neither runs nor keeps spare leave its disk, the files of its spare
/// units are fetched, and runners for the spare units it does not hold
/// are loaded (`SparesLoaded` under load number `load`), so that a move
/// onto them is at once.
fn hold_spares(args: &ExecutionArgs, ready: &Ready, model: &str, load: u64, myself: &ActorRef<ExecutionMsg>) {
    let (store, model) = (args.store.clone(), model.to_string());
    let keep: BTreeSet<String> = ready.files.union(&ready.spare_files).cloned().collect();
    let (spare, client) = (ready.spare_files.clone(), args.client.clone());
    let gaps: Vec<Range<usize>> = ready.spares.iter().flat_map(|r| cover(r.clone(), &ready.held)).filter_map(Result::err).collect();
    let myself = myself.clone();
    tokio::spawn(async move {
        let (retained, id) = (store.clone(), model.clone());
        let _ = tokio::task::spawn_blocking(move || retained.retain(&id, &keep)).await;
        if spare.is_empty() && gaps.is_empty() {
            return;
        }
        let loaded = match store.ensure(&client, &model, &spare).await {
            Ok(dir) => tokio::task::spawn_blocking(move || load_ranges(&dir, &gaps)).await.map_err(|e| e.to_string()).and_then(|r| r),
            Err(e) => Err(e),
        };
        match loaded {
            Ok(runners) => {
                tracing::info!("holding {} spare file(s) for failover, {} spare unit(s) loaded", spare.len(), runners.values().map(Vec::len).sum::<usize>());
                let _ = myself.cast(ExecutionMsg::SparesLoaded { load, runners: runners.into_values().flatten().collect() });
            }
            Err(e) => tracing::warn!("cannot get the spare units the plan gives this device: {e}"),
        }
    });
}

/// Loads the units of each of `ranges` from the package in `dir`, a runner
/// per unit, one after another: any later plan can reuse any of them, and
/// loading holds one unit's weights twice at most (tract optimises a graph
/// with its weights in it), not a whole segment's. Small graphs also
/// optimise faster: the built-in bench model loads in 1.1 s as 14 runners
/// against 2.5 s as one.
fn load_ranges(dir: &std::path::Path, ranges: &[Range<usize>]) -> Result<HashMap<Range<usize>, Vec<Arc<SegmentRunner>>>, String> {
    // The weights get huge-page mappings of their own (src/alloc.rs).
    crate::alloc::loading(|| {
        if ranges.is_empty() {
            return Ok(HashMap::new());
        }
        let model = llnode_models::package::load_units(dir, ranges).map_err(|e| e.to_string())?;
        let loaded = ranges
            .iter()
            .map(|r| {
                let units = r.clone().map(|u| {
                    let runner = SegmentRunner::load_range(&model, u..u + 1).map(Arc::new).map_err(|e| e.to_string());
                    // The unit's weights as read, before tract packed them, go back before the next unit's are read.
                    crate::alloc::hand_back();
                    runner
                });
                units.collect::<Result<Vec<_>, _>>().map(|runners| (r.clone(), runners))
            })
            .collect();
        // The graphs and tract's unpacked copies are gone: their memory goes back now, not at the next allocation.
        drop(model);
        crate::alloc::hand_back();
        loaded
    })
}

/// Gets the manifest and this device's unit files (fetching what is missing)
/// and makes each of its segments a chain of runners: those it holds
/// (`reuse`) where they fit, loading the units between them.
async fn prepare(
    store: &Arc<Store>,
    client: &MeshClient,
    model: &str,
    segments: Vec<Range<usize>>,
    mine: Vec<usize>,
    spares: Vec<Range<usize>>,
    reuse: Vec<Arc<SegmentRunner>>,
) -> Result<Ready, String> {
    let manifest = store.ensure_manifest(client, model).await?;
    let specs: Vec<_> = manifest.units.iter().map(|u| u.spec.clone()).collect();
    let map = TransmissionMap::new(&specs, &segments).map_err(|e| format!("the plan does not fit the package: {e}"))?;
    let cache_units = specs.iter().enumerate().flat_map(|(u, spec)| spec.inputs.iter().filter(|n| is_past(n)).map(move |n| (n.clone(), u))).collect();
    let files: BTreeSet<String> = mine.iter().flat_map(|&s| manifest.unit_files(segments[s].clone())).collect();
    let spare_files = spare_files(&manifest, &spares, &files);
    let covers: Vec<(usize, Vec<_>)> = mine.iter().map(|&s| (s, cover(segments[s].clone(), &reuse))).collect();
    // Held runners the new plan neither runs nor keeps spare are let go
    // before anything loads: a device holds old and new units at once only
    // while a plan it still serves keeps the old ones.
    let covering = |r: &Arc<SegmentRunner>| covers.iter().flat_map(|(_, parts)| parts.iter().flatten()).any(|h| Arc::ptr_eq(h, r));
    let reuse: Vec<Arc<SegmentRunner>> = reuse.into_iter().filter(|r| covering(r) || spares.iter().any(|s| inside(&r.units(), s))).collect();
    let gaps: Vec<Range<usize>> = covers.iter().flat_map(|(_, parts)| parts.iter().filter_map(|p| p.clone().err())).collect();
    let fresh = gaps.iter().map(ExactSizeIterator::len).sum();
    let mut loaded = HashMap::new();
    if !gaps.is_empty() {
        let dir = store.ensure(client, model, &files).await?;
        loaded = tokio::task::spawn_blocking(move || load_ranges(&dir, &gaps)).await.map_err(|e| format!("loading failed: {e}"))??;
    }
    let mut runners = HashMap::new();
    let mut held: Vec<Arc<SegmentRunner>> = Vec::new();
    for (s, parts) in covers {
        let parts: Vec<Arc<SegmentRunner>> = parts.into_iter().flat_map(|p| p.map_or_else(|gap| loaded[&gap].clone(), |held| vec![held])).collect();
        held.extend(parts.iter().cloned());
        runners.insert(s, Arc::new(Chain::new(parts)));
    }
    // Held runners that fit the new spares stay (the rest are freed once no plan uses them).
    for runner in reuse {
        let spare = spares.iter().any(|s| inside(&runner.units(), s));
        if spare && !held.iter().any(|h| Arc::ptr_eq(h, &runner)) {
            held.push(runner);
        }
    }
    Ok(Ready { map, runners, held, spares, fresh, files, spare_files, cache_units })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_nothing_came_for_are_swept_unless_a_step_runs() {
        let start = std::time::Instant::now();
        let session = |heard, running: bool| Session {
            initiator: PeerId::random(),
            epoch: 1,
            // A running step has taken its segment's cache.
            states: if running { HashMap::from([(0, None)]) } else { HashMap::new() },
            next: HashMap::new(),
            inbox: HashMap::new(),
            top_logits: 0,
            heard,
        };
        let later = start + std::time::Duration::from_secs(60);
        let mut sessions = HashMap::from([(1, session(start, false)), (2, session(later, false)), (3, session(start, true))]);
        let mut imports = HashMap::from([
            (4, Import { initiator: PeerId::random(), caches: HashMap::new(), heard: start }),
            (5, Import { initiator: PeerId::random(), caches: HashMap::new(), heard: later }),
        ]);
        assert_eq!(sweep(&mut sessions, &mut imports, start + SESSION_IDLE - std::time::Duration::from_secs(1)), 0);
        assert_eq!(sweep(&mut sessions, &mut imports, start + SESSION_IDLE), 2);
        let mut left: Vec<u64> = sessions.keys().chain(imports.keys()).copied().collect();
        left.sort();
        assert_eq!(left, [2, 3, 5]);
    }
}
