//! `llnode prompt`: the initiator's side of an inference across the mesh.
//! The node that is asked runs the generation loop (tokenizer, sampling,
//! stop rules) with a [`Forward`] whose steps go through the plan's
//! segments: it sends each step's token ids, mask and positions to the
//! segments that read them and waits for the last segment's logits.
//!
//! Rebalancing: while a new plan loads, the old one keeps serving; once the
//! new plan is loaded on every device it names, the initiator moves the
//! generation at a token boundary by having the old devices hand each
//! layer's KV cache to its new device ([`CacheMove`]): nothing is replayed.
//!
//! Failover (and a handover that fails): when the plan changes under a step
//! (a device left), the initiator waits for the next plan, opens a new
//! session on it and replays every step so far, exactly as it ran them (same
//! token groups, so the rebuilt KV caches are the ones the generation had),
//! pipelined through the stages without waiting for their logits; then it
//! runs the interrupted step. The text is unchanged; the stream only pauses.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use llnode_mesh::{MeshClient, PeerId};
use llnode_models::generate::{GenerateOptions, generate};
use llnode_models::pipeline::{Forward, step_inputs};
use llnode_models::raw;
use llnode_models::runner::RunError;
use llnode_models::sampling::SamplingConfig;
use llnode_models::tokenizer::TextTokenizer;
use llnode_models::transmission::Endpoint;
use ractor::{ActorRef, RpcReplyPort, call_t};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::actor::execution::{Delivery, ExecutionMsg, Route, StepFail, wire_tensor};
use crate::actor::planning::PlanningMsg;
use crate::protocol::{CacheMove, NodeMessage};

/// How long one step may take across the mesh before the initiator looks for a new plan.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a prompt waits for this node to load the plan (fetching its units first).
const ROUTE_WAIT_MS: u64 = 600_000;
/// How many times one generation moves to a new plan before it gives up.
const MAX_MOVES: usize = 8;
/// Replayed steps in flight at once when a generation moves to a new plan.
const REPLAY_WINDOW: u64 = 64;
/// How long an interrupted generation waits for the next plan to be loaded here.
const MOVE_WAIT_MS: u64 = 300_000;
/// How long the devices of a live move have to hand the caches over.
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(30);

/// What `llnode prompt` asks for (the sampling options of `llnode run`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PromptRequest {
    pub prompt: String,
    pub max_tokens: usize,
    pub sampling: SamplingConfig,
    pub stop: Vec<String>,
    pub chat: bool,
    pub ignore_eos: bool,
    /// The package id (or a prefix of it) the asker wants; `None` takes the plan's.
    pub model: Option<String>,
    /// Privacy mode: the token ids and logits never leave the asking device
    /// (it runs the first and last units itself).
    #[serde(default)]
    pub private: bool,
}

/// Streamed back to the CLI.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum PromptEvent {
    Text(String),
    /// The devices of the plan are still getting or loading their units:
    /// what each one is doing.
    Waiting(String),
    /// The plan changed under the generation (`why`): it waits for the next one.
    Moving {
        why: String,
    },
    /// The generation moved to a new plan (`why`) and went on after
    /// replaying `replayed` steps, `pause_s` after the interruption.
    Resumed {
        why: String,
        epoch: u64,
        replayed: usize,
        pause_s: f64,
    },
    /// The generation moved to plan `epoch` at a token boundary, after
    /// `tokens` generated tokens, its devices handing over the KV caches of
    /// `past` tokens (prompt included) in `pause_s`.
    HandedOver {
        epoch: u64,
        tokens: usize,
        past: usize,
        pause_s: f64,
    },
    /// `first_token_s`: the prefill step, prompt in to first token out.
    /// `token_ms`: when each token's logits came, in ms from the prefill's start.
    Done {
        prompt_tokens: usize,
        tokens: usize,
        first_token_s: f64,
        decode_tokens_per_s: f64,
        epoch: u64,
        token_ms: Vec<f64>,
    },
}

pub struct Initiator {
    pub me: PeerId,
    /// One permit per prompt in flight, `max_prompts` of them (`llnode start --max-prompts`).
    pub slots: std::sync::Arc<tokio::sync::Semaphore>,
    pub max_prompts: usize,
    pub client: MeshClient,
    pub execution: ActorRef<ExecutionMsg>,
    /// Where the tokenizer and configs come from (fetched when this node lacks them).
    pub store: Arc<crate::store::Store>,
    pub traffic: Arc<crate::traffic::Traffic>,
    /// Told about moves, for `llnode plan`'s history.
    pub planning: ActorRef<PlanningMsg>,
    /// The execution actor's readiness for the plan it holds: a generation
    /// asks it for a newer route only once this says one is loaded.
    pub loaded: tokio::sync::watch::Receiver<Option<(u64, crate::protocol::Readiness)>>,
    pub tokenizers: Arc<Tokenizers>,
}

