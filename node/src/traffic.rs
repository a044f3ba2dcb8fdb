//! Activations this node sent to each member (tensors and payload bytes),
//! shown by `llnode plan --json` and read by `just bench-mesh-infer`.

use std::collections::BTreeMap;
use std::sync::Mutex;

use llnode_mesh::PeerId;
use serde::{Deserialize, Serialize};

#[derive(Default)]
pub struct Traffic(Mutex<BTreeMap<String, Sent>>);

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sent {
    pub tensors: u64,
    pub bytes: u64,
}

impl Traffic {
    pub fn record(&self, peer: &PeerId, bytes: usize) {
        let mut sent = self.0.lock().expect("traffic lock");
        let entry = sent.entry(peer.to_base58()).or_default();
        entry.tensors += 1;
        entry.bytes += bytes as u64;
    }

    /// By peer id.
    pub fn snapshot(&self) -> BTreeMap<String, Sent> {
        self.0.lock().expect("traffic lock").clone()
    }
}
