//! The network side of llnode: each device's key, the mesh's certificates
//! and the gate that admits only certified devices, the versioned CBOR wire
//! protocol, and the libp2p swarm (TCP or QUIC, Noise, Yamux, mDNS, identify,
//! ping) driven by one event-loop task that the node talks to through
//! [`MeshClient`]. Nothing here knows about models or tract.

pub mod cert;
pub mod config;
pub mod event;
pub mod file;
pub mod identity;
pub mod swarm;
pub mod token;
pub mod trust;
pub mod wire;

pub use config::MeshConfig;
pub use event::MeshEvent;
pub use identity::DeviceKey;
pub use swarm::{MeshClient, MeshError, spawn};
pub use trust::Trust;

pub use libp2p::{Multiaddr, PeerId, multiaddr};
