//! The node's own messages between members, carried by the mesh as opaque
//! CBOR inside `ControlRequest::Node`, the signed, numbered plan, and why a
//! step failed ([`StepFail`], also sent in tensor acknowledgements).

use std::ops::Range;

use ed25519_dalek::{Signature, Signer, Verifier};
use llnode_mesh::identity;
use llnode_mesh::wire::TensorAck;
use llnode_mesh::{DeviceKey, MeshError, PeerId};
use llnode_planner::config::Objective;
use llnode_planner::election::Leadership;
use llnode_planner::plan::Plan;
use llnode_planner::profile::DeviceProfile;
use serde::{Deserialize, Serialize};

const PLAN_DOMAIN: &[u8] = b"llnode plan v1\0";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum NodeMessage {
    /// "This is who leads, as far as I know."
    Leader(Leadership),
    /// The sender's measured profile (its id must be the sender's peer id).
    Profile(DeviceProfile),
    /// A plan published by the leader.
    Plan(SignedPlan),
    /// Asks the leader to plan again, for this objective.
    Replan { objective: Objective },
    /// The initiator is done with a session: free its KV caches.
    EndSession { session: u64 },
    /// To a session's initiator: step `step` failed on the sender, and why
    /// (whether the generation can go on on the next plan, ends busy, or fails).
    StepFailed { session: u64, step: u64, why: StepFail },
    /// The packages the sender can serve files of (sent when trust becomes mutual).
    Have { models: Vec<String> },
    /// Asks for bytes `offset..offset+len` of a package file, answered with a
    /// bao slice that proves them against the manifest's hash (the manifest
    /// itself comes whole, proved by the package id).
    Fetch { model: String, file: String, offset: u64, len: u64 },
    /// The leader cannot plan for the live members (the reason, for people):
    /// generations waiting to move to a new plan stop waiting.
    NoPlan { reason: String },
    /// Where the sender stands with plan `epoch`: initiators wait for every
    /// stage to be ready before the first step, and show what they wait for.
    Readiness { epoch: u64, state: Readiness },
    /// Asks the leader for plans that keep the first and last units (token ids
    /// in, logits out) on the sender: privacy mode. Answered once such a plan
    /// is published, or refused with the reason.
    Private,
    /// Asks the leader to plan for this package (one a member holds) instead
    /// of the one it plans for; answered once such a plan is published, or
    /// refused with the reason.
    UseModel { model: String },
    /// From an initiator moving its generation to a new plan at a token
    /// boundary; answered once done.
    Move(CacheMove),
    /// The sender's measured pace on its share of the plan, sent with every
    /// balancer window: every member sees each stage's time per token and
    /// queue depth, and `llnode plan` names the bottleneck.
    Pace(crate::pace::Pace),
}

/// How a generation moves to a new plan without replaying its tokens: the
/// devices that ran it hand each layer's KV cache to the device that runs
/// that layer in the new plan, then the new plan's devices start the new
/// session from those caches.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum CacheMove {
    /// Send this device's caches of session `from` (`past` tokens in) to the
    /// devices that run their layers in the plan of `epoch` (`stages`: each
    /// segment's device, as a peer id, and units), for its session `to`; then
    /// forget `from`.
    HandOver { from: u64, to: u64, epoch: u64, past: u64, stages: Vec<(String, Range<usize>)> },
    /// Session `session` of plan `epoch` starts here from the caches handed
    /// over, `past` tokens in.
    Seal { session: u64, epoch: u64, past: u64 },
}

/// A device's progress with the units a plan gives it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Readiness {
    /// Getting and loading them: what it is doing, for people.
    Loading(String),
    Ready,
    /// It cannot (the reason); it tries again every few seconds.
    Failed(String),
}

impl NodeMessage {
    pub fn encode(&self) -> Vec<u8> {
        serde_cbor::to_vec(self).expect("node messages encode")
    }

    pub fn decode(bytes: &[u8]) -> Result<NodeMessage, String> {
        serde_cbor::from_slice(bytes).map_err(|e| format!("malformed node message: {e}"))
    }
}

