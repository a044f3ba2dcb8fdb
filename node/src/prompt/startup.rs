//! Before a generation's first step (and when it moves): the route it runs
//! on, and the wait until every device of that route has loaded its units.

use std::time::Duration;

use llnode_mesh::PeerId;
use ractor::{ActorRef, RpcReplyPort, call_t};
use tokio::sync::mpsc;

use super::{PromptEvent, ROUTE_WAIT_MS, keeps_tokens_on};
use crate::actor::execution::{ExecutionMsg, Route};
use crate::actor::planning::PlanningMsg;

/// How a generation gets the route it starts, or goes on, on: from this
/// node's actors, telling the asker what it waits for.
pub(super) struct Startup<'a> {
    pub(super) me: PeerId,
    pub(super) planning: &'a ActorRef<PlanningMsg>,
    pub(super) execution: &'a ActorRef<ExecutionMsg>,
    pub(super) events: &'a mpsc::UnboundedSender<PromptEvent>,
    pub(super) private: bool,
    /// The package the prompt asked for (a full id), if it named one.
    pub(super) model: Option<String>,
}

impl Startup<'_> {
    /// The route to run on, from `route`: of the model asked for, in privacy
    /// mode one that keeps the tokens here, and only once every stage of it
    /// is ready.
    pub(super) async fn ready(&self, route: Route) -> Result<Route, String> {
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
    pub(super) async fn stages(&self, route: &Route) -> Result<Stages, String> {
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
pub(super) struct Stages {
    /// One of them is on a newer plan already.
    newer: bool,
    /// One of them has left the mesh.
    gone: bool,
    /// What each live one still does before it can run the plan.
    waiting: Vec<String>,
}

impl Stages {
    pub(super) fn all_ready(&self) -> bool {
        !self.newer && !self.gone && self.waiting.is_empty()
    }
}
