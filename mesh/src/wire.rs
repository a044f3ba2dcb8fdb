//! The wire protocol: every message is a length-prefixed CBOR frame
//! (`u32` big-endian length, then `{version, id, body}`), the length is
//! checked against a per-protocol limit before anything is allocated, and a
//! response echoes its request's id. Tensors travel as a CBOR header followed
//! by their raw little-endian bytes, never as arrays of numbers.
//!
//! Four libp2p protocols use it:
//! - `/llnode/gate/1`: certificates and joins, the only one open to peers not yet trusted;
//! - `/llnode/control/1`: control requests between trusted members;
//! - `/llnode/tensor-stream/2`: small tensors between trusted members, on one
//!   long-lived stream per peer and direction: tensors one way, each
//!   acknowledged by id the other;
//! - `/llnode/tensor/1`: larger tensors between trusted members, a substream each.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::cert::{SignedCertificate, SignedRevocation};

/// Bumped when a message changes incompatibly; peers on another version are refused.
pub const WIRE_VERSION: u16 = 3;

pub const GATE_PROTOCOL: StreamProtocol = StreamProtocol::new("/llnode/gate/1");
pub const CONTROL_PROTOCOL: StreamProtocol = StreamProtocol::new("/llnode/control/1");
pub const TENSOR_PROTOCOL: StreamProtocol = StreamProtocol::new("/llnode/tensor/1");
pub const TENSOR_STREAM_PROTOCOL: StreamProtocol = StreamProtocol::new("/llnode/tensor-stream/2");
/// A step's tensors for one device, up to this size in all (a decode step's
/// activations, a last position's logits of 32 000 floats), go in one write on
/// that device's tensor stream; larger ones each on a substream of their own.
/// A stream is written from the sending task, and Yamux hands such writes to
/// the connection 16 KiB and one wake-up at a time: a third of the throughput
/// a substream gets, where the connection's own task writes.
pub const STREAM_TENSOR_MAX: usize = 128 << 10;

/// Largest gate frame: a certificate and the mesh's revocations.
pub const GATE_LIMIT: usize = 1 << 20;
/// Largest control frame.
pub const CONTROL_LIMIT: usize = 8 << 20;
/// Largest tensor header frame.
pub const TENSOR_HEADER_LIMIT: usize = 64 << 10;
/// Largest tensor payload (a long prefill's activations fit with room to spare).
pub const TENSOR_LIMIT: u64 = 1 << 30;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Frame<T> {
    pub version: u16,
    pub id: u64,
    pub body: T,
}

impl<T> Frame<T> {
    pub fn new(id: u64, body: T) -> Frame<T> {
        Frame { version: WIRE_VERSION, id, body }
    }
}

/// Asked by a peer that is not trusted yet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum GateRequest {
    /// "Here is my certificate, and the revocations I know."
    Hello { certificate: SignedCertificate, revocations: Vec<SignedRevocation> },
    /// "Admit me": a join token's secret and the name the device asks for.
    Join { secret: [u8; 16], name: String },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum GateResponse {
    Welcome,
    Joined { certificate: SignedCertificate, revocations: Vec<SignedRevocation> },
    Refused { reason: String },
}

