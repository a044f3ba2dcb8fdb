//! Every wire message survives encode → frame → decode unchanged, and the
//! decoders turn arbitrary bytes into errors, never panics or huge allocations.

use futures::executor::block_on;
use llnode_mesh::cert::{OwnerKey, SignedCertificate, SignedRevocation};
use llnode_mesh::identity::DeviceKey;
use llnode_mesh::wire::{
    self, ControlRequest, ControlResponse, DType, Frame, GateRequest, GateResponse, Member, Tensor, TensorAck,
    TensorHeader, WireError,
};
use proptest::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;

fn certificate() -> impl Strategy<Value = SignedCertificate> {
    (any::<String>(), any::<u64>(), any::<u64>()).prop_map(|(name, a, b)| {
        OwnerKey::generate().certify(&DeviceKey::generate().public(), &name, a.min(b), a.max(b))
    })
}

fn revocation() -> impl Strategy<Value = SignedRevocation> {
    Just(()).prop_map(|()| OwnerKey::generate().revoke(&DeviceKey::generate().public()))
}

fn gate_request() -> impl Strategy<Value = GateRequest> {
    prop_oneof![
        (certificate(), prop::collection::vec(revocation(), 0..3))
            .prop_map(|(certificate, revocations)| GateRequest::Hello { certificate, revocations }),
        (any::<[u8; 16]>(), any::<String>()).prop_map(|(secret, name)| GateRequest::Join { secret, name }),
    ]
}

fn gate_response() -> impl Strategy<Value = GateResponse> {
    prop_oneof![
        Just(GateResponse::Welcome),
        (certificate(), prop::collection::vec(revocation(), 0..3))
            .prop_map(|(certificate, revocations)| GateResponse::Joined { certificate, revocations }),
        any::<String>().prop_map(|reason| GateResponse::Refused { reason }),
    ]
}

fn control_request() -> impl Strategy<Value = ControlRequest> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256).prop_map(ControlRequest::Echo),
        prop::collection::vec(revocation(), 0..3).prop_map(ControlRequest::Revocations),
        prop::collection::vec(
            (prop::collection::vec(any::<u8>(), 0..40), prop::collection::vec(any::<String>(), 0..3))
                .prop_map(|(peer, addrs)| Member { peer, addrs }),
            0..4
        )
        .prop_map(ControlRequest::Introduce),
        prop::collection::vec(any::<u8>(), 0..256).prop_map(ControlRequest::Node),
    ]
}

fn control_response() -> impl Strategy<Value = ControlResponse> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256).prop_map(ControlResponse::Echo),
        Just(ControlResponse::Ack),
        prop::collection::vec(any::<u8>(), 0..256).prop_map(ControlResponse::Node),
        any::<String>().prop_map(|reason| ControlResponse::Refused { reason }),
    ]
}

fn tensor() -> impl Strategy<Value = Tensor> {
    let dtype = prop_oneof![
        Just(DType::F32),
        Just(DType::F16),
        Just(DType::I64),
        Just(DType::I32),
        Just(DType::U8),
        Just(DType::Bool)
    ];
    (any::<u64>(), any::<String>(), dtype, prop::collection::vec(0u64..6, 0..4)).prop_flat_map(
        |(session, name, dtype, shape)| {
            let header = TensorHeader {
                session,
                step: 2,
                tokens: 1,
                epoch: 1,
                name,
                dtype,
                shape,
                top_logits: 0,
                no_logits: false,
                compute_us: 0,
            };
            let len = header.byte_len().unwrap() as usize;
            prop::collection::vec(any::<u8>(), len).prop_map(move |data| Tensor { header: header.clone(), data })
        },
    )
}

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(id: u64, body: T) {
    let frame = Frame::new(id, body);
    let mut bytes = Vec::new();
    block_on(wire::write_frame(&mut bytes, &frame, wire::CONTROL_LIMIT)).unwrap();
    let back: Frame<T> = block_on(wire::read_frame(&mut bytes.as_slice(), wire::CONTROL_LIMIT)).unwrap();
    assert_eq!(back, frame);
}

