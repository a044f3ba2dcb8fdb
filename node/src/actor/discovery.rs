//! DiscoveryActor: child of `llnode start`. Owns the peer table (what
//! `llnode peers` shows) and decides whom to dial: the `--peer` addresses,
//! peers mDNS finds, and trusted peers that dropped, each retried with
//! exponential backoff. It never decides trust; the gate does.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use llnode_mesh::{MeshClient, MeshEvent, Multiaddr, PeerId};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub struct DiscoveryActor;

pub struct DiscoveryArgs {
    pub client: MeshClient,
    /// `--peer` addresses, dialled until they answer and again when they drop.
    pub explicit: Vec<Multiaddr>,
}

/// One row of `llnode peers`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PeerRow {
    pub peer_id: String,
    pub name: Option<String>,
    /// `trusted`, `pending`, `refused` or `refused-us`.
    pub state: String,
    /// Why it is not trusted, in words.
    pub reason: Option<String>,
    pub connected: bool,
    pub addrs: Vec<String>,
    /// Seconds since it was last heard from.
    pub last_seen_secs: Option<f64>,
    pub rtt_ms: Option<f64>,
}

#[derive(Debug)]
enum PeerState {
    Pending,
    Trusted,
    Refused(String),
    RefusedUs(String),
}

struct Peer {
    name: Option<String>,
    state: PeerState,
    connected: bool,
    addrs: Vec<Multiaddr>,
    last_seen: Option<SystemTime>,
    rtt: Option<Duration>,
    /// Whether to keep this peer connected (it was trusted, or mDNS offers it).
    wanted: bool,
    backoff: Duration,
    next_dial: Instant,
}

struct Explicit {
    addr: Multiaddr,
    peer: Option<PeerId>,
    backoff: Duration,
    next_dial: Instant,
}

pub struct DiscoveryState {
    client: MeshClient,
    peers: HashMap<PeerId, Peer>,
    explicit: Vec<Explicit>,
}

pub enum DiscoveryMsg {
    Event(MeshEvent),
    /// Dial what is due.
    Tick,
    List(RpcReplyPort<Vec<PeerRow>>),
}

impl Actor for DiscoveryActor {
    type Msg = DiscoveryMsg;
    type State = DiscoveryState;
    type Arguments = DiscoveryArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<DiscoveryMsg>,
        args: DiscoveryArgs,
    ) -> Result<DiscoveryState, ActorProcessingErr> {
        myself.send_interval(Duration::from_millis(250), || DiscoveryMsg::Tick);
        let now = Instant::now();
        let explicit = args
            .explicit
            .into_iter()
            .map(|addr| Explicit { addr, peer: None, backoff: FIRST_BACKOFF, next_dial: now })
            .collect();
        Ok(DiscoveryState { client: args.client, peers: HashMap::new(), explicit })
    }

    async fn handle(
        &self,
        _: ActorRef<DiscoveryMsg>,
        msg: DiscoveryMsg,
        state: &mut DiscoveryState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DiscoveryMsg::Event(event) => state.event(event),
            DiscoveryMsg::Tick => state.tick(),
            DiscoveryMsg::List(reply) => {
                let _ = reply.send(state.rows());
            }
        }
        Ok(())
    }
}

impl DiscoveryState {
    fn peer(&mut self, peer: PeerId) -> &mut Peer {
        self.peers.entry(peer).or_insert_with(|| Peer {
            name: None,
            state: PeerState::Pending,
            connected: false,
            addrs: Vec::new(),
            last_seen: None,
            rtt: None,
            wanted: false,
            backoff: FIRST_BACKOFF,
            next_dial: Instant::now(),
        })
    }

