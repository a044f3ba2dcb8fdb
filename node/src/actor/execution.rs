//! ExecutionActor: child of `llnode start`. Runs this device's segments of
//! the held plan. It loads their runners from the local package when a plan
//! arrives, keeps one KV cache per session per segment, gathers each step's
//! inputs (from the initiator and from earlier segments, as the transmission
//! map says), runs the step on the blocking pool and sends each output
//! straight to the segments that read it and the logits to the initiator.
//! On the initiator it also hands out routes and delivers logits.

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use llnode_mesh::wire::{DType, Tensor as WireTensor, TensorAck, TensorHeader};
use llnode_mesh::{MeshClient, PeerId, event::InboundId};
use llnode_models::model::Model;
use llnode_models::pipeline::last_logits;
use llnode_models::raw::{self, RawTensor, RawType};
use llnode_models::runner::{Activations, RunError, SegmentRunner, SegmentState};
use llnode_models::transmission::{Endpoint, TransmissionMap};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::oneshot;

use crate::protocol::PlanDoc;

/// Sessions whose KV caches one device keeps at once; tensors of new ones are refused beyond it.
const MAX_SESSIONS: usize = 64;

pub struct ExecutionActor;

pub struct ExecutionArgs {
    pub me: PeerId,
    pub client: MeshClient,
    /// The local package segments load from.
    pub package: Option<PathBuf>,
}

/// Where an initiator sends a step's inputs.
#[derive(Clone)]
pub struct Route {
    pub epoch: u64,
    pub devices: Vec<PeerId>,
    pub map: TransmissionMap,
}

/// One step's tensors for one segment, as they arrive.
pub struct Delivery {
    pub session: u64,
    pub initiator: PeerId,
    pub step: u64,
    pub tokens: u32,
    pub name: String,
    pub value: llnode_models::raw::RawTensor,
}

pub enum ExecutionMsg {
    Plan(PlanDoc),
    Loaded { epoch: u64, result: Result<(Arc<Model>, HashMap<usize, Arc<SegmentRunner>>), String> },
    /// A tensor from the mesh: acknowledge it, then deliver it.
    Inbound { peer: PeerId, id: InboundId, tensor: WireTensor },
    /// A tensor for a segment on this device (from the local initiator or a local segment).
    Deliver(Delivery),
    StepDone { session: u64, segment: usize, step: u64, tokens: u32, state: SegmentState, result: Result<Activations, RunError> },
    /// The initiator's view of the current plan.
    Route(RpcReplyPort<Result<Route, String>>),
    /// The initiator waits for a step's logits.
    AwaitLogits { session: u64, step: u64, reply: oneshot::Sender<Result<Vec<f32>, String>> },
    EndSession { session: u64 },
    PeerGone(PeerId),
}

struct Current {
    doc: PlanDoc,
    devices: Vec<PeerId>,
    map: TransmissionMap,
    model: Option<Arc<Model>>,
    runners: HashMap<usize, Arc<SegmentRunner>>,
}

struct Session {
    initiator: PeerId,
    /// Each local segment's cache; `None` while a step runs.
    states: HashMap<usize, Option<SegmentState>>,
    /// Inputs gathered per (segment, step).
    inbox: HashMap<(usize, u64), (u32, Activations)>,
}

pub struct ExecutionState {
    args: ExecutionArgs,
    current: Option<Current>,
    sessions: HashMap<u64, Session>,
    waiting: HashMap<(u64, u64), oneshot::Sender<Result<Vec<f32>, String>>>,
}

impl Actor for ExecutionActor {
    type Msg = ExecutionMsg;
    type State = ExecutionState;
    type Arguments = ExecutionArgs;

    async fn pre_start(&self, _: ActorRef<ExecutionMsg>, args: ExecutionArgs) -> Result<ExecutionState, ActorProcessingErr> {
        Ok(ExecutionState { args, current: None, sessions: HashMap::new(), waiting: HashMap::new() })
    }

