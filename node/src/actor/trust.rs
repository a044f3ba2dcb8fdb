//! TrustActor: child of `llnode start`. Owns what this device keeps about
//! the mesh on disk (its certificate, revocations, and on the owner device
//! the owner key, outstanding invites and the register of issued
//! certificates), answers join requests, issues invites and revocations.
//! The gate itself runs in the mesh event loop; this actor keeps it fed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use llnode_mesh::cert::{Certificate, OwnerKey, SignedCertificate, SignedRevocation, now};
use llnode_mesh::event::InboundId;
use llnode_mesh::identity;
use llnode_mesh::token::JoinToken;
use llnode_mesh::{MeshClient, Multiaddr, PeerId, Trust};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::register::Register;

pub struct TrustActor;

pub struct TrustArgs {
    pub data_dir: PathBuf,
    pub me: PeerId,
    pub trust: Trust,
    pub client: MeshClient,
    /// How long certificates issued to joining devices last.
    pub certificate_validity: Duration,
}

pub struct TrustState {
    args: TrustArgs,
    owner: Option<OwnerKey>,
    /// Hash of each outstanding invite's secret, and when it expires.
    invites: HashMap<[u8; 32], u64>,
    register: Register,
}

pub enum TrustMsg {
    /// Make a one-time join token valid for `ttl`, naming these addresses.
    Invite { ttl: Duration, addrs: Vec<Multiaddr>, reply: RpcReplyPort<Result<String, String>> },
    /// A device asks to join (from the mesh).
    JoinRequest { peer: PeerId, id: InboundId, secret: [u8; 16], name: String },
    /// Join the mesh a token names (asked by `llnode mesh join`).
    Join { token: JoinToken, name: String, reply: RpcReplyPort<Result<String, String>> },
    /// The join finished (sent by the task that did the network part).
    Joined {
        token: JoinToken,
        result: Result<(SignedCertificate, Vec<SignedRevocation>), String>,
        reply: RpcReplyPort<Result<String, String>>,
    },
    /// Revoke a device by name or peer id (owner only).
    Revoke { device: String, reply: RpcReplyPort<Result<PeerId, String>> },
    /// A revocation learned from the mesh: keep it.
    Learned { revocation: SignedRevocation },
    /// A peer proved membership under `name`.
    Trusted { peer: PeerId, name: String },
}

impl Actor for TrustActor {
    type Msg = TrustMsg;
    type State = TrustState;
    type Arguments = TrustArgs;

    async fn pre_start(&self, _: ActorRef<TrustMsg>, args: TrustArgs) -> Result<TrustState, ActorProcessingErr> {
        let owner = OwnerKey::load(&args.data_dir)?;
        let register = Register::load(&args.data_dir)?;
        Ok(TrustState { args, owner, invites: HashMap::new(), register })
    }

    async fn handle(
        &self,
        myself: ActorRef<TrustMsg>,
        msg: TrustMsg,
        state: &mut TrustState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            TrustMsg::Invite { ttl, addrs, reply } => {
                let _ = reply.send(state.invite(ttl, addrs));
            }
            TrustMsg::JoinRequest { peer, id, secret, name } => {
                let result = state.admit(&peer, &secret, &name);
                match &result {
                    Ok(_) => tracing::info!("admitted {name} ({peer})"),
                    Err(why) => tracing::info!("join refused for {peer}: {why}"),
                }
                state.args.client.answer_join(id, result);
            }
            TrustMsg::Join { token, name, reply } => {
                if token.expires < now() {
                    let _ = reply.send(Err(
                        "the join token has expired; ask the owner for a new one (`llnode mesh invite`)".into(),
                    ));
                    return Ok(());
                }
                let Some(owner_peer) = token.owner_peer() else {
                    let _ = reply.send(Err(
                        "the join token is damaged; copy the whole line `llnode mesh invite` printed".into(),
                    ));
                    return Ok(());
                };
                let addrs: Vec<Multiaddr> = token.addrs.iter().filter_map(|a| a.parse().ok()).collect();
                let client = state.args.client.clone();
                // The network part runs apart so the actor keeps serving.
                tokio::spawn(async move {
                    let result = client.join(owner_peer, addrs, token.secret, name).await.map_err(|e| e.to_string());
                    let _ = myself.cast(TrustMsg::Joined { token, result, reply });
                });
            }
            TrustMsg::Joined { token, result, reply } => {
                let _ = reply.send(state.joined(&token, result).await);
            }
            TrustMsg::Revoke { device, reply } => {
                let _ = reply.send(state.revoke(&device));
            }
            TrustMsg::Learned { revocation } => {
                state.args.trust.add_revocation(revocation);
                if let Err(e) = state.args.trust.save(&state.args.data_dir) {
                    tracing::error!("cannot save revocations: {e}");
                }
            }
            TrustMsg::Trusted { peer, name } => state.register.seen(&name, &peer),
        }
        Ok(())
    }
}