/// Tokenizers this node has parsed, by model id: parsing a `tokenizer.json`
/// takes 30-40 ms (1 MB, the built-in model's), every prompt's wait before
/// its first token. A model id names the package's content, so an entry
/// never goes stale.
#[derive(Default)]
pub struct Tokenizers(std::sync::Mutex<HashMap<String, Arc<TextTokenizer>>>);

impl Tokenizers {
    /// Models whose tokenizers are kept; one more clears them.
    const KEPT: usize = 2;

    fn of(&self, id: &str, model: &llnode_models::model::Model) -> Result<Arc<TextTokenizer>, String> {
        if let Some(tokenizer) = self.0.lock().expect("tokenizers lock").get(id) {
            return Ok(tokenizer.clone());
        }
        let tokenizer = Arc::new(TextTokenizer::load(&model.dir, model.info.vocab_size).map_err(|e| e.to_string())?);
        let mut kept = self.0.lock().expect("tokenizers lock");
        if kept.len() >= Self::KEPT {
            kept.clear();
        }
        kept.insert(id.to_string(), tokenizer.clone());
        Ok(tokenizer)
    }
}

/// Runs one prompt across the mesh, sending events to `events`; returns an error line on failure.
pub async fn run(
    initiator: &Initiator,
    request: PromptRequest,
    events: mpsc::UnboundedSender<PromptEvent>,
) -> Result<(), String> {
    request.sampling.validate()?;
    let _slot = initiator.slots.clone().try_acquire_owned().map_err(|_| {
        format!(
            "busy: this node already runs {} prompt(s) at once; retry in a moment or ask another member",
            initiator.max_prompts
        )
    })?;
    let route = call_t!(initiator.execution, |reply| ExecutionMsg::Route { after: 0, reply }, ROUTE_WAIT_MS)
        .map_err(|e| e.to_string())??;
    // With a plan held, this node has heard which models the members serve.
    let model = request.model.as_deref().map(|wanted| resolve_model(&initiator.store, wanted)).transpose()?;
    let private = request.private;
    let startup = Startup {
        me: initiator.me,
        planning: &initiator.planning,
        execution: &initiator.execution,
        events: &events,
        private,
        model,
    };
    let route = startup.ready(route).await?;
    let store = &initiator.store;
    let side = store.ensure_manifest(&initiator.client, &route.model).await?.side_files();
    let package = store.ensure(&initiator.client, &route.model, &side).await?;
    let handle = tokio::runtime::Handle::current();
    let (me, client, execution, traffic) =
        (initiator.me, initiator.client.clone(), initiator.execution.clone(), initiator.traffic.clone());
    let (planning, loaded, tokenizers) =
        (initiator.planning.clone(), initiator.loaded.clone(), initiator.tokenizers.clone());
    let (ended_tx, ended) = oneshot::channel();
    let result = tokio::task::spawn_blocking(move || {
        let model = llnode_models::package::load_units(&package, &[]).map_err(|e| e.to_string())?;
        let tokenizer = tokenizers.of(&route.model, &model)?;
        let ids = if request.chat { tokenizer.encode_chat(&request.prompt) } else { tokenizer.encode(&request.prompt) }
            .map_err(|e| e.to_string())?;
        let options = GenerateOptions {
            max_tokens: request.max_tokens,
            sampling: request.sampling.clone(),
            stop: request.stop.clone(),
            eos: if request.ignore_eos { vec![] } else { model.info.eos_token_ids.clone() },
            context: model.info.max_positions,
        };
        let with_positions = model.inputs.iter().any(|i| i.name == "position_ids");
        let mut forward = MeshForward {
            handle,
            me,
            client,
            execution,
            loaded,
            traffic,
            planning,
            events: events.clone(),
            session: rand::random(),
            sessions: Vec::new(),
            route,
            private,
            step: 0,
            past: 0,
            history: Vec::new(),
            with_positions,
            top_logits: options.sampling.logits_needed().and_then(|k| u32::try_from(k).ok()).unwrap_or(0),
            started: std::time::Instant::now(),
            token_ms: Vec::new(),
        };
        forward.sessions.push((forward.session, forward.route.devices.clone()));
        let generation = generate(&mut forward, &tokenizer, &ids, &options, &mut |text| {
            let _ = events.send(PromptEvent::Text(text.to_string()));
        });
        let _ = ended_tx.send(std::mem::take(&mut forward.sessions));
        let generation = generation.map_err(|e| e.to_string())?;
        let _ = events.send(PromptEvent::Done {
            prompt_tokens: generation.prompt_tokens,
            tokens: generation.tokens.len(),
            first_token_s: generation.prefill.as_secs_f64(),
            decode_tokens_per_s: generation.decode_tokens_per_s(),
            epoch: forward.route.epoch,
            token_ms: std::mem::take(&mut forward.token_ms),
        });
        Ok::<(), String>(())
    })
    .await
    .map_err(|e| format!("the generation task failed: {e}"))?;
    // Free the sessions' caches everywhere, whatever happened.
    for (session, devices) in ended.await.unwrap_or_default() {
        let end = NodeMessage::EndSession { session }.encode();
        for device in devices.iter().filter(|d| **d != initiator.me) {
            let _ = initiator.client.request(*device, llnode_mesh::wire::ControlRequest::Node(end.clone())).await;
        }
        let _ = initiator.execution.cast(ExecutionMsg::EndSession { session });
    }
    result
}

