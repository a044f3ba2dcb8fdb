//! The leader's part: solving the assignment for the live members' profiles
//! on the blocking pool, and publishing the plan, signed and numbered by
//! epoch (after a re-profile, only an assignment that beats the held one by
//! [`MIN_GAIN`]).

use std::collections::BTreeSet;
use std::time::Duration;

use llnode_planner::config::Config;
use llnode_planner::plan::{Plan, PlanError};
use llnode_planner::profile::{DeviceProfile, Link};
use ractor::ActorRef;

use super::{DEBOUNCE, MIN_GAIN, PROFILE_WAIT, PlanningMsg, PlanningState, SETTLE_HORIZON, short};
use crate::protocol::{NodeMessage, PlanDoc, SignedPlan};

impl PlanningState {
    pub(super) fn replan(&mut self, myself: &ActorRef<PlanningMsg>) {
        if !self.election.is_leader() || self.solving {
            return;
        }
        let Some((model_id, cost)) = self.args.model.clone() else {
            self.problem = Some("the leader has no model to plan for; start it with --model <package>".into());
            return;
        };
        let live = self.live();
        let missing: Vec<String> = live.iter().filter(|id| !self.profiles.contains_key(*id)).cloned().collect();
        if !missing.is_empty() {
            let since = *self.waiting_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() < PROFILE_WAIT {
                self.problem = Some(format!(
                    "waiting for the profiles of {}",
                    missing.iter().map(|m| self.name_of(m)).collect::<Vec<_>>().join(", ")
                ));
                self.replan_queued = true;
                myself.send_after(DEBOUNCE, || PlanningMsg::Replan);
                return;
            }
        }
        self.waiting_since = None;
        let devices: Vec<DeviceProfile> =
            live.iter().filter_map(|id| self.profiles.get(id)).map(|p| for_model(p, &model_id)).collect();
        let config = Config {
            objective: self.args.objective,
            context_tokens: 1024,
            // Pairs that have not measured each other: a Wi-Fi-like link.
            assumed_link: Some(Link { bandwidth_bytes_per_s: 20e6, rtt_s: 0.005 }),
            time_limit: Duration::from_secs(5),
            privacy: self.private.clone().filter(|id| live.contains(id)),
            ..Config::default()
        };
        self.solving = true;
        let generation = self.generation;
        let myself = myself.clone();
        let held_plan = self.held.as_ref().filter(|(_, d)| d.model == model_id).map(|(_, d)| &d.plan);
        let held = held_plan.map(Plan::assignment);
        // What each device has loaded: its stages and its spares.
        let loaded: Vec<(String, std::ops::Range<usize>)> = held_plan
            .map(|plan| {
                let spares = plan.spares.iter().map(|s| (s.device.clone(), s.units.clone()));
                held.iter().flatten().cloned().chain(spares).collect()
            })
            .unwrap_or_default();
        // The history says what came of a re-plan; only a first plan (which
        // may take a while) is said to be under way.
        let planning = format!("planning {} for {} devices ({})", short(&model_id), devices.len(), config.objective);
        if held_plan.is_some() {
            tracing::info!("{planning}");
        } else {
            self.note(planning);
        }
        tokio::task::spawn_blocking(move || {
            // The solver's plan, or one that loads less where that is worth more;
            // idle devices keep spares of what a failover would give them.
            let running = held.as_deref().unwrap_or_default();
            let result = llnode_planner::assign::plan(&cost, &devices, &config)
                .map(|plan| {
                    llnode_planner::assign::settle(&cost, &devices, &config, plan, running, &loaded, SETTLE_HORIZON)
                })
                .map(|plan| llnode_planner::assign::failover_spares(&cost, &devices, &config, plan, SETTLE_HORIZON));
            let held_now =
                held.and_then(|stages| llnode_planner::assign::objective_of(&cost, &devices, &config, &stages));
            let _ = myself.cast(PlanningMsg::Solved { generation, result, held_now });
        });
    }

