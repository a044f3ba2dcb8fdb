//! The node's actors. `llnode start` spawns them under the tokio runtime;
//! the mesh event loop (in `llnode-mesh`) feeds them events, and the local
//! control endpoint asks them questions.
//!
//! ```text
//! llnode start
//! ├── mesh event loop (task; owns the libp2p Swarm and the gate)
//! ├── DiscoveryActor   peer table, dialling, reconnect backoff, `llnode peers`
//! ├── TrustActor       certificates, invites and joins, revocations on disk
//! ├── PlanningActor    election, members' profiles, the signed plan
//! ├── ExecutionActor   this device's segments, KV caches per session, routing
//! ├── BalancingActor   this device's measured pace against its profile
//! └── control server   (task; Unix socket in the data directory)
//! ```

pub mod balancing;
pub mod discovery;
pub mod execution;
pub mod planning;
pub mod trust;

/// How long the control endpoint waits for an actor's answer.
pub const CALL_TIMEOUT_MS: u64 = 30_000;

/// Sends `peer` (called `who` in errors) a node message answered by
/// [`Waiter::answer`]: `Ok` on its acknowledgement, else its reason, or why
/// it did not answer.
pub async fn ask(
    client: &llnode_mesh::MeshClient,
    peer: llnode_mesh::PeerId,
    who: &str,
    message: &crate::protocol::NodeMessage,
) -> Result<(), String> {
    use llnode_mesh::wire::{ControlRequest, ControlResponse};
    match client.request(peer, ControlRequest::Node(message.encode())).await {
        Ok(ControlResponse::Ack) => Ok(()),
        Ok(ControlResponse::Refused { reason }) => Err(reason),
        Ok(other) => Err(format!("{who} answered {other:?}")),
        Err(e) => Err(format!("{who} did not answer: {e}")),
    }
}

/// Who asked for something answered later (a plan published, caches in
/// place): this node's CLI or code, or a member whose request waits.
pub enum Waiter {
    Local(ractor::RpcReplyPort<Result<(), String>>),
    Remote(llnode_mesh::event::InboundId),
}

impl Waiter {
    pub fn answer(self, client: &llnode_mesh::MeshClient, result: Result<(), String>) {
        use llnode_mesh::wire::ControlResponse;
        match self {
            Waiter::Local(reply) => {
                let _ = reply.send(result);
            }
            Waiter::Remote(id) => client.respond(
                id,
                match result {
                    Ok(()) => ControlResponse::Ack,
                    Err(reason) => ControlResponse::Refused { reason },
                },
            ),
        }
    }
}