/// Whether `route` keeps the token ids and logits on `me`: it runs the
/// first segment (which reads them) and the last (which makes the logits).
fn keeps_tokens_on(route: &Route, me: PeerId) -> bool {
    route.devices.first() == Some(&me) && route.devices.last() == Some(&me)
}

/// The one package id among those the mesh knows that starts with `wanted`.
fn resolve_model(store: &crate::store::Store, wanted: &str) -> Result<String, String> {
    let known = store.known_models();
    let matching: Vec<&String> = known.iter().filter(|id| !wanted.is_empty() && id.starts_with(wanted)).collect();
    match matching[..] {
        [id] => Ok(id.clone()),
        [] => Err(format!(
            "no member has model {wanted} (the mesh knows {}); start a node with --model <package> of it, or leave out --model",
            if known.is_empty() {
                "none yet".to_string()
            } else {
                known.iter().map(|id| crate::store::short(id)).collect::<Vec<_>>().join(", ")
            }
        )),
        _ => Err(format!("{wanted} starts several models' ids; give more of it")),
    }
}

/// How a generation gets the route it starts, or goes on, on: from this
/// node's actors, telling the asker what it waits for.
struct Startup<'a> {
    me: PeerId,
    planning: &'a ActorRef<PlanningMsg>,
    execution: &'a ActorRef<ExecutionMsg>,
    events: &'a mpsc::UnboundedSender<PromptEvent>,
    private: bool,
    /// The package the prompt asked for (a full id), if it named one.
    model: Option<String>,
}

