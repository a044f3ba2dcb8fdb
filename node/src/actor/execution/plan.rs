//! The plans this device holds: the one it runs and, during a live move,
//! the loaded one it replaced, which serves its sessions until they move.
//! Adopting a new plan (carrying on when only its epoch changed, loading
//! otherwise), and dropping what no plan serves any more.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;
use std::sync::Arc;

use llnode_mesh::PeerId;
use llnode_models::runner::{Chain, SegmentRunner};
use llnode_models::transmission::TransmissionMap;
use ractor::{ActorRef, RpcReplyPort};

use super::load::{hold_spares, prepare, readiness, spares_of};
use super::{Delivery, ExecutionMsg, ExecutionState, Route, StepFail};
use crate::protocol::PlanDoc;

pub(super) struct Current {
    pub(super) doc: PlanDoc,
    /// The first epoch of this assignment: tensors routed by it or later run here.
    pub(super) first_epoch: u64,
    pub(super) devices: Vec<PeerId>,
    /// The load whose outcome `ready` waits for; a newer epoch with the same assignment keeps it.
    pub(super) load: u64,
    /// Once this device holds its units: `Ok`, or why it cannot run them.
    pub(super) ready: Option<Result<Ready, String>>,
    /// Tensors that arrived before `ready`.
    pub(super) early: Vec<Delivery>,
    /// Initiators waiting for a route newer than the epoch each names.
    pub(super) route_waiters: Vec<(u64, RpcReplyPort<Result<Route, String>>)>,
    /// The leader said it cannot plan for the members left: why.
    pub(super) no_plan: Option<String>,
    /// Devices of this plan that left the mesh since it came.
    pub(super) gone: BTreeSet<PeerId>,
}

/// A plan this device can run its share of.
pub struct Ready {
    pub(super) map: TransmissionMap,
    /// Each local segment, as runners of consecutive units.
    pub(super) runners: HashMap<usize, Arc<Chain>>,
    /// Every runner this device holds: its segments' parts, and spare units
    /// loaded ahead, so that a move loads only units new to it.
    pub(super) held: Vec<Arc<SegmentRunner>>,
    /// The spare units the plan gives it.
    pub(super) spares: Vec<Range<usize>>,
    /// Units loaded for this plan; the others were held already.
    pub(super) fresh: usize,
    /// The package files its segments read.
    pub(super) files: BTreeSet<String>,
    /// Files of the spare units the plan gives it ([`llnode_planner::plan::Spare`]), not among `files`.
    pub(super) spare_files: BTreeSet<String>,
    /// The unit that reads each cache (`past_key_values.N.key|value`): where a layer's cache goes in a live move.
    pub(super) cache_units: HashMap<String, usize>,
}

/// The plans this device serves: the one it holds, and during a live move
/// the loaded one it replaced.
#[derive(Default)]
pub(super) struct Plans {
    pub(super) current: Option<Current>,
    pub(super) previous: Option<Current>,
}

impl Plans {
    /// The plan that serves sessions routed by `epoch`.
    pub(super) fn of(&self, epoch: u64) -> Option<&Current> {
        if self.is_current(epoch) {
            self.current.as_ref()
        } else {
            self.current.as_ref()?;
            self.previous.as_ref().filter(|p| p.covers(epoch))
        }
    }

    pub(super) fn of_mut(&mut self, epoch: u64) -> Option<&mut Current> {
        if self.is_current(epoch) {
            self.current.as_mut()
        } else {
            self.current.as_ref()?;
            self.previous.as_mut().filter(|p| p.covers(epoch))
        }
    }

    /// Whether sessions routed by `epoch` run on the plan held (not one it replaced).
    pub(super) fn is_current(&self, epoch: u64) -> bool {
        self.current.as_ref().is_some_and(|c| epoch >= c.first_epoch)
    }
}

impl Current {
    /// Whether sessions routed by `epoch` run on this plan as a replaced one
    /// (from its first epoch to the last it was held at).
    pub(super) fn covers(&self, epoch: u64) -> bool {
        (self.first_epoch..=self.doc.epoch).contains(&epoch)
    }

    pub(super) fn ready(&self) -> Option<&Ready> {
        self.ready.as_ref().and_then(|r| r.as_ref().ok())
    }

    /// Answers the waiters this plan satisfies, once it is loaded.
    pub(super) fn answer_waiters(&mut self) {
        let Some(route) = self.route() else { return };
        let epoch = self.doc.epoch;
        let (now, later): (Vec<_>, Vec<_>) = self.route_waiters.drain(..).partition(|(after, _)| *after < epoch);
        self.route_waiters = later;
        for (_, reply) in now {
            let _ = reply.send(route.clone());
        }
    }