    pub(super) fn publish(
        &mut self,
        result: Result<Plan, PlanError>,
        held_now: Option<f64>,
        myself: &ActorRef<PlanningMsg>,
    ) {
        if !self.election.is_leader() {
            return;
        }
        // Why this plan was made: said with it if it moves units, forgotten if not.
        let reasons = std::mem::take(&mut self.reasons);
        let plan = match result {
            Ok(plan) => plan,
            // Privacy mode cannot be had: say so to whoever asked, and plan as before.
            Err(e) if self.private.is_some() => {
                let name = self.private.take().map(|id| self.name_of(&id)).unwrap_or_default();
                self.note(format!("no plan keeps the first and last units on {name}: {e}"));
                self.answer_private(Err(format!("no plan keeps the first and last units on {name}: {e}")));
                self.reasons = reasons;
                self.changed(myself);
                return;
            }
            // Neither can the model a member asked for: back to the one before.
            Err(e) if self.previous_model.is_some() => {
                let wanted = self.args.model.take().map(|(id, _)| id).unwrap_or_default();
                self.args.model = self.previous_model.take();
                self.note(format!("cannot plan model {}: {e}; planning the model before it again", short(&wanted)));
                self.answer_model(&wanted, Err(format!("the mesh cannot run model {}: {e}", short(&wanted))));
                self.reasons = reasons;
                self.changed(myself);
                return;
            }
            Err(e) => {
                self.note(format!("no plan: {e}"));
                let reason = e.to_string();
                self.problem = Some(reason.clone());
                // Generations waiting to move to a new plan must not wait for one that cannot come.
                let _ = self.args.execution.cast(crate::actor::execution::ExecutionMsg::NoPlan(reason.clone()));
                self.broadcast(NodeMessage::NoPlan { reason });
                return;
            }
        };
        let Some((model, _)) = self.args.model.clone() else {
            return;
        };
        let term = self.election.current().map_or(0, |l| l.term);
        if let Some((_, held)) = &self.held {
            // The same assignment under the same leadership is not worth a new epoch:
            // sessions running on it would have to start over.
            // A plan for another model or another private device is news, whatever its assignment.
            let same_asks = held.private == self.private && held.model == model;
            // New spares (a device back, with room for some) are news too.
            if held.leader == self.me
                && held.term == term
                && same_assignment(&held.plan, &plan)
                && held.plan.spares == plan.spares
                && held.plan.objective == plan.objective
                && same_asks
            {
                self.kept("the same assignment".into(), &reasons);
                self.answer_published(&model);
                return;
            }
            // With the same devices live and the same objective, move work only for a
            // clear gain over the held assignment costed on today's profiles:
            // generations under way must replay their tokens to switch.
            let held_devices: BTreeSet<&str> = held.plan.stages.iter().map(|s| s.device.as_str()).collect();
            let all_live =
                held_devices.iter().all(|d| *d == self.me || self.members.iter().any(|m| m.to_base58() == *d));
            if held.leader == self.me
                && held.term == term
                && held.plan.objective == plan.objective
                && same_asks
                && all_live
                && self.members.len() + 1 == self.planned_for
                && let Some(now) = held_now.filter(|now| plan.objective_s > now * (1.0 - MIN_GAIN))
            {
                let why = format!(
                    "a new plan would gain under {:.0}% ({:.2} → {:.2} ms/token)",
                    MIN_GAIN * 100.0,
                    now * 1e3,
                    plan.objective_s * 1e3
                );
                self.kept(why, &reasons);
                self.answer_published(&model);
                return;
            }
        }
        let epoch = self.held.as_ref().map_or(0, |(_, d)| d.epoch) + 1;
        self.kept_by = 0;
        if let Some((_, held)) = &self.held {
            let moved = moves(&held.plan, &plan);
            if !moved.is_empty() {
                let why = if reasons.is_empty() { String::new() } else { format!(" because {}", reasons.join(", ")) };
                let gain = held_now.map_or(String::new(), |now| {
                    format!(" ({:.2} → {:.2} ms/token)", now * 1e3, plan.objective_s * 1e3)
                });
                self.note(format!("epoch {epoch}: moving units{why}: {}{gain}", moved.join("; ")));
            }
        }
        self.planned_for = self.members.len() + 1;
        let private = self.private.clone();
        let held_model = model.clone();
        let doc =
            PlanDoc { epoch, term, leader: self.me.clone(), model, plan, issued_at: llnode_mesh::cert::now(), private };
        let signed = SignedPlan::sign(&doc, &self.args.key);
        let privacy = doc.private.as_ref().map_or(String::new(), |id| {
            format!(", keeping the first and last units on {} (privacy mode)", self.name_of(id))
        });
        self.note(format!(
            "epoch {epoch}: published a plan with {} stages, {:.2} ms/token{privacy}",
            doc.plan.stages.len(),
            doc.plan.latency_s * 1e3
        ));
        let _ = self.args.execution.cast(crate::actor::execution::ExecutionMsg::Plan(doc.clone()));
        self.held = Some((signed.clone(), doc));
        self.problem = None;
        self.broadcast(NodeMessage::Plan(signed));
        self.answer_published(&held_model);
    }

    /// A re-plan kept the held plan (`why`). Re-plans come every few minutes
    /// on a steady mesh (a link's measure moves, a device re-profiles), so
    /// they share one history line per plan, the latest last, rather than
    /// push out the lines that say how the plan came to be.
    fn kept(&mut self, why: String, reasons: &[String]) {
        let Some(epoch) = self.held.as_ref().map(|(_, d)| d.epoch) else { return };
        self.kept_by += 1;
        let head = format!("epoch {epoch} kept ");
        let after = if reasons.is_empty() { String::new() } else { format!(" after {}", reasons.join(", ")) };
        let times = match self.kept_by {
            1 => "once".to_string(),
            n => format!("{n} times"),
        };
        let event = format!("{head}{times} by a re-plan, the last{after}: {why}");
        tracing::info!("{event}");
        self.history.renew(&head, event);
    }
}

/// What changed between two plans, per device ("b: 0..4 → 0..2").
pub(super) fn moves(old: &Plan, new: &Plan) -> Vec<String> {
    let units = |plan: &Plan, device: &str| -> String {
        let held: Vec<String> =
            plan.stages.iter().filter(|s| s.device == device).map(|s| format!("{:?}", s.units)).collect();
        if held.is_empty() { "nothing".into() } else { held.join("+") }
    };
    let mut devices: Vec<(&str, &str)> = Vec::new();
    for s in old.stages.iter().chain(&new.stages) {
        if !devices.iter().any(|(d, _)| *d == s.device) {
            devices.push((&s.device, &s.device_name));
        }
    }
    devices
        .into_iter()
        .filter_map(|(d, name)| {
            let (before, after) = (units(old, d), units(new, d));
            (before != after).then(|| format!("{name}: {before} → {after}"))
        })
        .collect()
}

/// `profile` for planning `model`: unit times measured on another model are
/// left out (its speed estimate stays).
pub(super) fn for_model(profile: &DeviceProfile, model: &str) -> DeviceProfile {
    let mut profile = profile.clone();
    if profile.measured_on.as_deref() != Some(model) {
        profile.unit_time_s = None;
    }
    profile
}

/// Same devices running the same units, in the same order.
pub fn same_assignment(a: &Plan, b: &Plan) -> bool {
    a.stages.len() == b.stages.len()
        && a.stages.iter().zip(&b.stages).all(|(x, y)| x.device == y.device && x.units == y.units)
}
