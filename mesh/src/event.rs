//! What the mesh tells the node. Requests that need an answer carry an
//! [`InboundId`]; the node answers through [`crate::MeshClient`].

use std::time::Duration;

use libp2p::{Multiaddr, PeerId};

use crate::cert::SignedRevocation;
use crate::trust::Refusal;
use crate::wire::{ControlRequest, Tensor};

/// A request waiting for the node's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InboundId(pub u64);

impl InboundId {
    /// Tensors that came on a tensor stream are numbered apart from what the event loop numbers.
    const STREAM: u64 = 1 << 63;

    pub(crate) fn stream(n: u64) -> InboundId {
        InboundId(InboundId::STREAM | n)
    }

    pub(crate) fn on_stream(self) -> bool {
        self.0 & InboundId::STREAM != 0
    }
}

#[derive(Debug)]
pub enum MeshEvent {
    Listening {
        addr: Multiaddr,
    },
    /// `dialed`: we opened it, so `addr` is one the peer listens on.
    Connected {
        peer: PeerId,
        addr: Multiaddr,
        dialed: bool,
    },
    Disconnected {
        peer: PeerId,
    },
    /// The peer proved membership; `name` is from its certificate.
    Trusted {
        peer: PeerId,
        name: String,
    },
    /// The peer trusts us too: control requests and tensors can flow both ways.
    Member {
        peer: PeerId,
    },
    /// We refused the peer; it is disconnected and blocked for a while.
    Refused {
        peer: PeerId,
        reason: Refusal,
    },
    /// The peer refused us.
    RefusedBy {
        peer: PeerId,
        reason: String,
    },
    Rtt {
        peer: PeerId,
        rtt: Duration,
    },
    /// A trusted peer's listen addresses (from identify).
    Identified {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
    },
    /// mDNS saw a peer on the local network, or a trusted member introduced one.
    Discovered {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
    },
    DialFailed {
        peer: Option<PeerId>,
        error: String,
    },
    /// A device asks to join with a token's secret; answer with `answer_join`.
    JoinRequest {
        peer: PeerId,
        id: InboundId,
        secret: [u8; 16],
        name: String,
    },
    /// A revocation new to this device (already applied by the gate; persist it).
    Revocation {
        revoked: PeerId,
        revocation: SignedRevocation,
    },
    /// A trusted peer's control request; answer with `respond`.
    Control {
        peer: PeerId,
        id: InboundId,
        request: ControlRequest,
    },
    /// A trusted peer sent a tensor; acknowledge with `ack_tensor`.
    Tensor {
        peer: PeerId,
        id: InboundId,
        tensor: Tensor,
    },
}
