//! What members ask of the leader: plans of a model they name, and privacy
//! mode (plans that keep the first and last units on the asker). An ask is
//! answered once a plan that gives it is out, or planning fails.

use llnode_mesh::PeerId;
use ractor::{ActorRef, RpcReplyPort};

use super::{PlanningMsg, PlanningState, short};
use crate::actor::Waiter;
use crate::protocol::NodeMessage;

impl PlanningState {
    /// Who leads: `None` when this node does, an error when nobody does yet.
    pub(super) fn leader(&self) -> Result<Option<PeerId>, String> {
        match self.election.current() {
            None => Err("the mesh has no leader yet; retry in a moment".into()),
            Some(l) if l.leader == self.me => Ok(None),
            Some(l) => l.leader.parse().map(Some).map_err(|_| "the leader's id is not a peer id".to_string()),
        }
    }

    /// Sends the leader an ask it answers once the plan it wants is out.
    pub(super) fn ask_leader(&self, leader: PeerId, message: NodeMessage, reply: RpcReplyPort<Result<(), String>>) {
        let client = self.args.client.clone();
        tokio::spawn(async move {
            let _ = reply.send(crate::actor::ask(&client, leader, "the leader", &message).await);
        });
    }

    /// A member wants plans of `model`: plan for it (fetching its manifest
    /// first), and answer `waiter` when such a plan is out.
    pub(super) fn want_model(&mut self, model: String, waiter: Waiter, myself: &ActorRef<PlanningMsg>) {
        let runs = self.held.as_ref().is_some_and(|(_, d)| d.model == model);
        if runs && self.args.model.as_ref().is_some_and(|(id, _)| *id == model) {
            waiter.answer(&self.args.client, Ok(()));
            return;
        }
        self.model_waiters.push((model.clone(), waiter));
        self.reason(format!("a member asked for model {}", short(&model)));
        if self.args.model.as_ref().is_some_and(|(id, _)| *id == model) {
            self.changed(myself);
        } else if self.wanted_model.as_ref() != Some(&model) || !self.learning {
            self.wanted_model = Some(model.clone());
            self.learn(model, myself);
        }
    }

    /// Tells those waiting for plans of `model` how it went.
    pub(super) fn answer_model(&mut self, model: &str, result: Result<(), String>) {
        let (now, later): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.model_waiters).into_iter().partition(|(m, _)| m == model);
        self.model_waiters = later;
        for (_, waiter) in now {
            waiter.answer(&self.args.client, result.clone());
        }
    }

    /// `device` wants privacy mode: plan again keeping the first and last
    /// units on it, and answer `waiter` when that plan is out.
    pub(super) fn want_private(&mut self, device: String, waiter: Waiter, myself: &ActorRef<PlanningMsg>) {
        if self.private.as_ref().is_some_and(|held| *held != device) {
            let name = self.name_of(&device);
            self.reason(format!("{name} asked for privacy mode"));
        }
        self.private = Some(device);
        self.private_waiters.push(waiter);
        self.changed(myself);
    }

    /// Tells those waiting for privacy mode how it went.
    pub(super) fn answer_private(&mut self, result: Result<(), String>) {
        for waiter in self.private_waiters.drain(..) {
            waiter.answer(&self.args.client, result.clone());
        }
    }

    /// Tells everyone waiting for a plan that one is out (`model`'s).
    pub(super) fn answer_published(&mut self, model: &str) {
        self.answer_private(Ok(()));
        self.answer_model(model, Ok(()));
        self.previous_model = None;
    }
}
