//! The local control endpoint: a Unix socket in the data directory (mode
//! 0600, never on the network) through which `llnode peers`, `llnode mesh
//! invite|join|revoke` and later `prompt` and `plan` reach the running node.
//! Frames are the mesh's: length-prefixed CBOR with a version and an id.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use llnode_mesh::wire::{self, Frame};
use ractor::{ActorRef, call_t};
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::compat::TokioAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;

use crate::actor::CALL_TIMEOUT_MS;
use crate::actor::discovery::{DiscoveryMsg, PeerRow};
use crate::actor::planning::{PlanView, PlanningMsg};
use crate::actor::trust::TrustMsg;

pub const SOCKET: &str = "control.sock";
const LIMIT: usize = 1 << 20;

#[derive(Debug, Serialize, Deserialize)]
pub enum LocalRequest {
    Status,
    Peers,
    Invite {
        ttl_secs: u64,
    },
    /// `name`: default the node's `--name`.
    Join {
        token: String,
        name: Option<String>,
    },
    Revoke {
        device: String,
    },
    /// Generate across the mesh; answered with a stream of `PromptEvent`s, then `Done`.
    Prompt(crate::prompt::PromptRequest),
    /// The plan this node holds; with an objective, first ask the leader to plan for it.
    Plan {
        objective: Option<llnode_planner::config::Objective>,
    },
    /// `llnode throttle`: stretch this node's segment steps by a factor.
    Throttle {
        factor: f64,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum LocalResponse {
    Status {
        peer_id: String,
        mesh: Option<String>,
        addrs: Vec<String>,
    },
    Peers(Vec<PeerRow>),
    Invite(String),
    Joined {
        name: String,
    },
    Revoked {
        peer_id: String,
    },
    /// The throttle factor before the change.
    Throttled {
        was: f64,
    },
    Plan(Box<PlanView>),
    /// One piece of a prompt's answer (several frames per request).
    Prompt(crate::prompt::PromptEvent),
    Error(String),
}

/// What the endpoint needs to answer.
#[derive(Clone)]
pub struct Local {
    pub peer_id: String,
    /// The name this device asks for when it joins.
    pub name: String,
    pub mesh: Option<String>,
    pub client: llnode_mesh::MeshClient,
    pub discovery: ActorRef<DiscoveryMsg>,
    pub trust: ActorRef<TrustMsg>,
    pub planning: ActorRef<PlanningMsg>,
    pub initiator: std::sync::Arc<crate::prompt::Initiator>,
    pub throttle: std::sync::Arc<crate::pace::Throttle>,
}

/// Binds the socket, refusing if another node already serves this data directory.
pub async fn bind(data_dir: &Path) -> anyhow::Result<UnixListener> {
    let path = data_dir.join(SOCKET);
    if UnixStream::connect(&path).await.is_ok() {
        anyhow::bail!("a node is already running on {}; stop it first or use another --data-dir", data_dir.display());
    }
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("cannot create the control socket {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Connections served at once; more are answered "busy" and closed.
const MAX_CONNECTIONS: usize = 32;

pub async fn serve(listener: UnixListener, local: Local, shutdown: CancellationToken) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let local = local.clone();
                    let slot = slots.clone().try_acquire_owned();
                    tokio::spawn(async move {
                        let result = match slot {
                            Ok(_slot) => connection(stream, local).await,
                            Err(_) => busy(stream).await,
                        };
                        if let Err(e) = result {
                            tracing::debug!("control connection: {e}");
                        }
                    });
                }
                Err(e) => tracing::warn!("control socket: {e}"),
            },
        }
    }
}

async fn busy(stream: UnixStream) -> anyhow::Result<()> {
    let answer = Frame::new(
        0,
        LocalResponse::Error(format!("the node is serving {MAX_CONNECTIONS} local clients already; retry")),
    );
    Ok(wire::write_frame(&mut stream.compat(), &answer, LIMIT).await?)
}

async fn connection(stream: UnixStream, local: Local) -> anyhow::Result<()> {
    let mut io = stream.compat();
    loop {
        let request: Frame<LocalRequest> = match wire::read_frame(&mut io, LIMIT).await {
            Ok(r) => r,
            Err(wire::WireError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(());
            }
            Err(e) => {
                let answer = Frame::new(0, LocalResponse::Error(format!("bad request: {e}")));
                wire::write_frame(&mut io, &answer, LIMIT).await?;
                return Ok(());
            }
        };
        if let LocalRequest::Prompt(prompt) = request.body {
            // Streamed: one frame per piece of text, then the summary or an error.
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let initiator = local.initiator.clone();
            let run = tokio::spawn(async move { crate::prompt::run(&initiator, prompt, tx).await });
            while let Some(event) = rx.recv().await {
                wire::write_frame(&mut io, &Frame::new(request.id, LocalResponse::Prompt(event)), LIMIT).await?;
            }
            if let Err(e) = run.await.unwrap_or_else(|e| Err(e.to_string())) {
                wire::write_frame(&mut io, &Frame::new(request.id, LocalResponse::Error(e)), LIMIT).await?;
            }
            continue;
        }
        let response = answer(&local, request.body).await.unwrap_or_else(|e| LocalResponse::Error(format!("{e:#}")));
        wire::write_frame(&mut io, &Frame::new(request.id, response), LIMIT).await?;
    }
}