    async fn handle(&self, myself: ActorRef<ExecutionMsg>, msg: ExecutionMsg, state: &mut ExecutionState) -> Result<(), ActorProcessingErr> {
        match msg {
            ExecutionMsg::Plan(doc) => state.adopt(doc, &myself),
            ExecutionMsg::Loaded { epoch, result } => {
                let Some(current) = state.current.as_mut().filter(|c| c.doc.epoch == epoch) else { return Ok(()) };
                match result {
                    Ok((model, runners)) => {
                        tracing::info!("epoch {epoch}: loaded {} segment(s)", runners.len());
                        current.model = Some(model);
                        current.runners = runners;
                        let pending: Vec<(u64, usize, u64)> = state
                            .sessions
                            .iter()
                            .flat_map(|(id, s)| s.inbox.keys().map(move |(seg, step)| (*id, *seg, *step)))
                            .collect();
                        for (session, segment, step) in pending {
                            state.try_run(session, segment, step, &myself);
                        }
                    }
                    Err(e) => tracing::error!("epoch {epoch}: cannot load this device's segments: {e}"),
                }
            }
            ExecutionMsg::Inbound { peer, id, tensor } => {
                let ack = match delivery(peer, tensor) {
                    Ok(d) if !state.sessions.contains_key(&d.session) && state.sessions.len() >= MAX_SESSIONS => {
                        TensorAck::Refused { reason: format!("busy: this device holds {MAX_SESSIONS} sessions; retry in a moment") }
                    }
                    Ok(d) if d.name == "logits" => {
                        state.logits(d);
                        TensorAck::Received
                    }
                    Ok(d) => {
                        state.deliver(d, &myself);
                        TensorAck::Received
                    }
                    Err(reason) => TensorAck::Refused { reason },
                };
                state.args.client.ack_tensor(id, ack);
            }
            ExecutionMsg::Deliver(d) => state.deliver(d, &myself),
            ExecutionMsg::StepDone { session, segment, step, tokens, state: cache, result } => {
                let Some(s) = state.sessions.get_mut(&session) else { return Ok(()) };
                s.states.insert(segment, Some(cache));
                let initiator = s.initiator;
                match result {
                    Ok(outputs) => state.forward(session, initiator, segment, step, tokens, outputs, &myself),
                    Err(e) => {
                        tracing::error!(session, "segment {segment} failed at step {step}: {e}");
                        state.fail(session, initiator, step, format!("segment {segment} failed: {e}"));
                    }
                }
                // The next step's inputs may already be here.
                state.try_run(session, segment, step + 1, &myself);
            }
            ExecutionMsg::Route(reply) => {
                let route = match &state.current {
                    Some(c) => Ok(Route { epoch: c.doc.epoch, devices: c.devices.clone(), map: c.map.clone() }),
                    None => Err("no plan yet; `llnode plan` says what the mesh is waiting for".to_string()),
                };
                let _ = reply.send(route);
            }
            ExecutionMsg::AwaitLogits { session, step, reply } => {
                state.waiting.insert((session, step), reply);
            }
            ExecutionMsg::EndSession { session } => {
                state.sessions.remove(&session);
                state.waiting.retain(|(s, _), _| *s != session);
            }
            ExecutionMsg::PeerGone(peer) => {
                // Sessions started by a device that left end with it.
                state.sessions.retain(|_, s| s.initiator != peer);
            }
        }
        Ok(())
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
    Ok(Delivery { session: h.session, initiator, step: h.step, tokens: h.tokens, name, value: RawTensor { dtype, shape, data: tensor.data } })
}

/// Puts a tensor on the wire.
pub fn wire_tensor(session: u64, step: u64, tokens: u32, initiator: &PeerId, name: &str, value: &RawTensor) -> WireTensor {
    let dtype = match value.dtype {
        RawType::F32 => DType::F32,
        RawType::F16 => DType::F16,
        RawType::I64 => DType::I64,
        RawType::I32 => DType::I32,
        RawType::Bool => DType::Bool,
    };
    WireTensor {
        header: TensorHeader {
            session,
            step,
            tokens,
            name: format!("{initiator}/{name}"),
            dtype,
            shape: value.shape.iter().map(|&d| d as u64).collect(),
        },
        data: value.data.clone(),
    }
}

impl ExecutionState {
    fn adopt(&mut self, doc: PlanDoc, myself: &ActorRef<ExecutionMsg>) {
        if let Some(current) = &mut self.current {
            if current.doc.epoch >= doc.epoch {
                return;
            }
            if current.doc.model == doc.model && crate::actor::planning::same_assignment(&current.doc.plan, &doc.plan) {
                // Same segments on the same devices: runners and sessions carry on.
                current.doc = doc;
                return;
            }
        }
        let devices: Vec<PeerId> = doc.plan.stages.iter().filter_map(|s| s.device.parse().ok()).collect();
        let segments: Vec<Range<usize>> = doc.plan.stages.iter().map(|s| s.units.clone()).collect();
        let Some(package) = self.args.package.clone() else {
            tracing::warn!("a plan arrived but this node has no --model to run its segments from");
            return;
        };
        let me = self.args.me;
        let mine: Vec<usize> = devices.iter().enumerate().filter(|(_, d)| **d == me).map(|(i, _)| i).collect();
        let epoch = doc.epoch;
        // Sessions of an older plan cannot continue on this one (moving them is the balancer's work).
        for id in self.sessions.drain().map(|(id, _)| id) {
            tracing::info!(session = id, "ended by a new plan");
        }
        for (_, reply) in self.waiting.drain() {
            let _ = reply.send(Err(format!("the mesh changed its plan (epoch {}) during the generation; ask again", doc.epoch)));
        }
        let specs = match llnode_models::package::Manifest::read(&package) {
            Ok((manifest, _)) => manifest.units.into_iter().map(|u| u.spec).collect::<Vec<_>>(),
            Err(e) => {
                tracing::error!("cannot read the package: {e}");
                return;
            }
        };
        let map = match TransmissionMap::new(&specs, &segments) {
            Ok(map) => map,
            Err(e) => {
                tracing::error!("the plan does not fit the package: {e}");
                return;
            }
        };
        self.current = Some(Current { doc, devices, map: map.clone(), model: None, runners: HashMap::new() });
        let myself = myself.clone();
        tokio::task::spawn_blocking(move || {
            let result = (|| -> Result<_, String> {
                let model = Arc::new(Model::open(&package).map_err(|e| e.to_string())?);
                let mut runners = HashMap::new();
                for s in mine {
                    let runner = SegmentRunner::load(&model, segments[s].clone(), &map.output_names(s)).map_err(|e| e.to_string())?;
                    runners.insert(s, Arc::new(runner));
                }
                Ok((model, runners))
            })();
            let _ = myself.cast(ExecutionMsg::Loaded { epoch, result });
        });
    }

