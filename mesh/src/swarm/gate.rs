//! The event loop's protocol handlers: the gate (hello, join), and the
//! control and bulk tensor protocols, which serve trusted peers only.

use std::time::Instant;

use libp2p::PeerId;
use libp2p::request_response::{Event, Message};

use super::{EventLoop, OutGate, PeerGate, short};
use crate::cert::{SignedRevocation, now};
use crate::event::{InboundId, MeshEvent};
use crate::swarm::MeshError;
use crate::trust::Refusal;
use crate::wire::{ControlRequest, ControlResponse, Frame, GateRequest, GateResponse, Member, Tensor, TensorAck};

const NOT_TRUSTED: &str = "not trusted: present a valid mesh certificate first";

impl EventLoop {
    /// A first connection to `peer`: it gets the grace period, and our certificate.
    pub(super) fn connected(&mut self, peer: PeerId) {
        if self.blocked_until.contains_key(&peer) {
            // Dialled or accepted just before the block took effect.
            let _ = self.swarm.disconnect_peer_id(peer);
            return;
        }
        let deadline = Instant::now() + self.config.gate_grace;
        self.peers.insert(peer, PeerGate::Pending { deadline });
        self.hello(peer);
    }

    pub(super) fn hello(&mut self, peer: PeerId) {
        let Some(certificate) = self.trust.own_certificate().cloned() else { return };
        let id = self.id();
        let request =
            Frame::new(id, GateRequest::Hello { certificate, revocations: self.trust.revocations().to_vec() });
        let rid = self.swarm.behaviour_mut().gate.send_request(&peer, request);
        self.out_gate.insert(rid, (id, peer, OutGate::Hello));
    }

    /// Refuses `peer`: every protocol turns it away from now on, and its
    /// connections close once the refusal has had a moment to reach it.
    pub(super) fn refuse(&mut self, peer: PeerId, reason: Refusal) {
        if matches!(self.peers.get(&peer), Some(PeerGate::Refused { .. })) {
            return;
        }
        tracing::info!(peer = %short(&peer), "refused: {reason}");
        let now = Instant::now();
        self.listen_addrs.remove(&peer);
        self.peers.insert(peer, PeerGate::Refused { close_at: now + std::time::Duration::from_millis(300) });
        self.blocked_until.insert(peer, now + self.config.refusal_block);
        self.emit(MeshEvent::Refused { peer, reason });
    }

    /// Applies revocations (signed by our mesh's owner, others are ignored),
    /// refuses any connected peer they name, tells the node so it persists
    /// them, and passes new ones on to every trusted peer.
    pub(super) fn learn_revocations(&mut self, revocations: Vec<SignedRevocation>, from: Option<PeerId>) {
        let mut new = Vec::new();
        for revocation in revocations {
            if let Some(revoked) = self.trust.add_revocation(revocation.clone()) {
                if self.peers.contains_key(&revoked) {
                    self.refuse(revoked, Refusal::Revoked);
                }
                self.emit(MeshEvent::Revocation { revoked, revocation: revocation.clone() });
                new.push(revocation);
            }
        }
        if new.is_empty() {
            return;
        }
        let trusted: Vec<PeerId> =
            self.peers.keys().filter(|p| self.is_member(p) && Some(**p) != from).copied().collect();
        for peer in trusted {
            let id = self.id();
            let _ = self
                .swarm
                .behaviour_mut()
                .control
                .send_request(&peer, Frame::new(id, ControlRequest::Revocations(new.clone())));
        }
    }

    /// Trust is now mutual: requests and tensors may flow.
    fn became_member(&mut self, peer: PeerId) {
        self.emit(MeshEvent::Member { peer });
        self.introduce(peer);
    }

    /// Tells `peer` where the other trusted members listen, and them where `peer` does.
    pub(super) fn introduce(&mut self, peer: PeerId) {
        let members: Vec<PeerId> = self.peers.keys().filter(|p| **p != peer && self.is_member(p)).copied().collect();
        let member = |p: &PeerId, addrs: &[libp2p::Multiaddr]| Member {
            peer: p.to_bytes(),
            addrs: addrs.iter().map(|a| a.to_string()).collect(),
        };
        let others: Vec<Member> =
            members.iter().filter_map(|p| self.listen_addrs.get(p).map(|a| member(p, a))).collect();
        if !others.is_empty() {
            let id = self.id();
            let _ = self
                .swarm
                .behaviour_mut()
                .control
                .send_request(&peer, Frame::new(id, ControlRequest::Introduce(others)));
        }
        let Some(addrs) = self.listen_addrs.get(&peer).cloned() else { return };
        for other in members {
            let id = self.id();
            let body = ControlRequest::Introduce(vec![member(&peer, &addrs)]);
            let _ = self.swarm.behaviour_mut().control.send_request(&other, Frame::new(id, body));
        }
    }

