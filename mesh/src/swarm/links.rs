//! Small tensors between members on one long-lived stream per peer and
//! direction (libp2p-stream), rather than a request-response substream per
//! tensor (large ones still get one: [`crate::wire::STREAM_TENSOR_MAX`]).
//! The sending task writes a tensor straight into the connection, and on the
//! receiving side a task of the stream's own reads it and hands it to the
//! node: neither end passes through the swarm's event loop, and no protocol
//! is negotiated per tensor. Each tensor is acknowledged on the same stream,
//! by its id, so a sender still learns that it arrived or why it was refused.
//!
//! The gate still decides who gets a stream: the event loop publishes who is
//! trusted and who is a member ([`Standing`]); a stream is opened only to a
//! member, and one opened by a peer that is not trusted is dropped unread.
//!
//! A Yamux stream whose connection is closed on purpose (a peer that stopped
//! answering pings) is never told, so the event loop also says when a
//! connection to a peer closes, and every stream to and from that peer ends
//! ([`Links::disconnected`]); the next tensor opens a new one.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::io::{ReadHalf, WriteHalf};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, Stream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{EventSink, MeshError, short};
use crate::event::{InboundId, MeshEvent};
use crate::wire::{self, Frame, TENSOR_STREAM_PROTOCOL, Tensor, TensorAck, WireError};

/// The first byte on a tensor stream, from the side that accepted it. The
/// opener proposes the protocol and may write at once, but its stream stays
/// in negotiation until the peer's confirmation is read, and while it is, a
/// read also flushes the write side: the task reading acknowledgements then
/// takes over the Yamux channel's one wake-up slot from a writer waiting for
/// room, and that writer is never woken. A write of more than about 160 KiB
/// (the channel's eleven 16 KiB frames) as a stream's first hung that way. So
/// the opener reads this byte before it writes or splits the stream.
const READY: [u8; 1] = [0x01];

/// A stream out to one peer, once opened; its async lock is held while one is opened.
type Slot = Arc<tokio::sync::Mutex<Option<Arc<Link>>>>;
/// Where a tensor's acknowledgement goes: its wire id, and the stream it came on.
type AckTo = (u64, mpsc::UnboundedSender<Frame<TensorAck>>);
/// Who waits for which acknowledgement.
type Waiting = HashMap<u64, oneshot::Sender<Result<(), MeshError>>>;

/// Who the gate lets through, as the event loop last saw it.
#[derive(Default)]
pub(crate) struct Standing(RwLock<(HashSet<PeerId>, HashSet<PeerId>)>);

impl Standing {
    /// We accepted its certificate: it may send us tensors.
    fn trusts(&self, peer: &PeerId) -> bool {
        self.0.read().expect("standing lock").0.contains(peer)
    }

    /// Trust both ways: we may send it tensors.
    fn member(&self, peer: &PeerId) -> bool {
        self.0.read().expect("standing lock").1.contains(peer)
    }

    /// Replaces both sets when either changed.
    pub(crate) fn publish(&self, trusted: HashSet<PeerId>, members: HashSet<PeerId>) {
        let now = (trusted, members);
        if *self.0.read().expect("standing lock") != now {
            *self.0.write().expect("standing lock") = now;
        }
    }
}

/// The node's tensor streams: one out to each member it sends to, one in from each that sends to it.
pub(crate) struct Links {
    control: libp2p_stream::Control,
    standing: Arc<Standing>,
    sink: EventSink,
    /// Per peer, the stream out (opened on first use, again after it breaks).
    out: Mutex<HashMap<PeerId, Slot>>,
    /// Tensors handed to the node, waiting for its acknowledgement: their
    /// wire id and the stream they came on.
    inbound: Mutex<HashMap<InboundId, AckTo>>,
    next_inbound: AtomicU64,
    /// Wire id of the next tensor out.
    next_out: AtomicU64,
    /// Per peer, cancelled when a connection to it closes: its streams end.
    peers: Mutex<HashMap<PeerId, CancellationToken>>,
    /// How long a sender waits for an acknowledgement.
    timeout: Duration,
}

/// A stream out: tensors go out on `writer`; their acknowledgements come
/// back to `pending` by id; `None` once the stream broke.
struct Link {
    writer: tokio::sync::Mutex<WriteHalf<Stream>>,
    pending: Mutex<Option<Waiting>>,
    /// Cancelled when a connection to the peer closes.
    connection: CancellationToken,
}

/// Why a send did not go through.
enum Failed {
    /// The stream broke before the tensor was written whole: it may go again on another.
    Broken,
    /// Refused, or lost after it was written, or not acknowledged in time: final.
    Final(MeshError),
}

