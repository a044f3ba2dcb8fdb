//! The libp2p swarm and the one task that owns it (after rust-libp2p's
//! file-sharing example): the node sends [`Command`]s through a cloneable
//! [`MeshClient`], replies come back on oneshot channels, pending requests
//! wait in maps keyed by request id, and swarm events go to the node's sink.
//!
//! The gate lives here, next to the swarm, so no other protocol can slip in
//! between a connection and its check: every new connection starts
//! `Pending`; each side sends `Hello` with its certificate; only a verified
//! peer becomes `Trusted`. Control and tensor requests from anyone else are
//! refused, and refused peers are disconnected and blocked for a while.
//! Identify and mDNS only ever suggest addresses; they never change trust.

mod client;
mod gate;
mod links;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::upgrade::Version;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, allow_block_list, identify, mdns, noise, ping, tcp, yamux};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use client::{Command, MeshClient, MeshError};
use links::{Links, Standing};

use crate::cert::{SignedCertificate, SignedRevocation};
use crate::config::MeshConfig;
use crate::event::{InboundId, MeshEvent};
use crate::identity::DeviceKey;
use crate::trust::Trust;
use crate::wire::{
    self, CONTROL_PROTOCOL, CborCodec, ControlRequest, ControlResponse, Frame, GATE_PROTOCOL, GateRequest,
    GateResponse, TENSOR_PROTOCOL, TENSOR_STREAM_PROTOCOL, TensorAck, TensorCodec,
};

/// Where mesh events go: the node routes them to its actors. Shared: the
/// event loop and each tensor stream's reader deliver through it.
pub type EventSink = Arc<dyn Fn(MeshEvent) + Send + Sync>;

#[derive(NetworkBehaviour)]
struct Behaviour {
    block: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    gate: request_response::Behaviour<CborCodec<GateRequest, GateResponse>>,
    control: request_response::Behaviour<CborCodec<ControlRequest, ControlResponse>>,
    tensor: request_response::Behaviour<TensorCodec>,
    streams: libp2p_stream::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

/// Builds the swarm, starts listening and spawns the event loop on the
/// current tokio runtime. The loop stops when `shutdown` is cancelled.
pub fn spawn(
    key: &DeviceKey,
    config: MeshConfig,
    trust: Trust,
    sink: impl Fn(MeshEvent) + Send + Sync + 'static,
    shutdown: CancellationToken,
) -> Result<(MeshClient, tokio::task::JoinHandle<()>), MeshError> {
    let sink: EventSink = Arc::new(sink);
    let mut swarm = build_swarm(key, &config)?;
    for addr in config.listen_addrs() {
        swarm.listen_on(addr.clone()).map_err(|e| MeshError::Listen { addr: addr.to_string(), why: e.to_string() })?;
    }
    let standing = Arc::new(Standing::default());
    let mut streams = swarm.behaviour().streams.new_control();
    let incoming = streams.accept(TENSOR_STREAM_PROTOCOL).map_err(|e| MeshError::Build(e.to_string()))?;
    let links = Arc::new(Links::new(streams, standing.clone(), sink.clone(), config.request_timeout));
    links.accept(incoming);
    let (tx, rx) = mpsc::unbounded_channel();
    let event_loop = EventLoop {
        me: key.peer_id(),
        swarm,
        commands: rx,
        sink,
        trust,
        config,
        peers: HashMap::new(),
        blocked_until: HashMap::new(),
        next_id: 1,
        out_gate: HashMap::new(),
        out_control: HashMap::new(),
        out_tensor: HashMap::new(),
        in_join: HashMap::new(),
        in_control: HashMap::new(),
        in_tensor: HashMap::new(),
        standing,
        links: links.clone(),
        listeners: Vec::new(),
        listen_addrs: HashMap::new(),
        refused_us: HashSet::new(),
        welcomed_by: HashSet::new(),
    };
    let handle = tokio::spawn(event_loop.run(shutdown));
    Ok((MeshClient::new(tx, links), handle))
}

fn build_swarm(key: &DeviceKey, config: &MeshConfig) -> Result<Swarm<Behaviour>, MeshError> {
    let build = |e: &dyn std::fmt::Display| MeshError::Build(e.to_string());
    let builder = libp2p::SwarmBuilder::with_existing_identity(key.keypair())
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
        .map_err(|e| build(&e))?;
    #[cfg(feature = "quic")]
    let builder = builder.with_quic();
    let rr_config = request_response::Config::default().with_request_timeout(config.request_timeout);
    let swarm = builder
        .with_behaviour(|keypair| {
            let mdns = if config.mdns {
                let mdns_config = mdns::Config { query_interval: config.mdns_query_interval, ..Default::default() };
                Some(mdns::tokio::Behaviour::new(mdns_config, keypair.public().to_peer_id())?)
            } else {
                None
            };
            Ok(Behaviour {
                block: Default::default(),
                gate: request_response::Behaviour::with_codec(
                    CborCodec::new(wire::GATE_LIMIT),
                    [(GATE_PROTOCOL, ProtocolSupport::Full)],
                    rr_config.clone(),
                ),
                control: request_response::Behaviour::with_codec(
                    CborCodec::new(wire::CONTROL_LIMIT),
                    [(CONTROL_PROTOCOL, ProtocolSupport::Full)],
                    rr_config.clone(),
                ),
                tensor: request_response::Behaviour::with_codec(
                    TensorCodec,
                    [(TENSOR_PROTOCOL, ProtocolSupport::Full)],
                    rr_config.clone().with_max_concurrent_streams(256),
                ),
                streams: libp2p_stream::Behaviour::new(),
                identify: identify::Behaviour::new(
                    identify::Config::new("/llnode/1".into(), keypair.public())
                        .with_agent_version(config.agent.clone()),
                ),
                ping: ping::Behaviour::new(
                    ping::Config::new().with_interval(config.ping_interval).with_timeout(config.ping_timeout),
                ),
                mdns: mdns.into(),
            })
        })
        .map_err(|e| build(&e))?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(config.idle_timeout)
                // Lazy multistream-select: the first message rides with the protocol
                // proposal instead of waiting a round trip for the answer.
                .with_substream_upgrade_protocol_override(Version::V1Lazy)
        })
        .build();
    Ok(swarm)
}