    pub(super) fn route(&self) -> Option<Result<Route, String>> {
        let ready = self.ready.as_ref()?;
        Some(ready.as_ref().map_err(Clone::clone).map(|r| Route {
            epoch: self.doc.epoch,
            model: self.doc.model.clone(),
            devices: self.devices.clone(),
            map: r.map.clone(),
        }))
    }
}

impl ExecutionState {
    pub(super) fn adopt(&mut self, doc: PlanDoc, myself: &ActorRef<ExecutionMsg>) {
        if let Some(current) = &mut self.plans.current {
            if current.doc.epoch >= doc.epoch {
                return;
            }
            // A device that left lost its caches, even if it is back in the same place.
            if current.doc.model == doc.model
                && current.gone.is_empty()
                && crate::actor::planning::same_assignment(&current.doc.plan, &doc.plan)
            {
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
            if self.serves(&outgoing)
                && outgoing.ready().is_some()
                && outgoing.gone.is_empty()
                && outgoing.doc.model == doc.model
            {
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
    pub(super) fn forget_orphans(&mut self, why: &str) {
        let plans = &self.plans;
        for (id, _) in self.sessions.extract_if(|_, s| plans.of(s.epoch).is_none()) {
            tracing::info!(session = id, "{why}: its initiator replays it");
        }
        for (_, (_, reply)) in self.waiting.extract_if(|_, (epoch, _)| plans.of(*epoch).is_none()) {
            let _ = reply.send(Err(StepFail::Moved(why.to_string())));
        }
    }

    /// Drops the replaced plan; its sessions replay (`why`).
    pub(super) fn drop_previous(&mut self, why: &str) {
        self.plans.previous = None;
        self.forget_orphans(why);
        crate::alloc::hand_back();
    }

    /// Whether a session, or a step waiting for its logits, runs on `plan`.
    pub(super) fn serves(&self, plan: &Current) -> bool {
        self.sessions.values().any(|s| plan.covers(s.epoch))
            || self.waiting.values().any(|(epoch, _)| plan.covers(*epoch))
    }

    /// Sessions ended here (their initiator ended them or left, or they
    /// idled): a replaced plan left without any goes, and with none left at
    /// all the allocator hands freed memory back.
    pub(super) fn sessions_ended(&mut self) {
        self.drop_previous_if_idle();
        if self.sessions.is_empty() {
            crate::alloc::hand_back();
        }
    }

    /// Drops the replaced plan once the one held is loaded and no session is left on it.
    pub(super) fn drop_previous_if_idle(&mut self) {
        let loaded = self.plans.current.as_ref().is_some_and(|c| c.ready().is_some());
        let Some(previous) = self.plans.previous.as_ref().filter(|_| loaded) else { return };
        if !self.serves(previous) {
            tracing::info!("epoch {}: no session is left on it", previous.doc.epoch);
            self.plans.previous = None;
            crate::alloc::hand_back();
        }
    }

    /// Delivers the tensors that came ahead of the plan now held.
    pub(super) fn deliver_ahead(&mut self, myself: &ActorRef<ExecutionMsg>) {
        let ahead = std::mem::take(&mut self.ahead);
        self.redeliver(ahead, "came ahead of its plan", myself);
    }

    /// Delivers tensors that waited (they `came` …); the initiator of one
    /// that cannot be delivered now hears why, as it would have at once.
    pub(super) fn redeliver(&mut self, held: Vec<Delivery>, came: &str, myself: &ActorRef<ExecutionMsg>) {
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
    pub(super) fn prepare(
        &mut self,
        doc: &PlanDoc,
        reuse: Vec<Arc<SegmentRunner>>,
        myself: &ActorRef<ExecutionMsg>,
    ) -> u64 {
        self.loads += 1;
        let load = self.loads;
        let me = self.args.me.to_base58();
        let segments: Vec<Range<usize>> = doc.plan.stages.iter().map(|s| s.units.clone()).collect();
        let mine: Vec<usize> =
            doc.plan.stages.iter().enumerate().filter(|(_, s)| s.device == me).map(|(i, _)| i).collect();
        let spares = spares_of(doc, &me);
        let model = doc.model.clone();
        let (store, client, myself) = (self.args.store.clone(), self.args.client.clone(), myself.clone());
        tokio::spawn(async move {
            let result = prepare(&store, &client, &model, segments, mine, spares, reuse).await;
            let _ = myself.cast(ExecutionMsg::Loaded { load, result });
        });
        load
    }
}
