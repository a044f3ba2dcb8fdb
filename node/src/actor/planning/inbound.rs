//! What members tell this node's planning: leadership, profiles, readiness,
//! plans (kept only when signed by a live member and newer than the one
//! held) and the leader's requests.

use llnode_mesh::PeerId;
use ractor::ActorRef;

use super::{PlanningMsg, PlanningState};
use crate::protocol::{NodeMessage, Readiness, SignedPlan};

impl PlanningState {
    /// A message from `peer`, which the mesh's gate has already found trusted.
    pub(super) fn inbound(
        &mut self,
        peer: PeerId,
        message: NodeMessage,
        myself: &ActorRef<PlanningMsg>,
    ) -> Result<(), String> {
        match message {
            NodeMessage::Leader(leadership) => {
                let was_leader = self.election.is_leader();
                if self.election.announced(leadership.clone()) {
                    self.note(format!("term {}: {} leads", leadership.term, self.name_of(&leadership.leader)));
                    if self.election.is_leader() != was_leader {
                        self.changed(myself);
                    }
                }
                Ok(())
            }
            NodeMessage::Profile(profile) => {
                if profile.id != peer.to_base58() {
                    return Err("a profile must be the sender's own".into());
                }
                let known = self.profiles.get(&profile.id).map(|old| old.flops_per_s / profile.flops_per_s);
                if let Some(ratio) = known
                    && (ratio - 1.0).abs() > 0.01
                {
                    self.reason(super::measure::measured_itself(&profile.name, ratio));
                }
                self.profiles.insert(profile.id.clone(), profile);
                // A member's first profile comes with others' as devices meet: those are planned together.
                if known.is_some() {
                    self.reprofiled(myself);
                } else {
                    self.changed(myself);
                }
                Ok(())
            }
            NodeMessage::Plan(signed) => self.receive_plan(&peer, signed, myself),
            NodeMessage::EndSession { session } => {
                let _ = self.args.execution.cast(crate::actor::execution::ExecutionMsg::EndSession { session });
                Ok(())
            }
            NodeMessage::StepFailed { session, step, why } => {
                let _ = self.args.execution.cast(crate::actor::execution::ExecutionMsg::StepFailed {
                    from: peer,
                    session,
                    step,
                    why,
                });
                Ok(())
            }
            NodeMessage::Have { models } => {
                self.args.store.set_holder(peer, &models);
                if self.args.model.is_none()
                    && !self.learning
                    && let Some(model) = models.first().cloned()
                {
                    self.learn(model, myself);
                }
                Ok(())
            }
            NodeMessage::Fetch { .. } => Err("fetches go to the model store".into()),
            NodeMessage::Move(_) => Err("caches go to the execution actor".into()),
            NodeMessage::Pace(pace) => {
                self.paces.insert(peer.to_base58(), pace);
                Ok(())
            }
            NodeMessage::Private | NodeMessage::UseModel { .. } => {
                Err("this node does not lead; ask the leader".into())
            }
            NodeMessage::Readiness { epoch, state } => {
                let id = peer.to_base58();
                // Messages travel on streams of their own and may overtake each other: a
                // device ready for an epoch stays so, whatever "loading" line comes after.
                let stale =
                    |(held, said): &(u64, Readiness)| *held > epoch || (*held == epoch && *said == Readiness::Ready);
                if !self.readiness.get(&id).is_some_and(stale) {
                    self.readiness.insert(id, (epoch, state));
                }
                Ok(())
            }
            NodeMessage::NoPlan { reason } => {
                if self.election.current().is_none_or(|l| l.leader != peer.to_base58()) {
                    return Err("only the leader says there is no plan".into());
                }
                self.note(format!("the leader cannot plan: {reason}"));
                self.problem = Some(reason.clone());
                let _ = self.args.execution.cast(crate::actor::execution::ExecutionMsg::NoPlan(reason));
                Ok(())
            }
            NodeMessage::Replan { objective } => {
                if !self.election.is_leader() {
                    return Err("this node does not lead; ask the leader".into());
                }
                self.args.objective = objective;
                self.changed(myself);
                Ok(())
            }
        }
    }

    /// Fetches a model's manifest so this node can plan for it when it leads.
    pub(super) fn learn(&mut self, model: String, myself: &ActorRef<PlanningMsg>) {
        self.learning = true;
        let (store, client, myself) = (self.args.store.clone(), self.args.client.clone(), myself.clone());
        tokio::spawn(async move {
            let result =
                store.ensure_manifest(&client, &model).await.map(|m| (model, crate::profile::model_cost(&m.cost)));
            let _ = myself.cast(PlanningMsg::ModelLearnt(result));
        });
    }

    pub(super) fn receive_plan(
        &mut self,
        from: &PeerId,
        signed: SignedPlan,
        myself: &ActorRef<PlanningMsg>,
    ) -> Result<(), String> {
        let doc = signed.open()?;
        let signer_live = doc.leader == self.me
            || doc.leader == from.to_base58()
            || self.members.iter().any(|p| p.to_base58() == doc.leader);
        if !signer_live {
            return Err("the plan is signed by a device that is not a live member".into());
        }
        if let Some((_, held)) = &self.held
            && doc.epoch <= held.epoch
        {
            return Err(format!("plan epoch {} is not newer than the held epoch {}", doc.epoch, held.epoch));
        }
        self.note(format!(
            "epoch {}: plan from {} ({} stages)",
            doc.epoch,
            self.name_of(&doc.leader),
            doc.plan.stages.len()
        ));
        // Should this node lead later, it plans the model the mesh runs.
        if self.args.model.as_ref().is_some_and(|(id, _)| *id != doc.model)
            && self.wanted_model.as_ref() != Some(&doc.model)
        {
            self.wanted_model = Some(doc.model.clone());
            self.learn(doc.model.clone(), myself);
        }
        let _ = self.args.execution.cast(crate::actor::execution::ExecutionMsg::Plan(doc.clone()));
        self.held = Some((signed, doc));
        self.problem = None;
        Ok(())
    }
}
