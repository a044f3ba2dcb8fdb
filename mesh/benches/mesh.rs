//! `just bench-mesh`: two trusted nodes on loopback in one process (real
//! libp2p over real TCP sockets, Noise, Yamux). Prints the control-message
//! round trip and a 4 KiB tensor's (p50, p99), back to back and after the
//! nodes sat idle as a pipeline's stages do, and tensor throughput. Targets:
//! control p50 < 1 ms, ≥ 200 MB/s.

use std::time::{Duration, Instant};

use llnode_mesh::cert::{OwnerKey, now};
use llnode_mesh::wire::{ControlRequest, DType, Tensor, TensorAck, TensorHeader};
use llnode_mesh::{DeviceKey, MeshClient, MeshConfig, MeshEvent, PeerId, Trust};
use tokio_util::sync::CancellationToken;

fn member(owner: &OwnerKey, key: &DeviceKey) -> Trust {
    let mut trust = Trust::default();
    trust.install(owner.certify(&key.public(), "bench", 0, now() + 3600), &key.peer_id()).unwrap();
    trust
}

/// Starts a node that acknowledges every tensor; returns its client and a trusted-peer receiver.
fn node(
    key: &DeviceKey,
    trust: Trust,
    shutdown: &CancellationToken,
) -> (MeshClient, tokio::sync::mpsc::UnboundedReceiver<PeerId>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let config =
        MeshConfig { listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()], mdns: false, ..MeshConfig::default() };
    let (client, _task) = llnode_mesh::spawn(
        key,
        config,
        trust,
        Box::new(move |e| {
            let _ = tx.send(e);
        }),
        shutdown.clone(),
    )
    .unwrap();
    let (trusted_tx, trusted_rx) = tokio::sync::mpsc::unbounded_channel();
    let acker = client.clone();
    tokio::spawn(async move {
        while let Some(event) = rx.recv().await {
            match event {
                MeshEvent::Tensor { id, .. } => acker.ack_tensor(id, TensorAck::Received),
                MeshEvent::Member { peer } => {
                    let _ = trusted_tx.send(peer);
                }
                _ => {}
            }
        }
    });
    (client, trusted_rx)
}

/// 3000 timed calls of `call` after 200 untimed ones, sorted.
async fn round_trips<F: std::future::Future<Output = ()>>(call: impl Fn() -> F) -> Vec<Duration> {
    for _ in 0..200 {
        call().await;
    }
    let mut times = Vec::new();
    for _ in 0..3000 {
        let t = Instant::now();
        call().await;
        times.push(t.elapsed());
    }
    times.sort();
    times
}

/// How long the nodes sit idle before each of the last round trips (about
/// a stage's step of the bench model), and how many.
const IDLE: Duration = Duration::from_millis(20);
const IDLE_ROUNDS: usize = 250;

/// A residual-stream-like tensor of `elements` floats.
fn hidden(elements: u64) -> Tensor {
    Tensor {
        header: TensorHeader {
            session: 1,
            step: 2,
            tokens: 1,
            epoch: 1,
            name: "hidden".into(),
            dtype: DType::F32,
            shape: vec![1, 1, elements],
            top_logits: 0,
            no_logits: false,
            compute_us: 0,
        },
        data: vec![7u8; elements as usize * 4],
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let owner = OwnerKey::generate();
    let (ka, kb) = (DeviceKey::generate(), DeviceKey::generate());
    let shutdown = CancellationToken::new();
    let (a, mut a_trusted) = node(&ka, member(&owner, &ka), &shutdown);
    let (b, _) = node(&kb, member(&owner, &kb), &shutdown);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let addr = b.listeners().await.into_iter().next().expect("b listens");
    a.dial(addr).await.unwrap();
    let peer = tokio::time::timeout(Duration::from_secs(10), a_trusted.recv()).await.expect("trusted in time").unwrap();
    assert_eq!(peer, kb.peer_id());

    // Control round trips: a small request and its echo.
    let times = round_trips(|| async {
        a.request(peer, ControlRequest::Echo(vec![0; 64])).await.unwrap();
    })
    .await;
    let (p50, p99) = (percentile(&times, 0.5), percentile(&times, 0.99));
    println!(
        "control round trip (64 B, {} requests): p50 {:.3} ms, p99 {:.3} ms (target p50 < 1 ms: {:.1}x under)",
        times.len(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        1e-3 / p50.as_secs_f64()
    );
    // A decode step's hops: a residual-stream-sized tensor, and a last
    // position's logits (32000 floats), each sent and acknowledged.
    for (label, elements) in [("4 KiB", 1024), ("125 KiB", 32000)] {
        let times = round_trips(|| async {
            a.send_tensor(peer, hidden(elements)).await.unwrap();
        })
        .await;
        println!(
            "tensor round trip ({label} and its acknowledgement, {} tensors): p50 {:.3} ms, p99 {:.3} ms",
            times.len(),
            percentile(&times, 0.5).as_secs_f64() * 1e3,
            percentile(&times, 0.99).as_secs_f64() * 1e3
        );
    }
    // A stage's inputs come after it sat idle for the stages before it: its
    // threads are asleep and its cores may be halted, and waking them is
    // part of every hop. Back to back, nothing has time to sleep.
    let mut times = Vec::new();
    for _ in 0..IDLE_ROUNDS {
        tokio::time::sleep(IDLE).await;
        let t = Instant::now();
        a.send_tensor(peer, hidden(1024)).await.unwrap();
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "tensor round trip (4 KiB after {} ms idle, as a stage finds it, {} tensors): p50 {:.3} ms, p99 {:.3} ms",
        IDLE.as_millis(),
        times.len(),
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3
    );

    // Tensor throughput, one at a time and four in flight.
    for (label, size, count, in_flight) in [
        ("1 MiB, sequential", 1 << 20, 200, 1),
        ("16 MiB, sequential", 16 << 20, 32, 1),
        ("16 MiB, 4 in flight", 16 << 20, 64, 4),
    ] {
        let make = || hidden(size as u64 / 4);
        a.send_tensor(peer, make()).await.unwrap();
        let t = Instant::now();
        let mut pending = futures::stream::FuturesUnordered::new();
        let mut sent = 0;
        use futures::StreamExt;
        while sent < count || !pending.is_empty() {
            while sent < count && pending.len() < in_flight {
                let (a, t) = (a.clone(), make());
                pending.push(async move { a.send_tensor(peer, t).await });
                sent += 1;
            }
            pending.next().await.unwrap().unwrap();
        }
        let secs = t.elapsed().as_secs_f64();
        let mb_s = (size * count) as f64 / secs / 1e6;
        println!(
            "tensor stream ({label}): {mb_s:.0} MB/s over {count} tensors ({:.2}x the 200 MB/s target)",
            mb_s / 200.0
        );
    }
    shutdown.cancel();
}