/// The gate's view of a connected peer.
#[derive(Debug)]
enum PeerGate {
    /// Connected; has until `deadline` to present a valid certificate.
    Pending { deadline: Instant },
    /// Trusted until its certificate's `not_after` (Unix seconds).
    Trusted { not_after: u64 },
    /// Refused; the connection is closed at `close_at` (after the refusal is sent).
    Refused { close_at: Instant },
}

type Reply<T> = oneshot::Sender<Result<T, MeshError>>;

enum OutGate {
    Hello,
    Join(Reply<(SignedCertificate, Vec<SignedRevocation>)>),
}

struct EventLoop {
    me: PeerId,
    swarm: Swarm<Behaviour>,
    commands: mpsc::UnboundedReceiver<Command>,
    sink: EventSink,
    trust: Trust,
    config: MeshConfig,
    peers: HashMap<PeerId, PeerGate>,
    blocked_until: HashMap<PeerId, Instant>,
    next_id: u64,
    out_gate: HashMap<OutboundRequestId, (u64, PeerId, OutGate)>,
    out_control: HashMap<OutboundRequestId, (u64, Reply<ControlResponse>)>,
    out_tensor: HashMap<OutboundRequestId, (u64, Reply<()>)>,
    in_join: HashMap<InboundId, (u64, ResponseChannel<Frame<GateResponse>>)>,
    in_control: HashMap<InboundId, (u64, ResponseChannel<Frame<ControlResponse>>)>,
    in_tensor: HashMap<InboundId, (u64, ResponseChannel<Frame<TensorAck>>)>,
    listeners: Vec<Multiaddr>,
    /// Where each connected peer says it listens (identify); used only once it is trusted.
    listen_addrs: HashMap<PeerId, Vec<Multiaddr>>,
    /// Peers that refused our hello; greeted again once they prove membership.
    refused_us: HashSet<PeerId>,
    /// Peers that accepted our hello.
    welcomed_by: HashSet<PeerId>,
    /// Who is trusted and who is a member, for the tensor streams.
    standing: Arc<Standing>,
    links: Arc<Links>,
}