impl Links {
    pub(crate) fn new(
        control: libp2p_stream::Control,
        standing: Arc<Standing>,
        sink: EventSink,
        timeout: Duration,
    ) -> Links {
        Links {
            control,
            standing,
            sink,
            out: Mutex::new(HashMap::new()),
            inbound: Mutex::new(HashMap::new()),
            next_inbound: AtomicU64::new(1),
            next_out: AtomicU64::new(1),
            peers: Mutex::new(HashMap::new()),
            timeout,
        }
    }

    /// Sends `tensors` to `peer` in one write and waits for all their acknowledgements.
    pub(crate) async fn send(&self, peer: PeerId, tensors: &[Tensor]) -> Result<(), MeshError> {
        // Encoded (and checked) once, before any stream is touched; ids are
        // unique across streams, so a stream opened again cannot mix them up.
        let ids: Vec<u64> = tensors.iter().map(|_| self.next_out.fetch_add(1, Ordering::Relaxed)).collect();
        let mut bytes = Vec::new();
        for (id, tensor) in ids.iter().zip(tensors) {
            bytes.extend(wire::tensor_bytes(*id, tensor).map_err(|e| MeshError::Protocol(e.to_string()))?);
        }
        // A stream found broken before or during the write is replaced once: a
        // connection that closed while another to the same peer stays up, say.
        for _ in 0..2 {
            if !self.standing.member(&peer) {
                return Err(MeshError::NotTrusted(peer));
            }
            let link = self.link(peer).await?;
            match link.send(peer, &ids, &bytes, self.timeout).await {
                Ok(()) => return Ok(()),
                Err(Failed::Final(e)) => return Err(e),
                Err(Failed::Broken) => continue,
            }
        }
        Err(MeshError::Unreachable { peer, why: "its tensor stream broke twice in a row".into() })
    }

    /// The open stream to `peer`, opening one if there is none.
    async fn link(&self, peer: PeerId) -> Result<Arc<Link>, MeshError> {
        let slot = self.out.lock().expect("links lock").entry(peer).or_default().clone();
        let mut slot = slot.lock().await;
        if let Some(link) = slot.as_ref().filter(|l| l.is_open()) {
            return Ok(link.clone());
        }
        let unreachable = |why: String| MeshError::Unreachable { peer, why };
        let mut stream = self
            .control
            .clone()
            .open_stream(peer, TENSOR_STREAM_PROTOCOL)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        // The protocol is only proposed so far: wait for the peer's word that
        // it took the stream (see [`READY`]) before the halves go their ways.
        let mut ready = [0u8; 1];
        let opened = async {
            stream.flush().await?;
            stream.read_exact(&mut ready).await
        };
        match tokio::time::timeout(self.timeout, opened).await {
            Ok(Ok(())) if ready == READY => {}
            Ok(Ok(())) => return Err(unreachable("its tensor stream opened with an unknown byte".into())),
            Ok(Err(e)) => return Err(unreachable(format!("its tensor stream closed as it opened: {e}"))),
            Err(_) => {
                return Err(unreachable(format!("it did not take a tensor stream in {} s", self.timeout.as_secs())));
            }
        }
        let (reader, writer) = stream.split();
        let connection = self.connection(peer);
        let link = Arc::new(Link {
            writer: tokio::sync::Mutex::new(writer),
            pending: Mutex::new(Some(HashMap::new())),
            connection,
        });
        tokio::spawn(read_acks(reader, link.clone(), peer));
        *slot = Some(link.clone());
        Ok(link)
    }

    /// Ends while a connection to `peer` stays up.
    fn connection(&self, peer: PeerId) -> CancellationToken {
        self.peers.lock().expect("links lock").entry(peer).or_default().clone()
    }

    /// A connection to `peer` closed: its streams, on that connection or
    /// another, end, and whoever waits for an acknowledgement on them hears so.
    pub(crate) fn disconnected(&self, peer: PeerId) {
        if let Some(connection) = self.peers.lock().expect("links lock").remove(&peer) {
            connection.cancel();
        }
    }

    /// The node's answer to tensor `id`.
    pub(crate) fn ack(&self, id: InboundId, ack: TensorAck) {
        if let Some((wire_id, stream)) = self.inbound.lock().expect("links lock").remove(&id) {
            let _ = stream.send(Frame::new(wire_id, ack));
        }
    }

    /// Serves the streams peers open to us, until the swarm stops.
    pub(crate) fn accept(self: &Arc<Self>, mut incoming: libp2p_stream::IncomingStreams) {
        let links = self.clone();
        tokio::spawn(async move {
            while let Some((peer, stream)) = incoming.next().await {
                if !links.standing.trusts(&peer) {
                    tracing::info!(peer = %short(&peer), "dropped a tensor stream from a peer that is not trusted");
                    continue;
                }
                tokio::spawn(links.clone().serve(peer, stream));
            }
        });
    }