impl TrustState {
    fn invite(&mut self, ttl: Duration, addrs: Vec<Multiaddr>) -> Result<String, String> {
        let Some(owner) = &self.owner else {
            return Err("only the mesh owner's device can invite; run `llnode mesh invite` there".into());
        };
        if addrs.is_empty() {
            return Err("this node listens on no address a joining device could reach; start it with --listen".into());
        }
        let now = now();
        self.invites.retain(|_, expires| *expires >= now);
        let secret: [u8; 16] = rand::random();
        let expires = now + ttl.as_secs();
        self.invites.insert(JoinToken::secret_hash(&secret), expires);
        let token = JoinToken {
            mesh: owner.mesh(),
            owner_peer: self.args.me.to_bytes(),
            addrs: addrs.iter().map(|a| a.to_string()).collect(),
            secret,
            expires,
        };
        Ok(token.encode())
    }

    /// Checks a join request against the outstanding invites and certifies the key the peer connected with.
    fn admit(&mut self, peer: &PeerId, secret: &[u8; 16], name: &str) -> Result<SignedCertificate, String> {
        let Some(owner) = &self.owner else {
            return Err("this device is not the mesh owner".into());
        };
        let name = name.trim();
        if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
            return Err("the device name must be 1 to 64 printable characters".into());
        }
        let now = now();
        // One use: the invite is gone whether or not it was still valid.
        match self.invites.remove(&JoinToken::secret_hash(secret)) {
            None => {
                return Err(
                    "unknown or already used join token; ask the owner for a new one (`llnode mesh invite`)".into()
                );
            }
            Some(expires) if expires < now => {
                return Err("the join token has expired; ask the owner for a new one".into());
            }
            Some(_) => {}
        }
        let key = identity::key_of(peer).ok_or("the peer's id is not an ed25519 key")?;
        let validity = self.args.certificate_validity.as_secs();
        let certificate = owner.certify(&key, name, now.saturating_sub(60), now.saturating_add(validity));
        self.register.issued(name, peer, &certificate).map_err(|e| e.to_string())?;
        Ok(certificate)
    }

    async fn joined(
        &mut self,
        token: &JoinToken,
        result: Result<(SignedCertificate, Vec<SignedRevocation>), String>,
    ) -> Result<String, String> {
        let (certificate, revocations) = result?;
        let args = &mut self.args;
        let cert = accept_certificate(
            &mut args.trust,
            &args.me,
            &args.data_dir,
            token,
            certificate.clone(),
            revocations.clone(),
        )?;
        for r in revocations {
            args.client.revoke(r);
        }
        args.client.install(certificate).await.map_err(|e| e.to_string())?;
        Ok(cert.name)
    }

    fn revoke(&mut self, device: &str) -> Result<PeerId, String> {
        let Some(owner) = &self.owner else {
            return Err("only the mesh owner's device can revoke; run `llnode mesh revoke` there".into());
        };
        let peer = self.register.resolve(device)?;
        if peer == self.args.me {
            return Err("the owner's device cannot revoke itself".into());
        }
        let key = identity::key_of(&peer).ok_or("not an ed25519 peer id")?;
        let revocation = owner.revoke(&key);
        self.args.trust.add_revocation(revocation.clone());
        self.args.trust.save(&self.args.data_dir).map_err(|e| e.to_string())?;
        self.args.client.revoke(revocation);
        Ok(peer)
    }
}

/// Keeps the certificate a join brought back, after checking it is for the
/// mesh the token named, with the revocations that came with it.
pub fn accept_certificate(
    trust: &mut Trust,
    me: &PeerId,
    data_dir: &Path,
    token: &JoinToken,
    certificate: SignedCertificate,
    revocations: Vec<SignedRevocation>,
) -> Result<Certificate, String> {
    let cert = certificate.open().map_err(|e| format!("the owner sent a bad certificate: {e}"))?;
    if cert.mesh != token.mesh {
        return Err("the owner's device answered with another mesh's certificate; the token may be forged".into());
    }
    trust.install(certificate, me).map_err(|e| e.to_string())?;
    for r in revocations {
        trust.add_revocation(r);
    }
    trust.save(data_dir).map_err(|e| e.to_string())?;
    Ok(cert)
}
