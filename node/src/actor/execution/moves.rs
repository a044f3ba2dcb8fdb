//! A live move's steps on this device: the old plan's devices hand each
//! layer's KV cache of a session to the device that runs that layer now
//! ([`CacheMove::HandOver`]), and the new devices start the session from
//! the caches they received ([`CacheMove::Seal`]).

use std::collections::HashMap;
use std::ops::Range;

use llnode_mesh::PeerId;
use llnode_models::raw;

use super::{CACHE, Current, Delivery, ExecutionState, Import, Session, busy_sessions, wire_tensor};
use crate::actor::Waiter;
use crate::protocol::CacheMove;

impl ExecutionState {
    /// A step of an initiator's live move ([`CacheMove`]); `waiter` hears when it is done.
    pub(super) fn move_caches(&mut self, asker: PeerId, order: CacheMove, waiter: Waiter) {
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
                            client
                                .send_tensor(device, tensor)
                                .await
                                .map_err(|e| format!("cannot hand a cache to {device}: {e}"))?;
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
        let session =
            self.sessions.get(&from).ok_or("this device holds no such session (it may have restarted); replay it")?;
        if session.initiator != asker {
            return Err("only a session's initiator can move it".into());
        }
        let ready = self
            .plans
            .of(session.epoch)
            .and_then(Current::ready)
            .ok_or("this device no longer runs the session's plan; replay it")?;
        let mut handed = Vec::new();
        for (s, state) in &session.states {
            let state = state.as_ref().ok_or_else(|| format!("segment {s} is still running a step of the session"))?;
            if state.past() as u64 != past {
                return Err(format!("segment {s} has run {} tokens of the session, not {past}", state.past()));
            }
            for (name, value) in state.caches() {
                let unit = ready.cache_units.get(name).ok_or_else(|| format!("no unit reads {name}"))?;
                let (device, _) = stages
                    .iter()
                    .find(|(_, units)| units.contains(unit))
                    .ok_or_else(|| format!("the new plan runs no unit {unit}"))?;
                let device: PeerId = device.parse().map_err(|_| format!("{device} is not a peer id"))?;
                let value = raw::to_raw(value).map_err(|e| e.to_string())?;
                let name = format!("{CACHE}{name}");
                handed.push((
                    device,
                    Delivery {
                        session: to,
                        epoch,
                        initiator: asker,
                        step: 0,
                        tokens: past as u32,
                        name,
                        value,
                        top_logits: 0,
                        no_logits: false,
                        compute_us: 0,
                    },
                ));
            }
        }
        self.sessions.remove(&from);
        Ok(handed)
    }

    /// Keeps a handed-over cache until its session is sealed.
    pub(super) fn import(&mut self, d: Delivery) -> Result<(), String> {
        if self.left.contains(&d.initiator) {
            return Err(format!("the initiator of this session, {}, left the mesh", d.initiator));
        }
        if !self.imports.contains_key(&d.session) && self.imports.len() >= self.args.max_sessions {
            return Err(busy_sessions(self.args.max_sessions));
        }
        let heard = std::time::Instant::now();
        let import = self.imports.entry(d.session).or_insert_with(|| Import {
            initiator: d.initiator,
            caches: HashMap::new(),
            heard,
        });
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
    pub(super) fn seal(&mut self, asker: PeerId, session: u64, epoch: u64, past: usize) -> Result<(), String> {
        let ready = self
            .plans
            .of(epoch)
            .and_then(Current::ready)
            .ok_or_else(|| format!("this device does not run plan epoch {epoch} (any more)"))?;
        let mut import = self.imports.remove(&session).unwrap_or(Import {
            initiator: asker,
            caches: HashMap::new(),
            heard: std::time::Instant::now(),
        });
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
            let state =
                runner.resume(past, &mut take).map_err(|e| format!("segment {s} cannot resume the session: {e}"))?;
            states.insert(s, Some(state));
        }
        // The session's next tensors say how many logits its initiator reads.
        let top_logits = 0;
        let heard = std::time::Instant::now();
        self.sessions.insert(
            session,
            Session { initiator: asker, epoch, states, next: HashMap::new(), inbox: HashMap::new(), top_logits, heard },
        );
        Ok(())
    }
}
