//! The node's handle on the mesh: a cloneable sender of commands to the
//! event loop, with replies on oneshot channels.

use std::sync::Arc;

use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

use crate::cert::{SignedCertificate, SignedRevocation};
use crate::event::InboundId;
use crate::wire::{ControlRequest, ControlResponse, Tensor, TensorAck};

#[derive(Debug, Clone, thiserror::Error)]
pub enum MeshError {
    #[error("cannot start the network: {0}")]
    Build(String),
    #[error("cannot listen on {addr}: {why}; pick another address or port with --listen")]
    Listen { addr: String, why: String },
    #[error("cannot dial {addr}: {why}")]
    Dial { addr: String, why: String },
    #[error("peer {0} is not a trusted member of this mesh")]
    NotTrusted(PeerId),
    #[error("peer {peer} did not answer: {why}")]
    Unreachable { peer: PeerId, why: String },
    #[error("refused: {0}")]
    Refused(String),
    /// The peer has no room for it just now ([`TensorAck::Busy`]); the reason says what to do.
    #[error("{0}")]
    Busy(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{0}")]
    Trust(String),
    #[error("the mesh task has stopped")]
    Stopped,
}

type Reply<T> = oneshot::Sender<Result<T, MeshError>>;

#[derive(Debug)]
pub enum Command {
    Dial {
        addr: Multiaddr,
        reply: Reply<()>,
    },
    /// Dial a known peer unless it is connected or blocked.
    DialPeer {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
    },
    Listeners {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    Join {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        secret: [u8; 16],
        name: String,
        reply: Reply<(SignedCertificate, Vec<SignedRevocation>)>,
    },
    AnswerJoin {
        id: InboundId,
        result: Result<SignedCertificate, String>,
    },
    Install {
        certificate: SignedCertificate,
        reply: Reply<()>,
    },
    Revoke {
        revocation: SignedRevocation,
    },
    Request {
        peer: PeerId,
        request: ControlRequest,
        reply: Reply<ControlResponse>,
    },
    Respond {
        id: InboundId,
        response: ControlResponse,
    },
    SendTensor {
        peer: PeerId,
        tensor: Tensor,
        reply: Reply<()>,
    },
    AckTensor {
        id: InboundId,
        ack: TensorAck,
    },
    Disconnect {
        peer: PeerId,
    },
}

#[derive(Clone)]
pub struct MeshClient {
    tx: mpsc::UnboundedSender<Command>,
    /// Tensors skip the event loop: they go on streams of their own.
    links: Arc<super::Links>,
}

impl std::fmt::Debug for MeshClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshClient").finish_non_exhaustive()
    }
}

impl MeshClient {
    pub(crate) fn new(tx: mpsc::UnboundedSender<Command>, links: Arc<super::Links>) -> MeshClient {
        MeshClient { tx, links }
    }

    fn send(&self, command: Command) {
        // A stopped loop drops the command, and with it any reply sender,
        // which the waiting side reads as `Stopped`.
        let _ = self.tx.send(command);
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, MeshError> {
        let (reply, rx) = oneshot::channel();
        self.send(make(reply));
        rx.await.unwrap_or(Err(MeshError::Stopped))
    }

    pub async fn dial(&self, addr: Multiaddr) -> Result<(), MeshError> {
        self.call(|reply| Command::Dial { addr, reply }).await
    }

    pub fn dial_peer(&self, peer: PeerId, addrs: Vec<Multiaddr>) {
        self.send(Command::DialPeer { peer, addrs })
    }

    pub async fn listeners(&self) -> Vec<Multiaddr> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Listeners { reply });
        rx.await.unwrap_or_default()
    }

    /// Asks `peer` (the mesh owner's device) to admit this device.
    pub async fn join(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        secret: [u8; 16],
        name: String,
    ) -> Result<(SignedCertificate, Vec<SignedRevocation>), MeshError> {
        self.call(|reply| Command::Join { peer, addrs, secret, name, reply }).await
    }

    pub fn answer_join(&self, id: InboundId, result: Result<SignedCertificate, String>) {
        self.send(Command::AnswerJoin { id, result })
    }

    /// Makes `certificate` this device's own and presents it to every connected peer.
    pub async fn install(&self, certificate: SignedCertificate) -> Result<(), MeshError> {
        self.call(|reply| Command::Install { certificate, reply }).await
    }

    /// Applies a revocation here and spreads it to every trusted peer.
    pub fn revoke(&self, revocation: SignedRevocation) {
        self.send(Command::Revoke { revocation })
    }

    pub async fn request(&self, peer: PeerId, request: ControlRequest) -> Result<ControlResponse, MeshError> {
        self.call(|reply| Command::Request { peer, request, reply }).await
    }

    pub fn respond(&self, id: InboundId, response: ControlResponse) {
        self.send(Command::Respond { id, response })
    }

    /// Sends `tensor` to member `peer` and waits until it is acknowledged.
    pub async fn send_tensor(&self, peer: PeerId, tensor: Tensor) -> Result<(), MeshError> {
        self.send_tensors(peer, vec![tensor]).await
    }

    /// Sends `tensors` to member `peer` and waits until all are acknowledged:
    /// in one write on the peer's tensor stream, or, together over
    /// [`crate::wire::STREAM_TENSOR_MAX`], each on a substream of its own.
    pub async fn send_tensors(&self, peer: PeerId, tensors: Vec<Tensor>) -> Result<(), MeshError> {
        if tensors.iter().map(|t| t.data.len()).sum::<usize>() <= crate::wire::STREAM_TENSOR_MAX {
            return self.links.send(peer, &tensors).await;
        }
        let sends = tensors.into_iter().map(|tensor| self.call(|reply| Command::SendTensor { peer, tensor, reply }));
        futures::future::join_all(sends).await.into_iter().collect()
    }

    pub fn ack_tensor(&self, id: InboundId, ack: TensorAck) {
        if id.on_stream() { self.links.ack(id, ack) } else { self.send(Command::AckTensor { id, ack }) }
    }

    pub fn disconnect(&self, peer: PeerId) {
        self.send(Command::Disconnect { peer })
    }
}