/// What the leader publishes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanDoc {
    /// Numbered across leaders: a member keeps the highest it has seen.
    pub epoch: u64,
    pub term: u64,
    /// The leader's peer id; its key signs the plan.
    pub leader: String,
    /// The package the plan runs.
    pub model: String,
    pub plan: Plan,
    /// Unix seconds.
    pub issued_at: u64,
    /// The device the plan keeps the first and last units on (privacy mode), if any.
    #[serde(default)]
    pub private: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SignedPlan {
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl SignedPlan {
    pub fn sign(doc: &PlanDoc, key: &DeviceKey) -> SignedPlan {
        let body = serde_cbor::to_vec(doc).expect("plans encode");
        let signature = key.signing().sign(&[PLAN_DOMAIN, &body].concat()).to_bytes().to_vec();
        SignedPlan { body, signature }
    }

    /// The plan, if its leader's key signed it.
    pub fn open(&self) -> Result<PlanDoc, String> {
        let doc: PlanDoc = serde_cbor::from_slice(&self.body).map_err(|e| format!("malformed plan: {e}"))?;
        let leader: PeerId = doc.leader.parse().map_err(|_| "the plan's leader is not a peer id".to_string())?;
        let key = identity::key_of(&leader).ok_or("the plan's leader has no ed25519 key")?;
        let signature = Signature::from_slice(&self.signature).map_err(|_| "the plan is unsigned".to_string())?;
        key.verify(&[PLAN_DOMAIN, &self.body].concat(), &signature)
            .map_err(|_| "the plan's signature is not its leader's".to_string())?;
        Ok(doc)
    }
}

/// Why a step's logits will not come: to the initiator in the step's
/// acknowledgement, or in [`NodeMessage::StepFailed`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StepFail {
    /// The plan changed under it (a device left, the balancer moved units):
    /// the initiator can replay the generation on the next plan.
    Moved(String),
    /// A device has no room for it just now (sessions, a plan still
    /// loading): the generation ends with this, to be asked again, rather
    /// than wait for a plan without the device. Sent as [`TensorAck::Busy`].
    Busy(String),
    /// The step itself failed.
    Failed(String),
}

impl StepFail {
    /// A step's tensors for segment `s` did not reach its device: one that
    /// cannot be reached or refuses is on its way out of the plan, unless it
    /// is busy.
    pub fn not_taken(s: usize, e: MeshError) -> StepFail {
        match e {
            MeshError::Busy(reason) => StepFail::Busy(reason),
            e => StepFail::Moved(format!("the device running segment {s} did not take the step ({e})")),
        }
    }

    pub fn text(&self) -> &str {
        match self {
            StepFail::Moved(why) | StepFail::Busy(why) | StepFail::Failed(why) => why,
        }
    }

    /// How a device that refuses a tensor for this reason acknowledges it.
    pub fn ack(&self) -> TensorAck {
        match self {
            StepFail::Busy(reason) => TensorAck::Busy { reason: reason.clone() },
            why => TensorAck::Refused { reason: why.text().to_string() },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llnode_planner::plan::{Method, Plan};

    fn doc(leader: &DeviceKey, epoch: u64) -> PlanDoc {
        let plan = Plan {
            objective: Objective::Latency,
            objective_s: 0.1,
            latency_s: 0.1,
            bottleneck_s: 0.1,
            context_tokens: 16,
            stages: Vec::new(),
            spares: Vec::new(),
            excluded: Vec::new(),
            method: Method::Baseline { name: "test".into() },
        };
        PlanDoc {
            epoch,
            term: 1,
            leader: leader.peer_id().to_base58(),
            model: "m".into(),
            plan,
            issued_at: 0,
            private: None,
        }
    }

    #[test]
    fn plans_open_only_with_their_leaders_signature() {
        let leader = DeviceKey::generate();
        let signed = SignedPlan::sign(&doc(&leader, 3), &leader);
        assert_eq!(signed.open().unwrap().epoch, 3);

        let mut tampered = signed.clone();
        let last = tampered.body.len() - 1;
        tampered.body[last] ^= 1;
        assert!(tampered.open().is_err());

        // Signed by another device while naming this leader.
        let impostor = DeviceKey::generate();
        assert!(SignedPlan::sign(&doc(&leader, 4), &impostor).open().unwrap_err().contains("signature"));
        let unsigned = SignedPlan { body: signed.body.clone(), signature: Vec::new() };
        assert!(unsigned.open().unwrap_err().contains("unsigned"));

        let message = NodeMessage::Plan(signed);
        assert!(matches!(NodeMessage::decode(&message.encode()), Ok(NodeMessage::Plan(_))));
        assert!(NodeMessage::decode(b"junk").is_err());
    }

    #[test]
    fn a_failed_step_keeps_its_kind_on_the_way_to_the_initiator() {
        for why in [StepFail::Moved("m".into()), StepFail::Busy("busy: b".into()), StepFail::Failed("f".into())] {
            let message = NodeMessage::StepFailed { session: 7, step: 3, why: why.clone() };
            match NodeMessage::decode(&message.encode()) {
                Ok(NodeMessage::StepFailed { session: 7, step: 3, why: back }) => assert_eq!(back, why),
                other => panic!("{why:?} came back as {other:?}"),
            }
        }
    }
}