async fn answer(local: &Local, request: LocalRequest) -> anyhow::Result<LocalResponse> {
    Ok(match request {
        LocalRequest::Status => LocalResponse::Status {
            peer_id: local.peer_id.clone(),
            mesh: local.mesh.clone(),
            addrs: local.client.listeners().await.iter().map(|a| a.to_string()).collect(),
        },
        LocalRequest::Peers => LocalResponse::Peers(call_t!(local.discovery, DiscoveryMsg::List, CALL_TIMEOUT_MS)?),
        LocalRequest::Invite { ttl_secs } => {
            let addrs = local.client.listeners().await;
            let ttl = Duration::from_secs(ttl_secs);
            match call_t!(local.trust, |reply| TrustMsg::Invite { ttl, addrs, reply }, CALL_TIMEOUT_MS)? {
                Ok(token) => LocalResponse::Invite(token),
                Err(e) => LocalResponse::Error(e),
            }
        }
        LocalRequest::Join { token, name } => {
            let token = llnode_mesh::token::JoinToken::decode(&token)?;
            let name = name.unwrap_or_else(|| local.name.clone());
            match call_t!(local.trust, |reply| TrustMsg::Join { token, name, reply }, CALL_TIMEOUT_MS)? {
                Ok(name) => LocalResponse::Joined { name },
                Err(e) => LocalResponse::Error(e),
            }
        }
        LocalRequest::Prompt(_) => LocalResponse::Error("prompts are answered as a stream".into()),
        LocalRequest::Plan { objective } => {
            if let Some(objective) = objective {
                local.planning.cast(PlanningMsg::SetObjective(objective))?;
            }
            LocalResponse::Plan(Box::new(call_t!(local.planning, PlanningMsg::Show, CALL_TIMEOUT_MS)?))
        }
        LocalRequest::Throttle { factor } => {
            crate::pace::parse_factor(&factor.to_string()).map_err(anyhow::Error::msg)?;
            let was = local.throttle.factor();
            local.throttle.set(factor);
            tracing::info!("throttle {was} -> {factor}");
            LocalResponse::Throttled { was }
        }
        LocalRequest::Revoke { device } => {
            match call_t!(local.trust, |reply| TrustMsg::Revoke { device, reply }, CALL_TIMEOUT_MS)? {
                Ok(peer) => LocalResponse::Revoked { peer_id: peer.to_base58() },
                Err(e) => LocalResponse::Error(e),
            }
        }
    })
}

/// Whether a node is serving `data_dir`.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET)
}

/// Sends a prompt to the node on `data_dir`, calling `on_event` for each piece of the answer.
pub async fn prompt(
    data_dir: &Path,
    request: crate::prompt::PromptRequest,
    on_event: &mut dyn FnMut(crate::prompt::PromptEvent),
) -> anyhow::Result<()> {
    let mut io = connect(data_dir).await?;
    wire::write_frame(&mut io, &Frame::new(1, LocalRequest::Prompt(request)), LIMIT).await?;
    loop {
        let frame: Frame<LocalResponse> =
            wire::read_frame(&mut io, LIMIT).await.context("the node closed the control connection")?;
        match frame.body {
            LocalResponse::Prompt(event @ crate::prompt::PromptEvent::Done { .. }) => {
                on_event(event);
                return Ok(());
            }
            LocalResponse::Prompt(event) => on_event(event),
            LocalResponse::Error(e) => anyhow::bail!("{e}"),
            other => anyhow::bail!("unexpected answer from the node: {other:?}"),
        }
    }
}

async fn connect(data_dir: &Path) -> anyhow::Result<tokio_util::compat::Compat<UnixStream>> {
    let stream = UnixStream::connect(socket_path(data_dir)).await.map_err(|_| {
        anyhow::anyhow!(
            "no node is running on {}; start one with `llnode start --data-dir {}`",
            data_dir.display(),
            data_dir.display()
        )
    })?;
    Ok(stream.compat())
}

/// Sends one request to the node running on `data_dir`.
pub async fn call(data_dir: &Path, request: LocalRequest) -> anyhow::Result<LocalResponse> {
    let mut io = connect(data_dir).await?;
    wire::write_frame(&mut io, &Frame::new(1, request), LIMIT).await?;
    let response: Frame<LocalResponse> =
        wire::read_frame(&mut io, LIMIT).await.context("the node closed the control connection")?;
    match response.body {
        LocalResponse::Error(e) => anyhow::bail!("{e}"),
        body => Ok(body),
    }
}
