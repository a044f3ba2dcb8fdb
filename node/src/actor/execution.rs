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
//!
//! This file holds the actor, its messages and its state; its parts: `plan`
//! (the plans it holds, adopting a new one), `step` (a session's steps),
//! `load` (loading a plan's units and spares), `moves` (a live move's
//! caches), `tensor` (the wire form).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use llnode_mesh::wire::{Tensor as WireTensor, TensorAck};
use llnode_mesh::{MeshClient, PeerId, event::InboundId};
use llnode_models::raw::RawTensor;
use llnode_models::runner::{Activations, ChainState, RunError, SegmentRunner};
use llnode_models::transmission::TransmissionMap;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::oneshot;

use crate::actor::Waiter;
use crate::protocol::{CacheMove, PlanDoc, Readiness, StepFail};
use crate::store::Store;

mod load;
mod moves;
mod plan;
mod step;
mod tensor;

use load::{hold_spares, readiness};
use plan::{Current, Plans, Ready};
use step::sweep;
pub use tensor::wire_tensor;
use tensor::{delivery, logits_tensor, read_logits};

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

/// A refusal for want of room: what is full; a retry may find room.
fn busy(what: &str) -> String {
    format!("busy: {what}; retry in a moment")
}

/// Why a session is refused when this device holds `max` (`--max-sessions`).
fn busy_sessions(max: usize) -> String {
    busy(&format!("this device holds {max} session(s) at once"))
}

/// Whether units `inner` lie inside `outer`.
fn inside(inner: &Range<usize>, outer: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}

/// Where an initiator's step gets its logits, or why they will not come.
type LogitsReply = oneshot::Sender<Result<StepLogits, StepFail>>;

/// A step's logits, as the initiator's sampler reads them, and the stages'
/// compute that made them, in µs (on the path through the stages: each
/// stage adds its own to its inputs' most).
pub struct StepLogits {
    pub logits: Vec<f32>,
    pub compute_us: u64,
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
    /// How many logits the initiator reads ([`llnode_mesh::wire::TensorHeader::top_logits`]).
    pub top_logits: u32,
    /// It reads none of this step's ([`llnode_mesh::wire::TensorHeader::no_logits`]).
    pub no_logits: bool,
    /// The stages' compute behind it, in µs ([`llnode_mesh::wire::TensorHeader::compute_us`]).
    pub compute_us: u64,
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

struct Session {
    initiator: PeerId,
    /// The plan epoch its initiator routes by.
    epoch: u64,
    /// Each local segment's cache; `None` while a step runs.
    states: HashMap<usize, Option<ChainState>>,
    /// The step each local segment runs next (steps may arrive out of order).
    next: HashMap<usize, u64>,
    /// Inputs gathered per (segment, step).
    inbox: HashMap<(usize, u64), Inputs>,
    /// How many logits the initiator reads, as its tensors say.
    top_logits: u32,
    /// When a tensor of it last came.
    heard: std::time::Instant,
}

/// A step's inputs for one segment, as they come.
struct Inputs {
    tokens: u32,
    /// The initiator reads none of the step's logits.
    no_logits: bool,
    /// The stages' compute behind them, in µs: the most of any of them.
    compute_us: u64,
    acts: Activations,
}

/// Which step of which session a segment ran.
#[derive(Clone, Copy)]
pub struct Step {
    session: u64,
    segment: usize,
    step: u64,
    tokens: u32,
    /// Its logits are left out.
    no_logits: bool,
    /// The stages' compute behind its inputs, in µs.
    compute_us: u64,
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

    async fn pre_start(
        &self,
        myself: ActorRef<ExecutionMsg>,
        args: ExecutionArgs,
    ) -> Result<ExecutionState, ActorProcessingErr> {
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

    async fn handle(
        &self,
        myself: ActorRef<ExecutionMsg>,
        msg: ExecutionMsg,
        state: &mut ExecutionState,
    ) -> Result<(), ActorProcessingErr> {
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
                        tracing::info!(
                            "epoch {epoch}: loaded {} segment(s), {} unit(s) new to this device",
                            ready.runners.len(),
                            ready.fresh
                        );
                        // A newer epoch of the same assignment may have come while loading.
                        ready.refresh_spares(&current.doc, &state.args);
                        hold_spares(&state.args, ready, &current.doc.model, load, &myself);
                    }
                    Err(e) => {
                        tracing::error!(
                            "epoch {epoch}: cannot run this device's share of the plan: {e}; trying again in {} s",
                            RETRY.as_secs()
                        );
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
                                let ack = why.ack();
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
                        let _ = reply
                            .send(Err(StepFail::Moved(format!("the mesh moved to plan epoch {}", current.doc.epoch))));
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
                state.sessions_ended();
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
                state.sessions_ended();
            }
            ExecutionMsg::Sweep => {
                let dropped = sweep(&mut state.sessions, &mut state.imports, std::time::Instant::now());
                if dropped > 0 {
                    tracing::info!("dropped {dropped} session(s) nothing came for in {} s", SESSION_IDLE.as_secs());
                    state.sessions_ended();
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
                if let Some(Ok(ready)) =
                    state.plans.current.as_mut().filter(|c| c.load == load).and_then(|c| c.ready.as_mut())
                {
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
