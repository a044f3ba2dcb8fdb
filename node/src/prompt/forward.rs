//! The generation's steps across the mesh: [`MeshForward`] sends each
//! step's inputs to the segments that read them and waits for the logits.
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
//! pipelined through the stages without waiting for their logits, which the
//! last stage does not compute; then it runs the interrupted step. The text
//! is unchanged; the stream only pauses.

use std::sync::Arc;
use std::time::Duration;

use llnode_mesh::{MeshClient, PeerId};
use llnode_models::pipeline::step_inputs;
use llnode_models::raw;
use llnode_models::runner::RunError;
use llnode_models::transmission::Endpoint;
use ractor::{ActorRef, call_t};
use tokio::sync::{mpsc, oneshot};

use super::startup::Startup;
use super::{PromptEvent, keeps_tokens_on};
use crate::actor::execution::{Delivery, ExecutionMsg, Route, StepLogits, wire_tensor};
use crate::actor::planning::PlanningMsg;
use crate::protocol::{CacheMove, NodeMessage, StepFail};

/// How long one step may take across the mesh before the initiator looks for a new plan.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// How many times one generation moves to a new plan before it gives up.
const MAX_MOVES: usize = 8;
/// Replayed steps in flight at once when a generation moves to a new plan.
const REPLAY_WINDOW: u64 = 64;
/// How long an interrupted generation waits for the next plan to be loaded here.
const MOVE_WAIT_MS: u64 = 300_000;
/// How long the devices of a live move have to hand the caches over.
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a generation stopped on its route, and since when.
type Interruption = (String, std::time::Instant);

/// The generation's steps through the current route's stages, moving to
/// the next plan when the mesh changes; awaited on the runtime, as the
/// steps' tensors and logits come and go there.
pub(super) struct MeshForward {
    pub(super) me: PeerId,
    pub(super) client: MeshClient,
    pub(super) execution: ActorRef<ExecutionMsg>,
    /// See [`Initiator::loaded`](super::Initiator::loaded).
    pub(super) loaded: tokio::sync::watch::Receiver<Option<(u64, crate::protocol::Readiness)>>,
    pub(super) traffic: Arc<crate::traffic::Traffic>,
    pub(super) planning: ActorRef<PlanningMsg>,
    pub(super) events: mpsc::UnboundedSender<PromptEvent>,
    /// The session on the current route, and every session this generation
    /// opened with the devices that may hold its caches.
    pub(super) session: u64,
    pub(super) sessions: Vec<(u64, Vec<PeerId>)>,
    pub(super) route: Route,
    /// Privacy mode: token ids go to no other device, and every route keeps them here.
    pub(super) private: bool,
    /// The last step number used in `session`.
    pub(super) step: u64,
    pub(super) past: usize,
    /// The token groups of every step that has run, in order: what a move replays.
    pub(super) history: Vec<Vec<u32>>,
    pub(super) with_positions: bool,
    /// How many logits the sampler reads ([`SamplingConfig::logits_needed`](llnode_models::sampling::SamplingConfig::logits_needed)); 0: all.
    pub(super) top_logits: u32,
    pub(super) started: std::time::Instant,
    /// When each step's logits came, in ms from `started`.
    pub(super) token_ms: Vec<f64>,
    /// Each step's time from its send to its logits, and the stages'
    /// compute in it (on the path through them), in ms.
    pub(super) step_ms: Vec<(f64, f64)>,
}

