//! Several meshes' event loops in one process, on real loopback sockets:
//! what members can say to each other, and what outsiders cannot.

use std::time::Duration;

use llnode_mesh::cert::{OwnerKey, now};
use llnode_mesh::wire::{ControlRequest, ControlResponse, DType, STREAM_TENSOR_MAX, Tensor, TensorAck, TensorHeader};
use llnode_mesh::{DeviceKey, MeshClient, MeshConfig, MeshError, MeshEvent, Trust};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

struct TestNode {
    key: DeviceKey,
    client: MeshClient,
    events: UnboundedReceiver<MeshEvent>,
}

fn member(owner: &OwnerKey, key: &DeviceKey) -> Trust {
    let mut trust = Trust::default();
    trust.install(owner.certify(&key.public(), "t", 0, now() + 3600), &key.peer_id()).unwrap();
    trust
}

fn start(trust: impl FnOnce(&DeviceKey) -> Trust, shutdown: &CancellationToken) -> TestNode {
    let key = DeviceKey::generate();
    let (tx, events) = tokio::sync::mpsc::unbounded_channel();
    let config = MeshConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        mdns: false,
        gate_grace: Duration::from_millis(500),
        ..MeshConfig::default()
    };
    let sink = Box::new(move |e| {
        let _ = tx.send(e);
    });
    let (client, _) = llnode_mesh::spawn(&key, config, trust(&key), sink, shutdown.clone()).unwrap();
    TestNode { key, client, events }
}

/// The next event `pick` accepts, within 10 s.
async fn next<T>(node: &mut TestNode, mut pick: impl FnMut(MeshEvent) -> Option<T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(t) = pick(node.events.recv().await.expect("mesh running")) {
                return t;
            }
        }
    })
    .await
    .expect("event in time")
}

/// Whether an event `pick` accepts comes within a second.
async fn within_a_second(node: &mut TestNode, pick: impl Fn(&MeshEvent) -> bool) -> bool {
    let seen = async {
        while let Some(event) = node.events.recv().await {
            if pick(&event) {
                return;
            }
        }
        std::future::pending::<()>().await
    };
    tokio::time::timeout(Duration::from_secs(1), seen).await.is_ok()
}

