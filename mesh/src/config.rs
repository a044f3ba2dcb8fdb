//! The mesh's knobs, with defaults for phones on one Wi-Fi.

use std::time::Duration;

use libp2p::Multiaddr;

#[derive(Clone, Debug)]
pub struct MeshConfig {
    /// Addresses to listen on; empty means every interface on a random TCP
    /// port (and QUIC port, when built with QUIC).
    pub listen: Vec<Multiaddr>,
    /// Find peers on the local network with mDNS.
    pub mdns: bool,
    /// How often mDNS asks the network who is there.
    pub mdns_query_interval: Duration,
    /// Connections stay open this long without traffic (libp2p's default of
    /// 10 s would drop quiet links between inferences).
    pub idle_timeout: Duration,
    /// A peer must prove membership within this time of connecting.
    pub gate_grace: Duration,
    /// A refused peer is blocked this long before it may connect again.
    pub refusal_block: Duration,
    /// How long a request may wait for its response.
    pub request_timeout: Duration,
    /// How often round-trip times are measured.
    pub ping_interval: Duration,
    /// A ping unanswered this long closes the connection: the peer counts as gone.
    pub ping_timeout: Duration,
    /// Sent to peers in identify.
    pub agent: String,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            listen: Vec::new(),
            mdns: true,
            mdns_query_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(24 * 3600),
            gate_grace: Duration::from_secs(5),
            refusal_block: Duration::from_secs(30),
            request_timeout: Duration::from_secs(120),
            ping_interval: Duration::from_secs(5),
            ping_timeout: Duration::from_secs(10),
            agent: concat!("llnode/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

impl MeshConfig {
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        if !self.listen.is_empty() {
            return self.listen.clone();
        }
        let mut addrs = vec!["/ip4/0.0.0.0/tcp/0".parse().expect("valid")];
        if cfg!(feature = "quic") {
            addrs.push("/ip4/0.0.0.0/udp/0/quic-v1".parse().expect("valid"));
        }
        addrs
    }
}