    fn session(&mut self, session: u64, initiator: PeerId) -> &mut Session {
        self.sessions.entry(session).or_insert_with(|| Session { initiator, states: HashMap::new(), inbox: HashMap::new() })
    }

    /// A tensor for segments on this device: file it with every local segment that reads it.
    fn deliver(&mut self, d: Delivery, myself: &ActorRef<ExecutionMsg>) {
        let Some(current) = &self.current else { return };
        let me = self.args.me;
        let readers: Vec<usize> = current
            .map
            .transfers
            .iter()
            .filter(|t| t.tensor == d.name)
            .filter_map(|t| match t.to {
                Endpoint::Segment(s) if current.devices.get(s) == Some(&me) => Some(s),
                _ => None,
            })
            .collect();
        let value = match raw::from_raw(&d.value) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("bad tensor {}: {e}", d.name);
                return;
            }
        };
        let session = self.session(d.session, d.initiator);
        for s in &readers {
            let entry = session.inbox.entry((*s, d.step)).or_insert_with(|| (d.tokens, Activations::new()));
            entry.1.insert(d.name.clone(), value.clone());
        }
        for s in readers {
            self.try_run(d.session, s, d.step, myself);
        }
    }

    /// Runs segment `s` for `step` once all its inputs are in and its cache is free.
    fn try_run(&mut self, session: u64, s: usize, step: u64, myself: &ActorRef<ExecutionMsg>) {
        let Some(current) = &self.current else { return };
        let Some(runner) = current.runners.get(&s).cloned() else { return };
        let needed: Vec<String> = current.map.inputs_of(s).map(|t| t.tensor.clone()).collect();
        let Some(sess) = self.sessions.get_mut(&session) else { return };
        let ready = sess.inbox.get(&(s, step)).is_some_and(|(_, acts)| needed.iter().all(|n| acts.contains_key(n)));
        let free = !matches!(sess.states.get(&s), Some(None));
        if !ready || !free {
            return;
        }
        let (tokens, acts) = sess.inbox.remove(&(s, step)).expect("ready");
        let mut cache = sess.states.insert(s, None).flatten().unwrap_or_else(|| runner.new_state());
        let myself = myself.clone();
        tokio::task::spawn_blocking(move || {
            let result = runner.run(&mut cache, tokens as usize, &acts);
            let _ = myself.cast(ExecutionMsg::StepDone { session, segment: s, step, tokens, state: cache, result });
        });
    }

    /// Sends segment `s`'s outputs where the transmission map says.
    #[allow(clippy::too_many_arguments)]
    fn forward(&mut self, session: u64, initiator: PeerId, s: usize, step: u64, tokens: u32, outputs: Activations, myself: &ActorRef<ExecutionMsg>) {
        let Some(current) = &self.current else { return };
        let (transfers, devices): (Vec<_>, _) = (current.map.outputs_of(s).cloned().collect(), current.devices.clone());
        let me = self.args.me;
        let mut local = Vec::new();
        for t in &transfers {
            let Some(value) = outputs.get(&t.tensor) else { continue };
            let (to, raw) = match t.to {
                Endpoint::Initiator => {
                    let logits = match last_logits(value) {
                        Ok(l) => l,
                        Err(e) => {
                            self.fail(session, initiator, step, e.to_string());
                            return;
                        }
                    };
                    let data = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
                    (initiator, RawTensor { dtype: RawType::F32, shape: vec![1, 1, logits.len()], data })
                }
                Endpoint::Segment(d) => match raw::to_raw(value) {
                    Ok(raw) => (devices[d], raw),
                    Err(e) => {
                        self.fail(session, initiator, step, e.to_string());
                        return;
                    }
                },
            };
            let d = Delivery { session, initiator, step, tokens, name: t.tensor.clone(), value: raw };
            if to == me {
                local.push(d);
            } else {
                let tensor = wire_tensor(session, step, tokens, &initiator, &d.name, &d.value);
                let client = self.args.client.clone();
                tokio::spawn(async move {
                    if let Err(e) = client.send_tensor(to, tensor).await {
                        tracing::warn!(session, "cannot send a tensor to {to}: {e}");
                    }
                });
            }
        }
        for d in local {
            if d.name == "logits" {
                self.logits(d);
            } else {
                self.deliver(d, myself);
            }
        }
    }

    fn logits(&mut self, d: Delivery) {
        let Some(reply) = self.waiting.remove(&(d.session, d.step)) else { return };
        let values: Vec<f32> = d.value.data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
        let _ = reply.send(Ok(values));
    }

    fn fail(&mut self, session: u64, initiator: PeerId, step: u64, reason: String) {
        if initiator == self.args.me {
            if let Some(reply) = self.waiting.remove(&(session, step)) {
                let _ = reply.send(Err(reason));
            }
        }
    }
}