    pub(super) fn gate_event(&mut self, event: Event<Frame<GateRequest>, Frame<GateResponse>>) {
        match event {
            Event::Message { peer, message: Message::Request { request, channel, .. }, .. } => {
                if matches!(self.peers.get(&peer), Some(PeerGate::Refused { .. })) {
                    return; // dropping the channel: the peer sees the stream closed
                }
                let wire_id = request.id;
                match request.body {
                    GateRequest::Hello { certificate, revocations } => {
                        self.learn_revocations(revocations, Some(peer));
                        let verdict = self.trust.check(&peer, Some(&certificate), now());
                        let body = match &verdict {
                            Ok(_) => GateResponse::Welcome,
                            Err(r) => GateResponse::Refused { reason: r.to_string() },
                        };
                        let _ = self.swarm.behaviour_mut().gate.send_response(channel, Frame::new(wire_id, body));
                        match verdict {
                            Ok(cert) => {
                                if self.refused_us.remove(&peer) {
                                    // It refused our hello before; it has just joined, so greet it again.
                                    self.hello(peer);
                                }
                                let newly = !self.is_trusted(&peer);
                                self.peers.insert(peer, PeerGate::Trusted { not_after: cert.not_after });
                                if newly {
                                    tracing::info!(peer = %short(&peer), "trusted: {}", cert.name);
                                    self.emit(MeshEvent::Trusted { peer, name: cert.name });
                                    if let Some(addrs) = self.listen_addrs.get(&peer).cloned() {
                                        self.emit(MeshEvent::Identified { peer, addrs });
                                    }
                                    if self.welcomed_by.contains(&peer) {
                                        self.became_member(peer);
                                    }
                                }
                            }
                            // Outside any mesh we trust nobody, but block nobody either:
                            // the peer may be the owner this device is about to join.
                            Err(Refusal::NoMesh) => {}
                            Err(reason) => self.refuse(peer, reason),
                        }
                    }
                    GateRequest::Join { secret, name } => {
                        let id = InboundId(self.id());
                        self.in_join.insert(id, (wire_id, channel));
                        self.emit(MeshEvent::JoinRequest { peer, id, secret, name });
                    }
                }
            }
            Event::Message { peer, message: Message::Response { request_id, response }, .. } => {
                let Some((wire_id, _, pending)) = self.out_gate.remove(&request_id) else { return };
                let body = if response.id == wire_id { response.body } else { mismatched(wire_id, response.id) };
                match (pending, body) {
                    (OutGate::Hello, GateResponse::Refused { reason }) => {
                        tracing::info!(peer = %short(&peer), "refused us: {reason}");
                        self.refused_us.insert(peer);
                        self.emit(MeshEvent::RefusedBy { peer, reason });
                    }
                    (OutGate::Hello, GateResponse::Welcome) => {
                        // Both sides trust each other once we trust it too: only then
                        // do member-to-member messages flow.
                        if self.welcomed_by.insert(peer) && self.is_trusted(&peer) {
                            self.became_member(peer);
                        }
                    }
                    (OutGate::Hello, GateResponse::Joined { .. }) => {}
                    (OutGate::Join(reply), GateResponse::Joined { certificate, revocations }) => {
                        let _ = reply.send(Ok((certificate, revocations)));
                    }
                    (OutGate::Join(reply), GateResponse::Refused { reason }) => {
                        let _ = reply.send(Err(MeshError::Refused(reason)));
                    }
                    (OutGate::Join(reply), GateResponse::Welcome) => {
                        let _ = reply.send(Err(MeshError::Refused("the peer answered a join with a greeting".into())));
                    }
                }
            }
            Event::OutboundFailure { peer, request_id, error, .. } => {
                if let Some((_, _, OutGate::Join(reply))) = self.out_gate.remove(&request_id) {
                    let _ = reply.send(Err(MeshError::Unreachable { peer, why: error.to_string() }));
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(peer = %short(&peer), "gate request failed: {error}");
            }
            Event::ResponseSent { .. } => {}
        }
    }

    pub(super) fn control_event(&mut self, event: Event<Frame<ControlRequest>, Frame<ControlResponse>>) {
        match event {
            Event::Message { peer, message: Message::Request { request, channel, .. }, .. } => {
                if !self.is_trusted(&peer) {
                    // Refused, not punished: its hello may still be on the way on another
                    // stream. The grace deadline disconnects peers that never prove membership.
                    let refusal = Frame::new(request.id, ControlResponse::Refused { reason: NOT_TRUSTED.into() });
                    let _ = self.swarm.behaviour_mut().control.send_response(channel, refusal);
                    return;
                }
                let wire_id = request.id;
                match request.body {
                    // Answered here: round trips measure the mesh, not the node.
                    ControlRequest::Echo(bytes) => {
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .control
                            .send_response(channel, Frame::new(request.id, ControlResponse::Echo(bytes)));
                    }
                    ControlRequest::Revocations(list) => {
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .control
                            .send_response(channel, Frame::new(request.id, ControlResponse::Ack));
                        self.learn_revocations(list, Some(peer));
                    }
                    request @ ControlRequest::Node(_) => {
                        let id = InboundId(self.id());
                        self.in_control.insert(id, (wire_id, channel));
                        self.emit(MeshEvent::Control { peer, id, request });
                    }
                    ControlRequest::Introduce(members) => {
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .control
                            .send_response(channel, Frame::new(request.id, ControlResponse::Ack));
                        for m in members.into_iter().take(64) {
                            let Ok(other) = PeerId::from_bytes(&m.peer) else { continue };
                            let addrs: Vec<libp2p::Multiaddr> =
                                m.addrs.iter().take(16).filter_map(|a| a.parse().ok()).collect();
                            if other != self.me && !addrs.is_empty() && !self.blocked_until.contains_key(&other) {
                                self.emit(MeshEvent::Discovered { peer: other, addrs });
                            }
                        }
                    }
                }
            }
            Event::Message { message: Message::Response { request_id, response }, .. } => {
                if let Some((wire_id, reply)) = self.out_control.remove(&request_id) {
                    let result = if response.id == wire_id {
                        match response.body {
                            ControlResponse::Refused { reason } => Err(MeshError::Refused(reason)),
                            body => Ok(body),
                        }
                    } else {
                        Err(MeshError::Protocol(format!("response id {} for request {wire_id}", response.id)))
                    };
                    let _ = reply.send(result);
                }
            }
            Event::OutboundFailure { peer, request_id, error, .. } => {
                if let Some((_, reply)) = self.out_control.remove(&request_id) {
                    let _ = reply.send(Err(MeshError::Unreachable { peer, why: error.to_string() }));
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                tracing::info!(peer = %short(&peer), "bad control request: {error}");
            }
            Event::ResponseSent { .. } => {}
        }
    }

    pub(super) fn tensor_event(&mut self, event: Event<Frame<Tensor>, Frame<TensorAck>>) {
        match event {
            Event::Message { peer, message: Message::Request { request, channel, .. }, .. } => {
                if !self.is_trusted(&peer) {
                    let refusal = Frame::new(request.id, TensorAck::Refused { reason: NOT_TRUSTED.into() });
                    let _ = self.swarm.behaviour_mut().tensor.send_response(channel, refusal);
                    return;
                }
                let id = InboundId(self.id());
                self.in_tensor.insert(id, (request.id, channel));
                self.emit(MeshEvent::Tensor { peer, id, tensor: request.body });
            }
            Event::Message { message: Message::Response { request_id, response }, .. } => {
                if let Some((wire_id, reply)) = self.out_tensor.remove(&request_id) {
                    let result = match response.body {
                        _ if response.id != wire_id => {
                            Err(MeshError::Protocol(format!("ack id {} for tensor {wire_id}", response.id)))
                        }
                        ack => super::acked(ack),
                    };
                    let _ = reply.send(result);
                }
            }
            Event::OutboundFailure { peer, request_id, error, .. } => {
                if let Some((_, reply)) = self.out_tensor.remove(&request_id) {
                    let _ = reply.send(Err(MeshError::Unreachable { peer, why: error.to_string() }));
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                tracing::info!(peer = %short(&peer), "bad tensor transfer: {error}");
            }
            Event::ResponseSent { .. } => {}
        }
    }
}

fn mismatched(expected: u64, got: u64) -> GateResponse {
    GateResponse::Refused { reason: format!("protocol error: response id {got} for request {expected}") }
}
