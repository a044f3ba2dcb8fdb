//! The network side of llnode: libp2p transports, discovery, device trust,
//! the CBOR wire protocol and tensor streams. It knows nothing about tract.
