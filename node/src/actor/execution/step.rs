//! A session's steps on this device: each tensor that comes is filed with
//! the local segments that read it; a segment's step runs once all its
//! inputs are in, every earlier step has run and its KV cache is free; its
//! outputs go to the segments that read them and its logits to the
//! initiator; a step that fails is told to the initiator.

use std::collections::HashMap;

use llnode_mesh::PeerId;
use llnode_mesh::wire::Tensor as WireTensor;
use llnode_models::pipeline::last_logits;
use llnode_models::raw;
use llnode_models::runner::{Activations, ChainState, RunError};
use llnode_models::transmission::Endpoint;
use ractor::ActorRef;

use super::{
    Current, Delivery, ExecutionMsg, ExecutionState, Import, Inputs, MAX_EARLY, SESSION_IDLE, Session, Step, StepFail,
    StepLogits, busy, busy_sessions, logits_tensor, read_logits, wire_tensor,
};
use crate::protocol::NodeMessage;

impl ExecutionState {
    /// A tensor for segments on this device: file it with every local segment that reads it.
    /// A plan that moved on is [`StepFail::Moved`]; no room just now (early
    /// tensors, sessions), [`StepFail::Busy`]; anything else wrong, [`StepFail::Failed`].
    pub(super) fn deliver(&mut self, d: Delivery, myself: &ActorRef<ExecutionMsg>) -> Result<(), StepFail> {
        let newer = self.plans.current.as_ref().is_none_or(|c| d.epoch > c.doc.epoch);
        if newer {
            if self.ahead.len() >= MAX_EARLY {
                return Err(StepFail::Busy(busy("this device has not received the plan it is asked to run yet")));
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
                return Err(StepFail::Busy(busy("this device is still loading its units")));
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
                return Err(StepFail::Busy(busy_sessions(self.args.max_sessions)));
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
            let inputs = session.inbox.entry((*s, d.step)).or_insert_with(|| Inputs {
                tokens: d.tokens,
                no_logits: d.no_logits,
                compute_us: 0,
                acts: Activations::new(),
            });
            inputs.compute_us = inputs.compute_us.max(d.compute_us);
            inputs.acts.insert(d.name.clone(), value.clone());
        }
        for s in readers {
            self.try_run(d.session, s, d.step, myself);
        }
        Ok(())
    }

    /// Steps, over all sessions, whose inputs for segment `s` are all in and
    /// that wait for it: its queue depth.
    pub(super) fn queued(&self, s: usize) -> usize {
        let Some(ready) = self.plans.current.as_ref().and_then(Current::ready) else {
            return 0;
        };
        let needed: Vec<&str> = ready.map.inputs_of(s).map(|t| t.tensor.as_str()).collect();
        self.sessions
            .values()
            .filter(|sess| self.plans.is_current(sess.epoch))
            .flat_map(|sess| sess.inbox.iter())
            .filter(|((seg, _), inputs)| *seg == s && needed.iter().all(|n| inputs.acts.contains_key(*n)))
            .count()
    }

    /// Runs segment `s` for `step` once all its inputs are in, every earlier
    /// step has run and its cache is free.
    pub(super) fn try_run(&mut self, session: u64, s: usize, step: u64, myself: &ActorRef<ExecutionMsg>) {
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
        let ready = sess.inbox.get(&(s, step)).is_some_and(|inputs| needed.iter().all(|n| inputs.acts.contains_key(n)));
        let turn = sess.next.get(&s).copied().unwrap_or(1) == step;
        let free = !matches!(sess.states.get(&s), Some(None));
        if !ready || !turn || !free {
            return;
        }
        let Inputs { tokens, no_logits, compute_us, acts } = sess.inbox.remove(&(s, step)).expect("ready");
        let inline = tokens == 1 && self.alone();
        let sess = self.sessions.get_mut(&session).expect("looked up above");
        let mut cache = sess.states.insert(s, None).flatten().unwrap_or_else(|| runner.new_state());
        let done = Step { session, segment: s, step, tokens, no_logits, compute_us };
        let throttle = self.args.throttle.clone();
        let run = move |cache: &mut ChainState| {
            let started = std::time::Instant::now();
            // A panic in tract fails the step, not the thread: on the
            // actor's own thread it would stop the actor.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                runner.run_for(cache, tokens as usize, &acts, !no_logits)
            }))
            .unwrap_or_else(|panic| Err(RunError::Run { units: runner.units(), reason: panic_message(&*panic) }));
            throttle.stretch(started.elapsed());
            (started.elapsed().as_secs_f64(), result)
        };
        if inline {
            // One session and nothing else running: its decode step runs on
            // this worker, which keeps its place in the runtime, while the
            // runtime's other worker serves the network. Handing the step to
            // the blocking pool and its outputs back would wake two threads,
            // 150-200 µs of the token's time on loopback. Lending the
            // worker's place to another thread for the step
            // (`block_in_place`) wakes that thread as the step starts, and
            // the outputs' send often waits for it: from a step's inputs to
            // its start and from its end to its outputs' send took 50 and
            // 140 µs that way, 10 and 60 µs this way (a stage of a 2-node
            // loopback mesh, timestamps). The actor is held for the step;
            // with one session it has nothing else to do but acknowledge
            // tensors and answer `llnode plan`, which wait until the step
            // ends (so do the acknowledgements of the step's other inputs,
            // written by a task this worker woke just before).
            let (secs, result) = run(&mut cache);
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
    /// with a worker to spare while the actor runs a step.
    pub(super) fn alone(&self) -> bool {
        let idle = |sess: &Session| sess.states.values().all(Option::is_some);
        self.sessions.len() == 1
            && self.sessions.values().all(idle)
            && tokio::runtime::Handle::current().metrics().num_workers() >= 2
    }

    /// A step of `segment` has run: its cache goes back, its outputs go on,
    /// and the segment's next step runs if its inputs are in.
    pub(super) fn step_done(
        &mut self,
        done: Step,
        secs: f64,
        cache: ChainState,
        result: Result<Activations, RunError>,
        myself: &ActorRef<ExecutionMsg>,
    ) {
        let Step { session, segment, step, tokens, no_logits, .. } = done;
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        s.states.insert(segment, Some(cache));
        s.next.insert(segment, step + 1);
        let (initiator, epoch) = (s.initiator, s.epoch);
        // The balancer compares the plan held with this device's profile:
        // steps of a replaced plan do not count, nor replayed ones that skipped the LM head.
        if tokens == 1
            && !no_logits
            && result.is_ok()
            && self.plans.is_current(epoch)
            && let Some(stage) = self.plans.current.as_ref().and_then(|c| c.doc.plan.stages.get(segment))
        {
            let queued = self.queued(segment);
            self.pace.record(segment, stage.units.clone(), secs, queued);
        }
        match result {
            Ok(outputs) => {
                let done = Step { compute_us: done.compute_us + (secs * 1e6) as u64, ..done };
                self.forward(done, initiator, outputs, myself)
            }
            Err(e) => {
                tracing::error!(session, "segment {segment} failed at step {step}: {e}");
                self.fail(session, initiator, step, StepFail::Failed(format!("segment {segment} failed: {e}")));
            }
        }
        // The next step's inputs may already be here.
        self.try_run(session, segment, step + 1, myself);
    }

    /// Sends the outputs of a step of a segment where the transmission map says.
    pub(super) fn forward(
        &mut self,
        done: Step,
        initiator: PeerId,
        outputs: Activations,
        myself: &ActorRef<ExecutionMsg>,
    ) {
        let Step { session, segment: s, step, tokens, no_logits, compute_us } = done;
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
                Endpoint::Initiator => {
                    last_logits(value).map(|logits| (initiator, s, logits_tensor(&logits, top_logits)))
                }
                Endpoint::Segment(d) => {
                    raw::to_raw(value).map(|raw| (devices[d], d, raw)).map_err(|e| RunError::Remote(e.to_string()))
                }
            };
            let (to, feeds, raw) = match converted {
                Ok(sent) => sent,
                Err(e) => {
                    self.fail(session, initiator, step, StepFail::Failed(e.to_string()));
                    return;
                }
            };
            let name = t.tensor.clone();
            let d = Delivery {
                session,
                epoch,
                initiator,
                step,
                tokens,
                name,
                value: raw,
                top_logits,
                no_logits,
                compute_us,
            };
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

    pub(super) fn logits(&mut self, d: Delivery) {
        let Some((_, reply)) = self.waiting.remove(&(d.session, d.step)) else {
            return;
        };
        let compute_us = d.compute_us;
        let _ =
            reply.send(read_logits(d.value).map(|logits| StepLogits { logits, compute_us }).map_err(StepFail::Failed));
    }

    /// Step `step` of `session` failed here: its initiator hears why, here
    /// or by a message (it would otherwise wait for logits that never come).
    pub(super) fn fail(&mut self, session: u64, initiator: PeerId, step: u64, why: StepFail) {
        if initiator != self.args.me {
            let message = NodeMessage::StepFailed { session, step, why }.encode();
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
pub(super) fn sweep(
    sessions: &mut HashMap<u64, Session>,
    imports: &mut HashMap<u64, Import>,
    now: std::time::Instant,
) -> usize {
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
        let mut sessions =
            HashMap::from([(1, session(start, false)), (2, session(later, false)), (3, session(start, true))]);
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