impl EventLoop {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                command = self.commands.recv() => match command {
                    Some(c) => self.command(c),
                    None => break,
                },
                event = self.swarm.select_next_some() => self.swarm_event(event),
                _ = tick.tick() => self.tick(),
            }
        }
        tracing::debug!("mesh event loop stopped");
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn emit(&mut self, event: MeshEvent) {
        // What the node hears, the tensor streams already know. Every change of
        // trust or membership is told (Trusted, Member, Refused, Disconnected),
        // so publishing here keeps them current.
        self.publish_standing();
        (self.sink)(event)
    }

    fn publish_standing(&self) {
        let trusted: HashSet<PeerId> = self.peers.keys().filter(|p| self.is_trusted(p)).copied().collect();
        let members = trusted.iter().filter(|p| self.welcomed_by.contains(p)).copied().collect();
        self.standing.publish(trusted, members);
    }

    /// We accepted its certificate.
    fn is_trusted(&self, peer: &PeerId) -> bool {
        matches!(self.peers.get(peer), Some(PeerGate::Trusted { .. }))
    }

    /// Trust both ways: we accepted its certificate and it accepted ours.
    fn is_member(&self, peer: &PeerId) -> bool {
        self.is_trusted(peer) && self.welcomed_by.contains(peer)
    }

    /// Deadlines: silent peers are refused, refused peers disconnected, blocks lifted.
    fn tick(&mut self) {
        let now = Instant::now();
        let unix_now = crate::cert::now();
        let mut silent = Vec::new();
        let mut close = Vec::new();
        let mut expired = Vec::new();
        for (peer, gate) in &self.peers {
            match gate {
                // Outside a mesh there is nothing to prove: peers just get no service.
                PeerGate::Pending { deadline } if *deadline <= now && self.trust.mesh().is_some() => silent.push(*peer),
                PeerGate::Trusted { not_after } if *not_after < unix_now => expired.push((*peer, *not_after)),
                PeerGate::Refused { close_at } if *close_at <= now => close.push(*peer),
                _ => {}
            }
        }
        for peer in silent {
            self.refuse(peer, crate::trust::Refusal::Silent);
        }
        for (peer, not_after) in expired {
            self.refuse(peer, crate::trust::Refusal::Expired(not_after));
        }
        for peer in close {
            self.swarm.behaviour_mut().block.block_peer(peer);
            self.peers.remove(&peer);
        }
        let expired: Vec<PeerId> = self.blocked_until.iter().filter(|(_, t)| **t <= now).map(|(p, _)| *p).collect();
        for peer in expired {
            self.blocked_until.remove(&peer);
            self.swarm.behaviour_mut().block.unblock_peer(peer);
        }
    }

    fn swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                self.listeners.push(address.clone());
                self.emit(MeshEvent::Listening { addr: address });
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => self.listeners.retain(|a| a != &address),
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, num_established, .. } => {
                if num_established.get() == 1 {
                    self.connected(peer_id);
                }
                self.emit(MeshEvent::Connected {
                    peer: peer_id,
                    addr: endpoint.get_remote_address().clone(),
                    dialed: endpoint.is_dialer(),
                });
            }
            // Its tensor streams may have been on this connection, and would never hear.
            SwarmEvent::ConnectionClosed { peer_id, num_established, .. } if num_established > 0 => {
                self.links.disconnected(peer_id)
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                self.peers.remove(&peer_id);
                self.listen_addrs.remove(&peer_id);
                self.refused_us.remove(&peer_id);
                self.welcomed_by.remove(&peer_id);
                // No longer a member before its streams end, so no sender opens another.
                self.publish_standing();
                self.links.disconnected(peer_id);
                self.emit(MeshEvent::Disconnected { peer: peer_id });
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                self.emit(MeshEvent::DialFailed { peer: peer_id, error: one_line(&error) });
            }
            SwarmEvent::Behaviour(event) => self.behaviour_event(event),
            _ => {}
        }
    }

    fn behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Gate(e) => self.gate_event(e),
            BehaviourEvent::Control(e) => self.control_event(e),
            BehaviourEvent::Tensor(e) => self.tensor_event(e),
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                // Addresses only: identify never changes trust, and a late identify
                // from a peer just refused is dropped rather than remembered.
                if matches!(self.peers.get(&peer_id), None | Some(PeerGate::Refused { .. })) {
                    return;
                }
                self.listen_addrs.insert(peer_id, info.listen_addrs.clone());
                if self.is_trusted(&peer_id) {
                    self.emit(MeshEvent::Identified { peer: peer_id, addrs: info.listen_addrs });
                }
                if self.is_member(&peer_id) {
                    self.introduce(peer_id);
                }
            }
            BehaviourEvent::Ping(ping::Event { peer, result: Ok(rtt), .. }) => self.emit(MeshEvent::Rtt { peer, rtt }),
            // A peer that stops answering pings (a cut network, a frozen phone) is
            // dropped, so the others notice it left within interval + timeout.
            BehaviourEvent::Ping(ping::Event { peer, connection, result: Err(e) }) => {
                tracing::info!(%peer, "ping failed ({e}); closing the connection");
                self.swarm.close_connection(connection);
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                for (peer, addr) in found {
                    if peer != self.me && !self.blocked_until.contains_key(&peer) {
                        by_peer.entry(peer).or_default().push(addr);
                    }
                }
                for (peer, addrs) in by_peer {
                    self.emit(MeshEvent::Discovered { peer, addrs });
                }
            }
            _ => {}
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Dial { addr, reply } => {
                let result = self
                    .swarm
                    .dial(addr.clone())
                    .map_err(|e| MeshError::Dial { addr: addr.to_string(), why: one_line(&e) });
                let _ = reply.send(result);
            }
            Command::DialPeer { peer, addrs } => {
                if peer != self.me && !self.blocked_until.contains_key(&peer) && !self.swarm.is_connected(&peer) {
                    let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer).addresses(addrs).build();
                    if let Err(e) = self.swarm.dial(opts) {
                        tracing::debug!(peer = %short(&peer), "dial failed: {}", one_line(&e));
                    }
                }
            }
            Command::Listeners { reply } => {
                let _ = reply.send(self.listeners.clone());
            }
            Command::Join { peer, addrs, secret, name, reply } => {
                let id = self.id();
                let request = Frame::new(id, GateRequest::Join { secret, name });
                let rid = self.swarm.behaviour_mut().gate.send_request_with_addresses(&peer, request, addrs);
                self.out_gate.insert(rid, (id, peer, OutGate::Join(reply)));
            }
            Command::AnswerJoin { id, result } => {
                if let Some((wire_id, channel)) = self.in_join.remove(&id) {
                    let body = match result {
                        Ok(certificate) => {
                            GateResponse::Joined { certificate, revocations: self.trust.revocations().to_vec() }
                        }
                        Err(reason) => GateResponse::Refused { reason },
                    };
                    let _ = self.swarm.behaviour_mut().gate.send_response(channel, Frame::new(wire_id, body));
                }
            }
            Command::Install { certificate, reply } => {
                let result = self.trust.install(certificate, &self.me).map_err(|e| MeshError::Trust(e.to_string()));
                if result.is_ok() {
                    // Say hello again to everyone connected, now with a certificate,
                    // and give them their full grace period to answer in kind.
                    let deadline = Instant::now() + self.config.gate_grace;
                    let connected: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
                    for peer in connected {
                        if let Some(PeerGate::Pending { deadline: d }) = self.peers.get_mut(&peer) {
                            *d = deadline;
                        }
                        self.hello(peer);
                    }
                }
                let _ = reply.send(result);
            }
            Command::Revoke { revocation } => self.learn_revocations(vec![revocation], None),
            Command::Request { peer, request, reply } => {
                if !self.is_member(&peer) {
                    let _ = reply.send(Err(MeshError::NotTrusted(peer)));
                    return;
                }
                let id = self.id();
                let rid = self.swarm.behaviour_mut().control.send_request(&peer, Frame::new(id, request));
                self.out_control.insert(rid, (id, reply));
            }
            Command::Respond { id, response } => {
                if let Some((wire_id, channel)) = self.in_control.remove(&id) {
                    let _ = self.swarm.behaviour_mut().control.send_response(channel, Frame::new(wire_id, response));
                }
            }
            Command::SendTensor { peer, tensor, reply } => {
                if !self.is_member(&peer) {
                    let _ = reply.send(Err(MeshError::NotTrusted(peer)));
                    return;
                }
                let id = self.id();
                let rid = self.swarm.behaviour_mut().tensor.send_request(&peer, Frame::new(id, tensor));
                self.out_tensor.insert(rid, (id, reply));
            }
            Command::AckTensor { id, ack } => {
                if let Some((wire_id, channel)) = self.in_tensor.remove(&id) {
                    let _ = self.swarm.behaviour_mut().tensor.send_response(channel, Frame::new(wire_id, ack));
                }
            }
            Command::Disconnect { peer } => {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
        }
    }
}

/// What a tensor's acknowledgement means for its sender.
fn acked(ack: TensorAck) -> Result<(), MeshError> {
    match ack {
        TensorAck::Received => Ok(()),
        TensorAck::Refused { reason } => Err(MeshError::Refused(reason)),
        TensorAck::Busy { reason } => Err(MeshError::Busy(reason)),
    }
}

pub(crate) fn short(peer: &PeerId) -> String {
    let s = peer.to_base58();
    s[s.len().saturating_sub(8)..].to_string()
}

fn one_line(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text.replace('\n', " ")
}