proptest! {
    #[test]
    fn gate_messages_round_trip(id: u64, req in gate_request(), resp in gate_response()) {
        round_trip(id, req);
        round_trip(id, resp);
    }

    #[test]
    fn control_messages_round_trip(id: u64, req in control_request(), resp in control_response()) {
        round_trip(id, req);
        round_trip(id, resp);
    }

    #[test]
    fn tensors_round_trip_as_raw_bytes(id: u64, t in tensor(), reason: String) {
        let mut bytes = Vec::new();
        block_on(wire::write_tensor(&mut bytes, id, &t)).unwrap();
        // Header, then exactly the payload: no per-number encoding.
        prop_assert!(bytes.ends_with(&t.data));
        let back = block_on(wire::read_tensor(&mut bytes.as_slice())).unwrap();
        prop_assert_eq!(back.id, id);
        prop_assert_eq!(back.body, t);
        round_trip(id, TensorAck::Refused { reason: reason.clone() });
        round_trip(id, TensorAck::Busy { reason });
        round_trip(id, TensorAck::Received);
    }

    #[test]
    fn arbitrary_bytes_are_errors_not_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = block_on(wire::read_frame::<GateRequest, _>(&mut bytes.as_slice(), wire::GATE_LIMIT));
        let _ = block_on(wire::read_frame::<ControlRequest, _>(&mut bytes.as_slice(), wire::CONTROL_LIMIT));
        let _ = block_on(wire::read_tensor(&mut bytes.as_slice()));
        let _ = wire::decode::<ControlResponse>(&bytes);
    }
}

#[test]
fn oversized_frames_are_refused_before_allocating() {
    // A header announcing 4 GiB: refused from the length alone.
    let bytes = [0xff, 0xff, 0xff, 0xff, 0, 0];
    let err = block_on(wire::read_frame::<ControlRequest, _>(&mut bytes.as_slice(), wire::CONTROL_LIMIT)).unwrap_err();
    assert!(matches!(err, WireError::TooLong { .. }), "{err}");

    // A tensor header announcing more payload than the limit.
    let header = TensorHeader {
        session: 1,
        step: 1,
        tokens: 1,
        epoch: 1,
        name: "x".into(),
        dtype: DType::F32,
        shape: vec![1 << 20, 1 << 20],
        top_logits: 0,
        no_logits: false,
        compute_us: 0,
    };
    let mut bytes = Vec::new();
    block_on(wire::write_frame(&mut bytes, &Frame::new(1, header), wire::TENSOR_HEADER_LIMIT)).unwrap();
    let err = block_on(wire::read_tensor(&mut bytes.as_slice())).unwrap_err();
    assert!(matches!(err, WireError::TooLong { .. }), "{err}");

    // A shape whose size overflows u64.
    let header = TensorHeader {
        session: 1,
        step: 1,
        tokens: 1,
        epoch: 1,
        name: "x".into(),
        dtype: DType::I64,
        shape: vec![u64::MAX, 3],
        top_logits: 0,
        no_logits: false,
        compute_us: 0,
    };
    let mut bytes = Vec::new();
    block_on(wire::write_frame(&mut bytes, &Frame::new(1, header), wire::TENSOR_HEADER_LIMIT)).unwrap();
    assert!(matches!(block_on(wire::read_tensor(&mut bytes.as_slice())), Err(WireError::Tensor(_))));
}

#[test]
fn other_wire_versions_are_named() {
    let frame = Frame { version: 9, id: 3, body: ControlRequest::Echo(vec![1]) };
    let bytes = serde_cbor::to_vec(&frame).unwrap();
    let err = wire::decode::<ControlRequest>(&bytes).unwrap_err();
    assert!(matches!(err, WireError::Version(9)), "{err}");
    assert!(err.to_string().contains("same llnode version"));
}