    /// Reads `peer`'s tensors off `stream` and hands each to the node; its
    /// acknowledgements go back on the same stream.
    async fn serve(self: Arc<Self>, peer: PeerId, mut stream: Stream) {
        let connection = self.connection(peer);
        if stream.write_all(&READY).await.is_err() || stream.flush().await.is_err() {
            return;
        }
        let (mut reader, mut writer) = stream.split();
        let (acks, mut to_write) = mpsc::unbounded_channel::<Frame<TensorAck>>();
        tokio::spawn(async move {
            while let Some(ack) = to_write.recv().await {
                let written = async {
                    wire::write_frame(&mut writer, &ack, wire::GATE_LIMIT).await?;
                    writer.flush().await.map_err(WireError::from)
                };
                if written.await.is_err() {
                    break;
                }
            }
        });
        loop {
            let read = tokio::select! {
                read = wire::read_tensor(&mut reader) => read,
                _ = connection.cancelled() => break,
            };
            let frame = match read {
                Ok(frame) => frame,
                Err(WireError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => {
                    tracing::info!(peer = %short(&peer), "bad tensor transfer: {e}");
                    break;
                }
            };
            // Revoked or expired since the stream opened.
            if !self.standing.trusts(&peer) {
                break;
            }
            let id = InboundId::stream(self.next_inbound.fetch_add(1, Ordering::Relaxed));
            self.inbound.lock().expect("links lock").insert(id, (frame.id, acks.clone()));
            (self.sink)(MeshEvent::Tensor { peer, id, tensor: frame.body });
        }
    }
}

impl Link {
    fn is_open(&self) -> bool {
        !self.connection.is_cancelled() && self.pending.lock().expect("link lock").is_some()
    }

    /// Writes tensors `ids` (already framed, one after another, as `bytes`)
    /// and waits for their acknowledgements.
    async fn send(&self, peer: PeerId, ids: &[u64], bytes: &[u8], timeout: Duration) -> Result<(), Failed> {
        let mut answers = Vec::new();
        {
            let mut pending = self.pending.lock().expect("link lock");
            let Some(pending) = pending.as_mut() else { return Err(Failed::Broken) };
            for id in ids {
                let (tx, rx) = oneshot::channel();
                pending.insert(*id, tx);
                answers.push(rx);
            }
        }
        let write = async {
            let mut writer = self.writer.lock().await;
            writer.write_all(bytes).await?;
            writer.flush().await
        };
        let written = tokio::select! {
            written = write => written,
            _ = self.connection.cancelled() => Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "the connection closed")),
        };
        if let Err(e) = written {
            // The peer reads a tensor whole or not at all, so one cut short can go again on another stream.
            tracing::debug!(peer = %short(&peer), "tensor stream broke while writing: {e}");
            self.close();
            return Err(Failed::Broken);
        }
        let closed = || MeshError::Unreachable {
            peer,
            why: "its tensor stream closed before the tensor was acknowledged".into(),
        };
        match tokio::time::timeout(timeout, futures::future::join_all(answers)).await {
            Ok(answers) => {
                answers.into_iter().try_for_each(|a| a.unwrap_or_else(|_| Err(closed()))).map_err(Failed::Final)
            }
            Err(_) => {
                if let Some(pending) = self.pending.lock().expect("link lock").as_mut() {
                    for id in ids {
                        pending.remove(id);
                    }
                }
                Err(Failed::Final(MeshError::Unreachable {
                    peer,
                    why: format!("no acknowledgement in {} s", timeout.as_secs()),
                }))
            }
        }
    }

    /// The stream broke: whoever still waits hears so (their senders are dropped).
    fn close(&self) {
        self.pending.lock().expect("link lock").take();
    }

    fn answer(&self, id: u64, result: Result<(), MeshError>) {
        let waiting = self.pending.lock().expect("link lock").as_mut().and_then(|p| p.remove(&id));
        if let Some(waiting) = waiting {
            let _ = waiting.send(result);
        }
    }
}

/// Reads the acknowledgements of a stream out until it breaks.
async fn read_acks(mut reader: ReadHalf<Stream>, link: Arc<Link>, peer: PeerId) {
    loop {
        let read = tokio::select! {
            read = wire::read_frame::<TensorAck, _>(&mut reader, wire::GATE_LIMIT) => read,
            _ = link.connection.cancelled() => break,
        };
        match read {
            Ok(frame) => link.answer(frame.id, super::acked(frame.body)),
            Err(e) => {
                tracing::debug!(peer = %short(&peer), "tensor stream closed: {e}");
                break;
            }
        }
    }
    link.close();
}
