//! Arbitrary bytes into every wire decoder: errors are fine, panics,
//! hangs and allocations beyond the frame limits are not.
#![no_main]

use futures::executor::block_on;
use libfuzzer_sys::fuzz_target;
use llnode_mesh::wire::{self, ControlRequest, ControlResponse, GateRequest, GateResponse, TensorAck};

fuzz_target!(|data: &[u8]| {
    let _ = block_on(wire::read_frame::<GateRequest, _>(&mut &data[..], wire::GATE_LIMIT));
    let _ = block_on(wire::read_frame::<GateResponse, _>(&mut &data[..], wire::GATE_LIMIT));
    let _ = block_on(wire::read_frame::<ControlRequest, _>(&mut &data[..], wire::CONTROL_LIMIT));
    let _ = block_on(wire::read_frame::<ControlResponse, _>(&mut &data[..], wire::CONTROL_LIMIT));
    let _ = block_on(wire::read_frame::<TensorAck, _>(&mut &data[..], wire::GATE_LIMIT));
    let _ = block_on(wire::read_tensor(&mut &data[..]));
    let _ = llnode_mesh::token::JoinToken::decode(&String::from_utf8_lossy(data));
    let _ = llnode_mesh::cert::SignedCertificate::from_bytes(data).map(|c| c.open());
});