    fn event(&mut self, event: MeshEvent) {
        let now = SystemTime::now();
        match event {
            MeshEvent::Connected { peer, addr, dialed } => {
                for e in &mut self.explicit {
                    if without_p2p(&e.addr) == without_p2p(&addr) {
                        e.peer = Some(peer);
                    }
                }
                let p = self.peer(peer);
                p.connected = true;
                p.last_seen = Some(now);
                if !matches!(p.state, PeerState::Trusted) {
                    p.state = PeerState::Pending;
                }
                if dialed {
                    add_addr(&mut p.addrs, addr);
                }
            }
            MeshEvent::Disconnected { peer } => {
                let p = self.peer(peer);
                p.connected = false;
                p.rtt = None;
                p.next_dial = Instant::now() + p.backoff;
            }
            MeshEvent::Trusted { peer, name } => {
                let p = self.peer(peer);
                p.name = Some(name);
                p.state = PeerState::Trusted;
                p.wanted = true;
                p.backoff = FIRST_BACKOFF;
            }
            MeshEvent::Refused { peer, reason } => {
                let p = self.peer(peer);
                p.state = PeerState::Refused(reason.to_string());
                p.wanted = false;
            }
            MeshEvent::RefusedBy { peer, reason } => {
                let p = self.peer(peer);
                // Our own refusal says more about the peer than its refusal of us.
                if !matches!(p.state, PeerState::Refused(_)) {
                    p.state = PeerState::RefusedUs(reason);
                }
                p.backoff = MAX_BACKOFF;
            }
            MeshEvent::Rtt { peer, rtt } => {
                let p = self.peer(peer);
                p.rtt = Some(rtt);
                p.last_seen = Some(now);
            }
            MeshEvent::Identified { peer, addrs } => {
                let p = self.peer(peer);
                for a in addrs {
                    add_addr(&mut p.addrs, a);
                }
            }
            MeshEvent::Discovered { peer, addrs } => {
                let p = self.peer(peer);
                for a in addrs {
                    add_addr(&mut p.addrs, a);
                }
                if !matches!(p.state, PeerState::Refused(_)) {
                    p.wanted = true;
                }
            }
            MeshEvent::DialFailed { peer: Some(peer), error } => {
                tracing::debug!(%peer, "dial failed: {error}");
            }
            _ => {}
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        for e in &mut self.explicit {
            let up = e.peer.and_then(|p| self.peers.get(&p)).is_some_and(|p| p.connected);
            if up {
                e.backoff = FIRST_BACKOFF;
            } else if e.next_dial <= now {
                let client = self.client.clone();
                let addr = e.addr.clone();
                tokio::spawn(async move {
                    if let Err(err) = client.dial(addr).await {
                        tracing::debug!("{err}");
                    }
                });
                e.next_dial = now + e.backoff;
                e.backoff = (e.backoff * 2).min(MAX_BACKOFF);
            }
        }
        for (id, p) in &mut self.peers {
            if p.wanted && !p.connected && !p.addrs.is_empty() && p.next_dial <= now {
                self.client.dial_peer(*id, p.addrs.clone());
                p.next_dial = now + p.backoff;
                p.backoff = (p.backoff * 2).min(MAX_BACKOFF);
            }
            if p.connected {
                p.backoff = FIRST_BACKOFF;
            }
        }
    }

    fn rows(&self) -> Vec<PeerRow> {
        let now = SystemTime::now();
        let mut rows: Vec<PeerRow> = self
            .peers
            .iter()
            .map(|(id, p)| {
                let (state, reason) = match &p.state {
                    PeerState::Pending => ("pending", None),
                    PeerState::Trusted => ("trusted", None),
                    PeerState::Refused(r) => ("refused", Some(r.clone())),
                    PeerState::RefusedUs(r) => ("refused-us", Some(r.clone())),
                };
                PeerRow {
                    peer_id: id.to_base58(),
                    name: p.name.clone(),
                    state: state.into(),
                    reason,
                    connected: p.connected,
                    addrs: p.addrs.iter().map(|a| a.to_string()).collect(),
                    last_seen_secs: p.last_seen.and_then(|t| now.duration_since(t).ok()).map(|d| d.as_secs_f64()),
                    rtt_ms: p.rtt.map(|d| d.as_secs_f64() * 1e3),
                }
            })
            .collect();
        rows.sort_by(|a, b| (a.name.is_none(), &a.name, &a.peer_id).cmp(&(b.name.is_none(), &b.name, &b.peer_id)));
        rows
    }
}

fn without_p2p(addr: &Multiaddr) -> Multiaddr {
    addr.iter().filter(|p| !matches!(p, llnode_mesh::multiaddr::Protocol::P2p(_))).collect()
}

fn add_addr(addrs: &mut Vec<Multiaddr>, addr: Multiaddr) {
    let addr = without_p2p(&addr);
    if !addrs.contains(&addr) {
        addrs.push(addr);
        if addrs.len() > 8 {
            addrs.remove(0);
        }
    }
}