/// Where `node` listens, once it does.
async fn listen_addr(node: &TestNode) -> libp2p::Multiaddr {
    loop {
        if let Some(addr) = node.client.listeners().await.into_iter().next() {
            return addr;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn connect(from: &TestNode, to: &TestNode) {
    from.client.dial(listen_addr(to).await).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_exchange_messages_and_tensors_intact() {
    let shutdown = CancellationToken::new();
    let owner = OwnerKey::generate();
    let mut a = start(|k| member(&owner, k), &shutdown);
    let mut b = start(|k| member(&owner, k), &shutdown);
    connect(&a, &b).await;
    let b_id = b.key.peer_id();
    next(&mut a, |e| matches!(e, MeshEvent::Trusted { peer, .. } if peer == b_id).then_some(())).await;
    // Requests flow once trust is mutual.
    next(&mut a, |e| matches!(e, MeshEvent::Member { peer } if peer == b_id).then_some(())).await;
    let a_id = a.key.peer_id();
    next(&mut b, |e| matches!(e, MeshEvent::Member { peer } if peer == a_id).then_some(())).await;
    let echo = a.client.request(b_id, ControlRequest::Echo(b"ping".to_vec())).await.unwrap();
    assert_eq!(echo, ControlResponse::Echo(b"ping".to_vec()));

    // Tensors sent at once on a stream not yet open all arrive, though
    // together they are more than Yamux queues for a stream (11 frames of 16 KiB).
    let elements = STREAM_TENSOR_MAX as u64 / 4 - 256;
    let burst: Vec<_> = (0..4u64)
        .map(|i| {
            let sender = a.client.clone();
            let header = TensorHeader {
                session: 8,
                step: i + 1,
                tokens: 1,
                epoch: 1,
                name: "hidden".into(),
                dtype: DType::F32,
                shape: vec![elements],
                top_logits: 0,
                no_logits: false,
                compute_us: 0,
            };
            tokio::spawn(async move {
                sender.send_tensor(b_id, Tensor { header, data: vec![0; elements as usize * 4] }).await
            })
        })
        .collect();
    for _ in 0..4 {
        let id = next(&mut b, |e| match e {
            MeshEvent::Tensor { id, .. } => Some(id),
            _ => None,
        })
        .await;
        b.client.ack_tensor(id, TensorAck::Received);
    }
    for send in burst {
        send.await.unwrap().unwrap();
    }

    // Tensors arrive byte for byte, with their headers, and b acknowledges
    // them: a small one (on a's tensor stream to b), a large one (on a
    // substream of its own), then a small one again on the same stream.
    let tensor_of = |elements: usize| {
        let data: Vec<u8> = (0..elements * 4).map(|i| (i % 251) as u8).collect();
        let header = TensorHeader {
            session: 9,
            step: 1,
            tokens: 3,
            epoch: 1,
            name: "hidden".into(),
            dtype: DType::F32,
            shape: vec![3, elements as u64 / 3],
            top_logits: 0,
            no_logits: false,
            compute_us: 0,
        };
        Tensor { header, data }
    };
    let large = 3 * (llnode_mesh::wire::STREAM_TENSOR_MAX / 4);
    for tensor in [tensor_of(15), tensor_of(large), tensor_of(15 * 7)] {
        let sent = tensor.clone();
        let sender = a.client.clone();
        let send = tokio::spawn(async move { sender.send_tensor(b_id, sent).await });
        let (id, got) = next(&mut b, |e| match e {
            MeshEvent::Tensor { peer, id, tensor } if peer == a_id => Some((id, tensor)),
            _ => None,
        })
        .await;
        assert_eq!(got, tensor);
        b.client.ack_tensor(id, TensorAck::Received);
        send.await.unwrap().unwrap();
    }
    // A refusal, and a refusal for want of room, come back as errors of
    // their kinds, not a hang: on the stream and on a substream.
    for elements in [15, large] {
        for busy in [false, true] {
            let sender = a.client.clone();
            let tensor = tensor_of(elements);
            let refused = tokio::spawn(async move { sender.send_tensor(b_id, tensor).await });
            let id = next(&mut b, |e| match e {
                MeshEvent::Tensor { id, .. } => Some(id),
                _ => None,
            })
            .await;
            let reason = "no segment here".to_string();
            b.client.ack_tensor(id, if busy { TensorAck::Busy { reason } } else { TensorAck::Refused { reason } });
            match refused.await.unwrap() {
                Err(MeshError::Busy(r)) if busy => assert_eq!(r, "no segment here"),
                Err(MeshError::Refused(r)) if !busy => assert_eq!(r, "no segment here"),
                other => panic!("{elements} elements, busy {busy}: {other:?}"),
            }
        }
    }
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outsiders_get_nothing_and_are_dropped() {
    let shutdown = CancellationToken::new();
    let owner = OwnerKey::generate();
    let mut a = start(|k| member(&owner, k), &shutdown);
    // Another mesh's member, and a device in no mesh at all.
    let other = OwnerKey::generate();
    let mut stranger = start(|k| member(&other, k), &shutdown);
    let mut nobody = start(|_| Trust::default(), &shutdown);

    connect(&stranger, &a).await;
    let s_id = stranger.key.peer_id();
    let reason = next(&mut a, |e| match e {
        MeshEvent::Refused { peer, reason } if peer == s_id => Some(reason),
        _ => None,
    })
    .await;
    assert!(reason.to_string().contains("another mesh"), "{reason}");
    // The stranger cannot ask anything: locally it holds no trusted link.
    assert!(matches!(
        stranger.client.request(a.key.peer_id(), ControlRequest::Echo(vec![1])).await,
        Err(MeshError::NotTrusted(_))
    ));
    next(&mut stranger, |e| matches!(e, MeshEvent::Disconnected { .. }).then_some(())).await;

    // Silent past the grace period: refused and disconnected.
    connect(&nobody, &a).await;
    let n_id = nobody.key.peer_id();
    let reason = next(&mut a, |e| match e {
        MeshEvent::Refused { peer, reason } if peer == n_id => Some(reason),
        _ => None,
    })
    .await;
    assert!(reason.to_string().contains("in time"), "{reason}");
    next(&mut nobody, |e| matches!(e, MeshEvent::Disconnected { .. }).then_some(())).await;
    // Blocked for a while: dialling again does not get a connection.
    connect(&nobody, &a).await;
    assert!(
        !within_a_second(&mut nobody, |e| matches!(e, MeshEvent::Trusted { .. })).await,
        "a blocked peer was trusted"
    );
    shutdown.cancel();
}

/// A peer that never proved membership opens a tensor stream to a member
/// directly (libp2p-stream, no `MeshClient` to refuse it locally) and writes
/// a tensor: the member drops the stream unread and hands the node nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outsiders_tensor_stream_is_dropped_unread() {
    use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
    use libp2p::{noise, tcp, yamux};

    let shutdown = CancellationToken::new();
    let owner = OwnerKey::generate();
    let mut a = start(|k| member(&owner, k), &shutdown);
    let addr = listen_addr(&a).await;
    let mut outsider = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
        .unwrap()
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .unwrap()
        .build();
    let mut control = outsider.behaviour().new_control();
    outsider.dial(addr).unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !matches!(outsider.select_next_some().await, libp2p::swarm::SwarmEvent::ConnectionEstablished { .. }) {}
    })
    .await
    .expect("connected in time");
    tokio::spawn(async move {
        loop {
            outsider.select_next_some().await;
        }
    });
    let mut stream = control
        .open_stream(a.key.peer_id(), llnode_mesh::wire::TENSOR_STREAM_PROTOCOL)
        .await
        .expect("a speaks the protocol");
    let tensor = Tensor {
        header: TensorHeader {
            session: 1,
            step: 1,
            tokens: 1,
            epoch: 1,
            name: "hidden".into(),
            dtype: DType::F32,
            shape: vec![4],
            top_logits: 0,
            no_logits: false,
            compute_us: 0,
        },
        data: vec![0; 16],
    };
    // The write may or may not get through before the stream is reset; no answer ever comes.
    let _ = llnode_mesh::wire::write_tensor(&mut stream, 1, &tensor).await;
    let _ = stream.flush().await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the stream stayed open");
    assert!(answer.is_empty(), "an outsider got {} bytes back", answer.len());
    assert!(
        !within_a_second(&mut a, |e| matches!(e, MeshEvent::Tensor { .. })).await,
        "a handed an outsider's tensor to the node"
    );
    shutdown.cancel();
}