/// Control messages between trusted members.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ControlRequest {
    /// Answered with the same bytes (round-trip measurements).
    Echo(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Revocations to spread through the mesh.
    Revocations(Vec<SignedRevocation>),
    /// Other members and where they listen, so every member meets every other.
    Introduce(Vec<Member>),
    /// A message of the node's own protocol (planning, inference), CBOR-encoded
    /// by the node; the mesh only carries it.
    Node(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// A member as one device introduces it to another.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Member {
    #[serde(with = "serde_bytes")]
    pub peer: Vec<u8>,
    pub addrs: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ControlResponse {
    Echo(#[serde(with = "serde_bytes")] Vec<u8>),
    Ack,
    /// The node's answer to a [`ControlRequest::Node`].
    Node(#[serde(with = "serde_bytes")] Vec<u8>),
    Refused {
        reason: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DType {
    F32,
    F16,
    I64,
    I32,
    U8,
    Bool,
}

impl DType {
    pub fn size(self) -> u64 {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 => 2,
            DType::I64 => 8,
            DType::U8 | DType::Bool => 1,
        }
    }
}

/// A tensor on the wire: what it is, then its bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorHeader {
    /// Which inference it belongs to.
    pub session: u64,
    /// Which step of that inference (1 is the prefill).
    pub step: u64,
    /// New tokens in that step.
    pub tokens: u32,
    /// The plan epoch the sender routes by; a receiver on another plan holds
    /// or refuses the tensor rather than run it through the wrong segments.
    pub epoch: u64,
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// How many of each step's logits the initiator reads: the last stage
    /// returns only the highest this many; 0, the default, returns them all.
    #[serde(default)]
    pub top_logits: u32,
    /// The initiator reads no logits of this step (one replayed onto a new
    /// plan): the last stage skips the LM head and returns none.
    #[serde(default)]
    pub no_logits: bool,
    /// The stages' compute this step has taken so far on the way to this
    /// tensor, in µs: each stage adds its own, so the initiator can tell a
    /// step's compute from its hand-offs.
    #[serde(default)]
    pub compute_us: u64,
}

impl TensorHeader {
    /// Payload bytes the header announces, or `None` if it overflows.
    pub fn byte_len(&self) -> Option<u64> {
        self.shape.iter().try_fold(self.dtype.size(), |acc, &d| acc.checked_mul(d))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub header: TensorHeader,
    pub data: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TensorAck {
    Received,
    /// Not taken: the reason says why (a plan that moved on, a tensor that
    /// does not belong, a sender that is not trusted).
    Refused {
        reason: String,
    },
    /// Not taken for want of room just now (sessions, queues): the sender may retry later.
    Busy {
        reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {len} bytes is over the {limit}-byte limit")]
    TooLong { len: u64, limit: u64 },
    #[error(
        "peer speaks wire version {0}, this node speaks {WIRE_VERSION}; run the same llnode version on every device"
    )]
    Version(u16),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("tensor header does not match its payload: {0}")]
    Tensor(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<WireError> for io::Error {
    fn from(e: WireError) -> io::Error {
        match e {
            WireError::Io(e) => e,
            e => io::Error::new(io::ErrorKind::InvalidData, e),
        }
    }
}

#[derive(Deserialize)]
struct Head {
    version: u16,
}

/// Decodes one frame's CBOR bytes (after the length prefix), checking the version first.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<Frame<T>, WireError> {
    let head: Head = serde_cbor::from_slice(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
    if head.version != WIRE_VERSION {
        return Err(WireError::Version(head.version));
    }
    serde_cbor::from_slice(bytes).map_err(|e| WireError::Malformed(e.to_string()))
}

pub fn encode<T: Serialize>(frame: &Frame<T>) -> Vec<u8> {
    serde_cbor::to_vec(frame).expect("wire types encode")
}

pub async fn read_frame<T: DeserializeOwned, R: AsyncRead + Unpin>(
    io: &mut R,
    limit: usize,
) -> Result<Frame<T>, WireError> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as u64;
    if len > limit as u64 {
        return Err(WireError::TooLong { len, limit: limit as u64 });
    }
    let mut buf = vec![0u8; len as usize];
    io.read_exact(&mut buf).await?;
    decode(&buf)
}

pub async fn write_frame<T: Serialize, W: AsyncWrite + Unpin>(
    io: &mut W,
    frame: &Frame<T>,
    limit: usize,
) -> Result<(), WireError> {
    let bytes = encode(frame);
    if bytes.len() > limit {
        return Err(WireError::TooLong { len: bytes.len() as u64, limit: limit as u64 });
    }
    io.write_all(&framed(&bytes, &[])).await?;
    Ok(())
}

/// `bytes` behind their length, then `tail`, in one buffer: one write, so
/// one muxer frame rather than one per piece.
fn framed(bytes: &[u8], tail: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + bytes.len() + tail.len());
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
    out.extend_from_slice(tail);
    out
}

pub async fn read_tensor<R: AsyncRead + Unpin>(io: &mut R) -> Result<Frame<Tensor>, WireError> {
    let frame: Frame<TensorHeader> = read_frame(io, TENSOR_HEADER_LIMIT).await?;
    let len = frame.body.byte_len().ok_or_else(|| WireError::Tensor("shape overflows".into()))?;
    if len > TENSOR_LIMIT {
        return Err(WireError::TooLong { len, limit: TENSOR_LIMIT });
    }
    let mut data = vec![0u8; len as usize];
    io.read_exact(&mut data).await?;
    Ok(Frame { version: frame.version, id: frame.id, body: Tensor { header: frame.body, data } })
}

pub async fn write_tensor<W: AsyncWrite + Unpin>(io: &mut W, id: u64, tensor: &Tensor) -> Result<(), WireError> {
    io.write_all(&tensor_bytes(id, tensor)?).await?;
    Ok(())
}

/// Tensor `id` as it goes on the wire, in one buffer, once its header is
/// checked against its payload and both against the limits.
pub fn tensor_bytes(id: u64, tensor: &Tensor) -> Result<Vec<u8>, WireError> {
    let expected = tensor.header.byte_len().ok_or_else(|| WireError::Tensor("shape overflows".into()))?;
    if expected != tensor.data.len() as u64 {
        return Err(WireError::Tensor(format!("shape needs {expected} bytes, data has {}", tensor.data.len())));
    }
    if expected > TENSOR_LIMIT {
        return Err(WireError::TooLong { len: expected, limit: TENSOR_LIMIT });
    }
    let header = encode(&Frame::new(id, tensor.header.clone()));
    if header.len() > TENSOR_HEADER_LIMIT {
        return Err(WireError::TooLong { len: header.len() as u64, limit: TENSOR_HEADER_LIMIT as u64 });
    }
    Ok(framed(&header, &tensor.data))
}

/// The request-response codec of one CBOR protocol.
#[derive(Clone)]
pub struct CborCodec<Req, Resp> {
    limit: usize,
    _types: std::marker::PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> CborCodec<Req, Resp> {
    pub fn new(limit: usize) -> Self {
        CborCodec { limit, _types: std::marker::PhantomData }
    }
}

impl<Req, Resp> libp2p::request_response::Codec for CborCodec<Req, Resp>
where
    Req: Serialize + DeserializeOwned + Send + Sync + 'static,
    Resp: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Frame<Req>;
    type Response = Frame<Resp>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Frame<Req>> {
        Ok(read_frame(io, self.limit).await?)
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Frame<Resp>> {
        Ok(read_frame(io, self.limit).await?)
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Frame<Req>,
    ) -> io::Result<()> {
        write_frame(io, &req, self.limit).await?;
        io.close().await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        resp: Frame<Resp>,
    ) -> io::Result<()> {
        write_frame(io, &resp, self.limit).await?;
        io.close().await
    }
}

/// The bulk tensor protocol's codec: a tensor goes out on a substream of its
/// own, an acknowledgement comes back on it.
#[derive(Clone, Default)]
pub struct TensorCodec;

impl libp2p::request_response::Codec for TensorCodec {
    type Protocol = StreamProtocol;
    type Request = Frame<Tensor>;
    type Response = Frame<TensorAck>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Frame<Tensor>> {
        Ok(read_tensor(io).await?)
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Frame<TensorAck>> {
        Ok(read_frame(io, GATE_LIMIT).await?)
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Frame<Tensor>,
    ) -> io::Result<()> {
        write_tensor(io, req.id, &req.body).await?;
        io.close().await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        resp: Frame<TensorAck>,
    ) -> io::Result<()> {
        write_frame(io, &resp, GATE_LIMIT).await?;
        io.close().await
    }
}