impl MeshForward {
    /// Runs `tokens` after everything fed so far; returns the logits of the last one.
    pub(super) async fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, RunError> {
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
        // Why and since when this step has been interrupted, once it has (it
        // then moves to the next plan); or why this token boundary's move to a
        // newer plan had to replay, to be said once the step has run.
        let (mut moved, replayed): (Option<Interruption>, Option<Interruption>) = match self.switch_if_ready().await {
            Ok(replayed) => (None, replayed),
            Err(StepFail::Moved(why)) => (Some((why, std::time::Instant::now())), None),
            Err(StepFail::Failed(e) | StepFail::Busy(e)) => return Err(RunError::Remote(e)),
        };
        for _ in 0..=MAX_MOVES {
            if let Some((why, since)) = &moved {
                match self.move_on(why).await {
                    Ok(()) => {}
                    Err(StepFail::Failed(e) | StepFail::Busy(e)) => return Err(RunError::Remote(e)),
                    // The plan moved again during the replay: move again.
                    Err(StepFail::Moved(again)) => {
                        moved = Some((again, *since));
                        continue;
                    }
                }
            }
            match self.step_through(tokens).await {
                Ok(logits) => {
                    if let Some((why, since)) = moved.or(replayed) {
                        self.resumed(why, since);
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

    /// Tokens fed so far (the past length).
    pub(super) fn position(&self) -> usize {
        self.past
    }

    /// Runs one step on the current route and waits for its logits.
    async fn step_through(&mut self, tokens: &[u32]) -> Result<Vec<f32>, StepFail> {
        self.step += 1;
        let started = std::time::Instant::now();
        let logits = self.expect_logits(self.step)?;
        self.send_step(self.step, tokens, self.past, true).await?;
        let StepLogits { logits, compute_us } = self.wait(logits).await?;
        self.step_ms.push((started.elapsed().as_secs_f64() * 1e3, compute_us as f64 / 1e3));
        Ok(logits)
    }

    /// Asks this node's execution actor for `step`'s logits, before the step is sent.
    fn expect_logits(&self, step: u64) -> Result<oneshot::Receiver<Result<StepLogits, StepFail>>, StepFail> {
        let (reply, logits) = oneshot::channel();
        self.execution
            .cast(ExecutionMsg::AwaitLogits { session: self.session, epoch: self.route.epoch, step, reply })
            .map_err(|e| StepFail::Failed(format!("the node is stopping: {e}")))?;
        Ok(logits)
    }

    async fn wait(&self, logits: oneshot::Receiver<Result<StepLogits, StepFail>>) -> Result<StepLogits, StepFail> {
        tokio::time::timeout(STEP_TIMEOUT, logits)
            .await
            .map_err(|_| StepFail::Moved(format!("no logits within {} s", STEP_TIMEOUT.as_secs())))?
            .map_err(|_| StepFail::Failed("the node dropped the step".into()))?
    }

    /// Sends a step's inputs (token ids, mask, positions) to the segments
    /// that read them; `logits`: whether the step returns its logits. Remote
    /// ones go out together, so a stage waits for one round trip, not one per input.
    async fn send_step(&self, step: u64, tokens: &[u32], past: usize, logits: bool) -> Result<(), StepFail> {
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
                no_logits: !logits,
                compute_us: 0,
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
        futures::future::join_all(sends).await.into_iter().collect()
    }

    /// The generation went on on the current route, after replaying every
    /// step so far into it: the node's history and the asker hear why and
    /// how long it paused.
    fn resumed(&self, why: String, since: std::time::Instant) {
        let (epoch, replayed, pause_s) = (self.route.epoch, self.history.len(), since.elapsed().as_secs_f64());
        let note = format!(
            "a generation moved to plan epoch {epoch} ({why}): replayed {replayed} step(s), paused {:.0} ms",
            pause_s * 1e3
        );
        let _ = self.planning.cast(PlanningMsg::Note(note));
        let _ = self.events.send(PromptEvent::Resumed { why, epoch, replayed, pause_s });
    }

    /// Waits for a plan newer than the current route and replays the generation onto it.
    async fn move_on(&mut self, why: &str) -> Result<(), StepFail> {
        let after = self.route.epoch;
        let route = call_t!(self.execution, |reply| ExecutionMsg::Route { after, reply }, MOVE_WAIT_MS)
            .map_err(|e| StepFail::Failed(format!("{why}, and no new plan came: {e}")))?
            .map_err(|e| StepFail::Failed(format!("{why}; {e}")))?;
        if route.model != self.route.model {
            return Err(StepFail::Failed(format!(
                "{why}, and the mesh now runs model {} (another member asked for it); ask again",
                crate::store::short(&route.model)
            )));
        }
        // In privacy mode the plan may have to be asked for again: a new leader does not know.
        let route = self.startup().ready(route).await.map_err(|e| StepFail::Failed(format!("{why}; {e}")))?;
        self.replay_onto(route).await
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
    /// number of tensors; the asker hears how far the replay is each time.
    /// Only those steps return logits: the others skip the LM head, which
    /// leaves the caches as they were (the tokens they led to are known).
    async fn replay_onto(&mut self, route: Route) -> Result<(), StepFail> {
        self.open(route, rand::random());
        let mut past = 0;
        let history = self.history.clone();
        for (i, tokens) in history.iter().enumerate() {
            self.step += 1;
            let checkpoint = self.step.is_multiple_of(REPLAY_WINDOW) && i + 1 < history.len();
            let logits = if checkpoint { Some(self.expect_logits(self.step)?) } else { None };
            // Only a checkpoint's logits are read: the others skip the LM head.
            self.send_step(self.step, tokens, past, checkpoint).await?;
            past += tokens.len();
            if let Some(logits) = logits {
                self.wait(logits).await?;
                let (epoch, done, total) = (self.route.epoch, i + 1, history.len());
                let _ = self.events.send(PromptEvent::Replaying { epoch, done, total });
            }
        }
        Ok(())
    }

    /// At a token boundary: when this node has loaded a plan newer than the
    /// route, of the same model (in privacy mode, one keeping the tokens
    /// here), and every other device of it says it is ready, the generation
    /// moves onto it by handing its caches over; if that fails, by replaying
    /// (then, why and since when, for the step to report once it has run).
    /// Otherwise the old plan goes on serving.
    async fn switch_if_ready(&mut self) -> Result<Option<Interruption>, StepFail> {
        // Asking the execution actor is a round trip through its mailbox:
        // only when this device has loaded a plan of a later epoch (a plan's
        // first epoch is at most its epoch, so this misses none).
        let after = self.route.epoch;
        let newer_loaded =
            matches!(&*self.loaded.borrow(), Some((epoch, crate::protocol::Readiness::Ready)) if *epoch > after);
        if self.history.is_empty() || !newer_loaded {
            return Ok(None);
        }
        let newer =
            call_t!(self.execution, |reply| ExecutionMsg::NewerRoute { after, reply }, crate::actor::CALL_TIMEOUT_MS);
        let Ok(Some(route)) = newer else { return Ok(None) };
        if route.model != self.route.model || (self.private && !keeps_tokens_on(&route, self.me)) {
            return Ok(None);
        }
        match self.startup().stages(&route).await {
            Ok(stages) if stages.all_ready() => {}
            _ => return Ok(None),
        }
        let since = std::time::Instant::now();
        let to = rand::random();
        match self.hand_over(&route, to).await {
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
                Ok(None)
            }
            Err(why) => {
                tracing::warn!(
                    session = self.session,
                    "cannot hand the caches over to plan epoch {} ({why}); replaying instead",
                    route.epoch
                );
                self.sessions.push((to, route.devices.clone()));
                self.replay_onto(route).await?;
                Ok(Some((format!("the caches could not be handed over ({why})"), since)))
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