impl Startup<'_> {
    /// The route to run on, from `route`: of the model asked for, in privacy
    /// mode one that keeps the tokens here, and only once every stage of it
    /// is ready.
    async fn ready(&self, route: Route) -> Result<Route, String> {
        let route = match &self.model {
            Some(model) => self.model_route(route, model).await?,
            None => route,
        };
        let route = if self.private { self.private_route(route).await? } else { route };
        let route = self.await_stages(route).await?;
        match &self.model {
            Some(model) if route.model != *model => Err(format!(
                "the mesh moved on to model {} meanwhile (another member asked for it); ask again",
                crate::store::short(&route.model)
            )),
            _ => Ok(route),
        }
    }

    /// A route of `model`: asks the leader to plan for it if the mesh runs
    /// another, and waits until this node has loaded such a plan.
    async fn model_route(&self, route: Route, model: &str) -> Result<Route, String> {
        let short = crate::store::short(model);
        let waiting = format!("the mesh to plan model {short} (it runs {})", crate::store::short(&route.model));
        let ask = |reply| PlanningMsg::UseModel { model: model.to_string(), reply };
        self.ask_leader_for(route, |r| r.model == model, waiting, ask).await.map_err(|e| format!("model {short}: {e}"))
    }

    /// A route for privacy mode: asks the leader for plans that keep the
    /// first and last units here, and waits until this node has loaded one.
    async fn private_route(&self, route: Route) -> Result<Route, String> {
        let waiting = "a plan that keeps this prompt's tokens on this device (privacy mode)".to_string();
        self.ask_leader_for(route, |r| keeps_tokens_on(r, self.me), waiting, PlanningMsg::Private).await.map_err(|e| {
            format!(
                "privacy mode: {e}; ask without --private, or from a device with memory for the first and last units"
            )
        })
    }

    /// `route` if it is `wanted`; else asks the leader (through `ask`, answered
    /// once the plan is out), saying `waiting` meanwhile, and waits until this
    /// node has loaded a plan that is.
    async fn ask_leader_for(
        &self,
        mut route: Route,
        wanted: impl Fn(&Route) -> bool,
        waiting: String,
        ask: impl FnOnce(RpcReplyPort<Result<(), String>>) -> PlanningMsg,
    ) -> Result<Route, String> {
        if wanted(&route) {
            return Ok(route);
        }
        let _ = self.events.send(PromptEvent::Waiting(waiting));
        call_t!(self.planning, ask, ROUTE_WAIT_MS).map_err(|e| e.to_string())??;
        let started = std::time::Instant::now();
        while !wanted(&route) {
            let after = route.epoch;
            let left = ROUTE_WAIT_MS.saturating_sub(started.elapsed().as_millis() as u64).max(1);
            route = call_t!(self.execution, |reply| ExecutionMsg::Route { after, reply }, left)
                .map_err(|_| "no such plan came; `llnode plan` says why".to_string())??;
        }
        Ok(route)
    }

    /// Where every other device of `route` stands with the route's plan.
    async fn stages(&self, route: &Route) -> Result<Stages, String> {
        use crate::protocol::Readiness;
        let devices: Vec<PeerId> = route
            .devices
            .iter()
            .copied()
            .filter(|d| *d != self.me)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let states =
            call_t!(self.planning, |reply| PlanningMsg::ReadinessOf { devices, reply }, crate::actor::CALL_TIMEOUT_MS)
                .map_err(|e| e.to_string())?;
        let newer = states.iter().any(|d| d.said.as_ref().is_some_and(|(epoch, _)| *epoch > route.epoch));
        let gone = states.iter().any(|d| !d.live);
        let waiting = states
            .into_iter()
            .filter(|d| d.live)
            .filter_map(|d| match d.said {
                Some((epoch, Readiness::Ready)) if epoch == route.epoch => None,
                Some((epoch, Readiness::Loading(line))) if epoch == route.epoch => Some(format!("{}: {line}", d.name)),
                Some((epoch, Readiness::Failed(e))) if epoch == route.epoch => {
                    Some(format!("{} cannot load its units yet: {e}", d.name))
                }
                _ => Some(format!("{}: has not taken up plan epoch {} yet", d.name, route.epoch)),
            })
            .collect();
        Ok(Stages { newer, gone, waiting })
    }

    /// Waits until every other device of `route` has its units loaded for
    /// the route's plan, telling the asker what they are doing meanwhile, and
    /// returns the route to start on: when a device is on a newer plan, this
    /// node's route for it once loaded here. A device that is gone lets the
    /// first step find out (and move to the next plan).
    async fn await_stages(&self, mut route: Route) -> Result<Route, String> {
        let started = std::time::Instant::now();
        let mut shown = String::new();
        loop {
            let stages = self.stages(&route).await?;
            if stages.newer {
                let after = route.epoch;
                route = call_t!(self.execution, |reply| ExecutionMsg::Route { after, reply }, ROUTE_WAIT_MS)
                    .map_err(|e| e.to_string())??;
                continue;
            }
            if stages.waiting.is_empty() {
                return Ok(route);
            }
            let line = stages.waiting.join("; ");
            if started.elapsed() > Duration::from_millis(ROUTE_WAIT_MS) {
                return Err(format!(
                    "the plan's devices are not ready after {} s ({line}); `llnode plan` on them says more",
                    ROUTE_WAIT_MS / 1000
                ));
            }
            if line != shown {
                let _ = self.events.send(PromptEvent::Waiting(line.clone()));
                shown = line;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Where the other devices of a route stand with its plan.
struct Stages {
    /// One of them is on a newer plan already.
    newer: bool,
    /// One of them has left the mesh.
    gone: bool,
    /// What each live one still does before it can run the plan.
    waiting: Vec<String>,
}

impl Stages {
    fn all_ready(&self) -> bool {
        !self.newer && !self.gone && self.waiting.is_empty()
    }
}

struct MeshForward {
    handle: tokio::runtime::Handle,
    me: PeerId,
    client: MeshClient,
    execution: ActorRef<ExecutionMsg>,
    /// See [`Initiator::loaded`].
    loaded: tokio::sync::watch::Receiver<Option<(u64, crate::protocol::Readiness)>>,
    traffic: Arc<crate::traffic::Traffic>,
    planning: ActorRef<PlanningMsg>,
    events: mpsc::UnboundedSender<PromptEvent>,
    /// The session on the current route, and every session this generation
    /// opened with the devices that may hold its caches.
    session: u64,
    sessions: Vec<(u64, Vec<PeerId>)>,
    route: Route,
    /// Privacy mode: token ids go to no other device, and every route keeps them here.
    private: bool,
    /// The last step number used in `session`.
    step: u64,
    past: usize,
    /// The token groups of every step that has run, in order: what a move replays.
    history: Vec<Vec<u32>>,
    with_positions: bool,
    /// How many logits the sampler reads ([`SamplingConfig::logits_needed`]); 0: all.
    top_logits: u32,
    started: std::time::Instant,
    /// When each step's logits came, in ms from `started`.
    token_ms: Vec<f64>,
}

impl Forward for MeshForward {
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, RunError> {
        // The asker's connection closed (`llnode prompt` stopped, Ctrl-C):
        // no step more, and the sessions' caches are freed everywhere.
        if self.events.is_closed() {
            tracing::info!(
                session = self.session,
                "the asker went away after {} step(s): the generation stops",
                self.history.len()
            );
            return Err(RunError::Remote("the asker went away".into()));
        }
        // Why and since when this step has been interrupted, once it has.
        let mut moved: Option<(String, std::time::Instant)> = match self.switch_if_ready() {
            Ok(()) => None,
            Err(StepFail::Moved(why)) => Some((why, std::time::Instant::now())),
            Err(StepFail::Failed(e) | StepFail::Busy(e)) => return Err(RunError::Remote(e)),
        };
        for _ in 0..=MAX_MOVES {
            if let Some((why, since)) = &moved {
                match self.move_on(why) {
                    Ok(()) => {}
                    Err(StepFail::Failed(e) | StepFail::Busy(e)) => return Err(RunError::Remote(e)),
                    // The plan moved again during the replay: move again.
                    Err(StepFail::Moved(again)) => {
                        moved = Some((again, *since));
                        continue;
                    }
                }
            }
            match self.step_through(tokens) {
                Ok(logits) => {
                    if let Some((why, since)) = moved {
                        let (epoch, replayed, pause_s) =
                            (self.route.epoch, self.history.len(), since.elapsed().as_secs_f64());
                        let note = format!(
                            "a generation moved to plan epoch {epoch} ({why}): replayed {replayed} step(s), paused {:.0} ms",
                            pause_s * 1e3
                        );
                        let _ = self.planning.cast(PlanningMsg::Note(note));
                        let _ = self.events.send(PromptEvent::Resumed { why, epoch, replayed, pause_s });
                    }
                    self.history.push(tokens.to_vec());
                    self.past += tokens.len();
                    self.token_ms.push(self.started.elapsed().as_secs_f64() * 1e3);
                    return Ok(logits);
                }
                Err(StepFail::Failed(why) | StepFail::Busy(why)) => return Err(RunError::Remote(why)),
                Err(StepFail::Moved(why)) => {
                    tracing::info!(session = self.session, "{why}: moving the generation to the next plan");
                    // Said once, and only once text has started to come.
                    if moved.is_none() && !self.history.is_empty() {
                        let _ = self.events.send(PromptEvent::Moving { why: why.clone() });
                    }
                    let since = moved.map_or_else(std::time::Instant::now, |(_, since)| since);
                    moved = Some((why, since));
                }
            }
        }
        let why = moved.map(|(why, _)| why).unwrap_or_default();
        Err(RunError::Remote(format!(
            "{why}, and the generation moved {MAX_MOVES} times; ask again once `llnode plan` is steady"
        )))
    }

    fn position(&self) -> usize {
        self.past
    }
}

impl MeshForward {
    /// Runs one step on the current route and waits for its logits.
    fn step_through(&mut self, tokens: &[u32]) -> Result<Vec<f32>, StepFail> {
        self.step += 1;
        let logits = self.expect_logits(self.step)?;
        self.send_step(self.step, tokens, self.past)?;
        self.wait(logits)
    }

    /// Asks this node's execution actor for `step`'s logits, before the step is sent.
    fn expect_logits(&self, step: u64) -> Result<oneshot::Receiver<Result<Vec<f32>, StepFail>>, StepFail> {
        let (reply, logits) = oneshot::channel();
        self.execution
            .cast(ExecutionMsg::AwaitLogits { session: self.session, epoch: self.route.epoch, step, reply })
            .map_err(|e| StepFail::Failed(format!("the node is stopping: {e}")))?;
        Ok(logits)
    }

    fn wait(&self, logits: oneshot::Receiver<Result<Vec<f32>, StepFail>>) -> Result<Vec<f32>, StepFail> {
        self.handle
            .block_on(async { tokio::time::timeout(STEP_TIMEOUT, logits).await })
            .map_err(|_| StepFail::Moved(format!("no logits within {} s", STEP_TIMEOUT.as_secs())))?
            .map_err(|_| StepFail::Failed("the node dropped the step".into()))?
    }

    /// Sends a step's inputs (token ids, mask, positions) to the segments
    /// that read them. Remote ones go out together, so a stage waits for one
    /// round trip, not one per input.
    fn send_step(&self, step: u64, tokens: &[u32], past: usize) -> Result<(), StepFail> {
        let failed = |e: String| StepFail::Failed(e);
        let acts = step_inputs(tokens, past, self.with_positions);
        let mut remote: Vec<(usize, PeerId, Vec<llnode_mesh::wire::Tensor>)> = Vec::new();
        for t in self.route.map.transfers.iter().filter(|t| t.from == Endpoint::Initiator) {
            let Endpoint::Segment(s) = t.to else { continue };
            let value = acts
                .get(&t.tensor)
                .ok_or_else(|| failed(format!("the model reads {} from the initiator", t.tensor)))?;
            let value = raw::to_raw(value).map_err(|e| failed(e.to_string()))?;
            let d = Delivery {
                session: self.session,
                epoch: self.route.epoch,
                initiator: self.me,
                step,
                tokens: tokens.len() as u32,
                name: t.tensor.clone(),
                value,
                top_logits: self.top_logits,
            };
            let device = self.route.devices[s];
            if self.private && device != self.me && t.tensor == "input_ids" {
                return Err(failed(format!(
                    "privacy mode: the plan would send the token ids to {device}; nothing was sent"
                )));
            }
            if device == self.me {
                self.execution.cast(ExecutionMsg::Deliver(d)).map_err(|e| failed(e.to_string()))?;
            } else {
                // Each device's inputs go together, in one write; named by the first segment they feed.
                match remote.iter_mut().find(|(_, d, _)| *d == device) {
                    Some((_, _, tensors)) => tensors.push(wire_tensor(d)),
                    None => remote.push((s, device, vec![wire_tensor(d)])),
                }
            }
        }
        let sends = remote.into_iter().map(|(s, device, tensors)| async move {
            let sizes: Vec<usize> = tensors.iter().map(|t| t.data.len()).collect();
            self.client.send_tensors(device, tensors).await.map_err(|e| StepFail::not_taken(s, e))?;
            sizes.into_iter().for_each(|bytes| self.traffic.record(&device, bytes));
            Ok(())
        });
        self.handle.block_on(futures::future::join_all(sends)).into_iter().collect()
    }

    /// Waits for a plan newer than the current route and replays the generation onto it.
    fn move_on(&mut self, why: &str) -> Result<(), StepFail> {
        let execution = self.execution.clone();
        let after = self.route.epoch;
        let route = self
            .handle
            .block_on(async move { call_t!(execution, |reply| ExecutionMsg::Route { after, reply }, MOVE_WAIT_MS) })
            .map_err(|e| StepFail::Failed(format!("{why}, and no new plan came: {e}")))?
            .map_err(|e| StepFail::Failed(format!("{why}; {e}")))?;
        if route.model != self.route.model {
            return Err(StepFail::Failed(format!(
                "{why}, and the mesh now runs model {} (another member asked for it); ask again",
                crate::store::short(&route.model)
            )));
        }
        // In privacy mode the plan may have to be asked for again: a new leader does not know.
        let route =
            self.handle.block_on(self.startup().ready(route)).map_err(|e| StepFail::Failed(format!("{why}; {e}")))?;
        self.replay_onto(route)
    }

    /// Goes on as session `session` on `route`, from step 1; the session is
    /// ended on its devices when the generation ends.
    fn open(&mut self, route: Route, session: u64) {
        self.route = route;
        self.session = session;
        self.sessions.push((session, self.route.devices.clone()));
        self.step = 0;
    }

    fn startup(&self) -> Startup<'_> {
        Startup {
            me: self.me,
            planning: &self.planning,
            execution: &self.execution,
            events: &self.events,
            private: self.private,
            model: None,
        }
    }

    /// Opens a session on `route` and replays every step so far into it.
    /// Steps go out without waiting for their logits, except at the end of
    /// every [`REPLAY_WINDOW`] steps, so stages still loading hold a bounded
    /// number of tensors.
    fn replay_onto(&mut self, route: Route) -> Result<(), StepFail> {
        self.open(route, rand::random());
        let mut past = 0;
        let history = self.history.clone();
        for (i, tokens) in history.iter().enumerate() {
            self.step += 1;
            let checkpoint = self.step.is_multiple_of(REPLAY_WINDOW) && i + 1 < history.len();
            let logits = if checkpoint { Some(self.expect_logits(self.step)?) } else { None };
            self.send_step(self.step, tokens, past)?;
            past += tokens.len();
            if let Some(logits) = logits {
                self.wait(logits)?;
            }
        }
        Ok(())
    }

    /// At a token boundary: when this node has loaded a plan newer than the
    /// route, of the same model (in privacy mode, one keeping the tokens
    /// here), and every other device of it says it is ready, the generation
    /// moves onto it by handing its caches over; if that fails, by replaying.
    /// Otherwise the old plan goes on serving.
    fn switch_if_ready(&mut self) -> Result<(), StepFail> {
        // Asking the execution actor is a round trip of two thread wake-ups:
        // only when this device has loaded a plan of a later epoch (a plan's
        // first epoch is at most its epoch, so this misses none).
        let after = self.route.epoch;
        let newer_loaded =
            matches!(&*self.loaded.borrow(), Some((epoch, crate::protocol::Readiness::Ready)) if *epoch > after);
        if self.history.is_empty() || !newer_loaded {
            return Ok(());
        }
        let execution = self.execution.clone();
        let newer = self.handle.block_on(async move {
            call_t!(execution, |reply| ExecutionMsg::NewerRoute { after, reply }, crate::actor::CALL_TIMEOUT_MS)
        });
        let Ok(Some(route)) = newer else { return Ok(()) };
        if route.model != self.route.model || (self.private && !keeps_tokens_on(&route, self.me)) {
            return Ok(());
        }
        match self.handle.block_on(self.startup().stages(&route)) {
            Ok(stages) if stages.all_ready() => {}
            _ => return Ok(()),
        }
        let since = std::time::Instant::now();
        let to = rand::random();
        match self.handle.block_on(self.hand_over(&route, to)) {
            Ok(()) => {
                let (epoch, tokens, past, pause_s) =
                    (route.epoch, self.history.len(), self.past, since.elapsed().as_secs_f64());
                self.open(route, to);
                let note = format!(
                    "a generation moved to plan epoch {epoch} after {tokens} token(s): the caches of {past} token(s) handed over in {:.0} ms",
                    pause_s * 1e3
                );
                let _ = self.planning.cast(PlanningMsg::Note(note));
                let _ = self.events.send(PromptEvent::HandedOver { epoch, tokens, past, pause_s });
                Ok(())
            }
            Err(why) => {
                tracing::warn!(
                    session = self.session,
                    "cannot hand the caches over to plan epoch {} ({why}); replaying instead",
                    route.epoch
                );
                self.sessions.push((to, route.devices.clone()));
                self.replay_onto(route)
            }
        }
    }

    /// Moves the session's caches from the route's devices to `route`'s, as
    /// session `to`: the old devices hand each cache to its layer's new
    /// device, then each new device starts the session from them.
    async fn hand_over(&self, route: &Route, to: u64) -> Result<(), String> {
        let stages: Vec<(String, std::ops::Range<usize>)> = route
            .devices
            .iter()
            .zip(&route.map.segments)
            .map(|(device, units)| (device.to_base58(), units.clone()))
            .collect();
        let past = self.past as u64;
        let hand_over = CacheMove::HandOver { from: self.session, to, epoch: route.epoch, past, stages };
        let moving = async {
            self.order_all(&self.route.devices, &hand_over).await?;
            self.order_all(&route.devices, &CacheMove::Seal { session: to, epoch: route.epoch, past }).await
        };
        tokio::time::timeout(HAND_OVER_TIMEOUT, moving)
            .await
            .map_err(|_| format!("no answer within {} s", HAND_OVER_TIMEOUT.as_secs()))?
    }

    /// Gives `order` to each of `devices` (this one through its execution actor) at once; all must carry it out.
    async fn order_all(&self, devices: &[PeerId], order: &CacheMove) -> Result<(), String> {
        let devices: std::collections::BTreeSet<PeerId> = devices.iter().copied().collect();
        let answers = futures::future::join_all(devices.into_iter().map(|device| async move {
            let answer = if device == self.me {
                let (me, order) = (self.me, order.clone());
                call_t!(
                    self.execution,
                    |reply| ExecutionMsg::Move { asker: me, order, waiter: crate::actor::Waiter::Local(reply) },
                    crate::actor::CALL_TIMEOUT_MS
                )
                .map_err(|e| e.to_string())
                .and_then(|r| r)
            } else {
                crate::actor::ask(&self.client, device, "it", &NodeMessage::Move(order.clone())).await
            };
            answer.map_err(|e| format!("{device}: {e}"))
        }))
        .await;
        answers.into_iter().collect()
    }
}

/// What `llnode prompt` prints besides the text.
pub struct Report {
    /// The plan epoch and speed, to stderr, when done.
    pub stats: bool,
    /// When each token came, to stderr, when done.
    pub timings: bool,
}

/// `llnode prompt`: asks the local node and prints the answer as it streams.
pub fn cli(
    data_dir: &std::path::Path,
    args: &crate::cli::GenerationArgs,
    model: Option<String>,
    private: bool,
    report: Report,
    prompt: String,
) -> anyhow::Result<()> {
    args.sampling().validate().map_err(anyhow::Error::msg)?;
    let request = PromptRequest {
        prompt,
        max_tokens: args.max_tokens,
        sampling: args.sampling(),
        stop: args.stop.clone(),
        chat: args.chat,
        ignore_eos: args.ignore_eos,
        model,
        private,
    };
    let rt = crate::runtime()?;
    rt.block_on(crate::control::prompt(data_dir, request, &mut |event| match event {
        PromptEvent::Text(text) => crate::out(&text),
        PromptEvent::Waiting(line) => eprintln!("llnode: waiting for {line}"),
        PromptEvent::Moving { why } => eprintln!("\nllnode: {why}; waiting for the mesh's next plan…"),
        PromptEvent::HandedOver { epoch, tokens, past, pause_s } => eprintln!(
            "\nllnode: moved to plan epoch {epoch} after {tokens} token(s) (the caches of {past} token(s) handed over in {:.0} ms)",
            pause_s * 1e3
        ),
        PromptEvent::Resumed { why, epoch, replayed, pause_s } => eprintln!(
            "llnode: {why}; resumed on plan epoch {epoch} after {:.0} ms (replayed {replayed} step(s))",
            pause_s * 1e3
        ),
        PromptEvent::Done { prompt_tokens, tokens, first_token_s, decode_tokens_per_s, epoch, token_ms } => {
            crate::outln!();
            if report.timings {
                let times: Vec<String> = token_ms.iter().map(|t| format!("{t:.1}")).collect();
                eprintln!("timings_ms: {}", times.join(" "));
            }
            if report.stats {
                eprintln!(
                    "stats: plan_epoch={epoch} prompt_tokens={prompt_tokens} tokens={tokens} first_token_ms={:.2} decode_tok_s={decode_tokens_per_s:.2}",
                    first_token_s * 1e3
                );
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_models_tokenizer_is_parsed_once_and_a_third_model_starts_over() {
        let root = tempfile::tempdir().unwrap();
        let silent = llnode_models::progress::Silent;
        let export = llnode_models::synth::write_export(
            &llnode_models::synth::SynthConfig::tiny(),
            &root.path().join("export"),
            &silent,
        )
        .unwrap();
        let model = llnode_models::model::Model::from_export(&export).unwrap();
        let kept = Tokenizers::default();
        let first = kept.of("a", &model).unwrap();
        assert!(Arc::ptr_eq(&first, &kept.of("a", &model).unwrap()));
        assert_eq!(
            first.encode("hello").unwrap(),
            TextTokenizer::load(&model.dir, model.info.vocab_size).unwrap().encode("hello").unwrap()
        );
        let second = kept.of("b", &model).unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert!(Arc::ptr_eq(&second, &kept.of("b", &model).unwrap()));
        // A third model clears the two kept: "a" is parsed again.
        kept.of("c", &model).unwrap();
        assert!(!Arc::ptr_eq(&first, &kept.of("a", &model).unwrap()));

        std::fs::remove_file(export.join("tokenizer.json")).unwrap();
        let err = kept.of("d", &model).err().unwrap();
        assert!(err.contains("tokenizer.json"), "{err}");
    }
}
