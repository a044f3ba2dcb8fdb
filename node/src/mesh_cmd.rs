//! `llnode id`, `llnode peers` and `llnode mesh …`: creating a mesh, inviting,
//! joining, revoking, and the offline certificate path for scripted
//! deployments (`certify` on the owner device, `install` on the other).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use llnode_mesh::cert::{OWNER_KEY_FILE, OwnerKey, SignedCertificate, now};
use llnode_mesh::identity::{self, DEVICE_KEY_FILE};
use llnode_mesh::token::JoinToken;
use llnode_mesh::{DeviceKey, MeshConfig, PeerId, Trust};

use crate::control::{self, LocalRequest, LocalResponse};
use crate::outln;
use crate::register::Register;

fn device_key(data_dir: &Path) -> anyhow::Result<DeviceKey> {
    Ok(DeviceKey::load_or_create(&data_dir.join(DEVICE_KEY_FILE))?)
}

/// `llnode id`: this device's peer id (the key is made on first use).
pub fn id(data_dir: &Path) -> anyhow::Result<()> {
    outln!("{}", device_key(data_dir)?.peer_id());
    Ok(())
}

/// `llnode mesh init`: this device becomes the owner of a new mesh and its first member.
pub fn init(data_dir: &Path, name: &str, validity: Duration) -> anyhow::Result<()> {
    let mut trust = Trust::load(data_dir)?;
    if let Some(mesh) = trust.mesh() {
        bail!("this device is already in mesh {mesh}; use another --data-dir for a new mesh");
    }
    let key = device_key(data_dir)?;
    let owner_path = data_dir.join(OWNER_KEY_FILE);
    let owner = OwnerKey::generate();
    let now = now();
    let certificate =
        owner.certify(&key.public(), name, now.saturating_sub(60), now.saturating_add(validity.as_secs()));
    trust.install(certificate.clone(), &key.peer_id())?;
    owner.save(&owner_path).with_context(|| format!("cannot write {}", owner_path.display()))?;
    trust.save(data_dir)?;
    Register::load(data_dir)?.issued(name, &key.peer_id(), &certificate)?;
    outln!("mesh {}", owner.mesh());
    eprintln!(
        "this device is {name} ({}) and owns the mesh; next: `llnode start`, then `llnode mesh invite`",
        key.peer_id()
    );
    Ok(())
}

/// `llnode mesh certify`: on the owner device, a certificate file for another device's peer id.
pub fn certify(data_dir: &Path, peer: &str, name: &str, validity: Duration, out: &Path) -> anyhow::Result<()> {
    let owner = OwnerKey::load(data_dir)?
        .context("this device does not own a mesh (no owner.key); run this on the owner's device")?;
    let peer: PeerId = peer.parse().with_context(|| format!("{peer:?} is not a peer id; `llnode id` prints one"))?;
    let key = identity::key_of(&peer).context("that peer id does not hold an ed25519 key")?;
    let now = now();
    let certificate = owner.certify(&key, name, now.saturating_sub(60), now.saturating_add(validity.as_secs()));
    llnode_mesh::file::write_atomic(out, &certificate.to_bytes(), false)
        .with_context(|| format!("cannot write {}", out.display()))?;
    Register::load(data_dir)?.issued(name, &peer, &certificate)?;
    eprintln!(
        "certificate for {name} ({peer}) written to {}; install it there with `llnode mesh install`",
        out.display()
    );
    Ok(())
}

/// `llnode mesh install`: make a certificate file this device's own.
pub fn install(data_dir: &Path, file: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let certificate = SignedCertificate::from_bytes(&bytes)
        .map_err(|e| anyhow::anyhow!("{} is not a certificate: {e}", file.display()))?;
    let key = device_key(data_dir)?;
    let mut trust = Trust::load(data_dir)?;
    trust.install(certificate.clone(), &key.peer_id())?;
    trust.save(data_dir)?;
    let cert = certificate.open()?;
    outln!("installed: this device is {} in mesh {}", cert.name, cert.mesh);
    if control::socket_path(data_dir).exists() {
        eprintln!("a node may be running here; restart it to present the new certificate");
    }
    Ok(())
}

pub fn invite(data_dir: &Path, ttl: Duration) -> anyhow::Result<()> {
    match crate::runtime()?.block_on(control::call(data_dir, LocalRequest::Invite { ttl_secs: ttl.as_secs() }))? {
        LocalResponse::Invite(token) => {
            outln!("{token}");
            eprintln!(
                "valid for {}, once: on the new device run `llnode mesh join <token>`",
                humantime::format_duration(ttl)
            );
            Ok(())
        }
        other => bail!("unexpected answer from the node: {other:?}"),
    }
}

/// `llnode mesh join`: through the running node if there is one, else with a short-lived one.
pub fn join(data_dir: &Path, token: &str, name: Option<&str>) -> anyhow::Result<()> {
    let parsed = JoinToken::decode(token)?;
    let rt = crate::runtime()?;
    let name = if control::socket_path(data_dir).exists() {
        match rt.block_on(control::call(
            data_dir,
            LocalRequest::Join { token: token.to_string(), name: name.map(str::to_string) },
        )) {
            Ok(LocalResponse::Joined { name }) => name,
            Ok(other) => bail!("unexpected answer from the node: {other:?}"),
            Err(e) => return Err(e),
        }
    } else {
        let name = name.map(str::to_string).unwrap_or_else(crate::cli::host_name);
        rt.block_on(join_offline(data_dir, parsed.clone(), &name))?
    };
    outln!("joined mesh {} as {name}", parsed.mesh);
    Ok(())
}

async fn join_offline(data_dir: &Path, token: JoinToken, name: &str) -> anyhow::Result<String> {
    if token.expires < now() {
        bail!("the join token has expired; ask the owner for a new one (`llnode mesh invite`)");
    }
    let owner_peer = token.owner_peer().context("the join token is damaged")?;
    let key = device_key(data_dir)?;
    let mut trust = Trust::load(data_dir)?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let config = MeshConfig { listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?], mdns: false, ..MeshConfig::default() };
    let (client, task) = llnode_mesh::spawn(&key, config, trust.clone(), Box::new(|_| {}), shutdown.clone())?;
    let addrs = token.addrs.iter().filter_map(|a| a.parse().ok()).collect();
    let result =
        tokio::time::timeout(Duration::from_secs(30), client.join(owner_peer, addrs, token.secret, name.to_string()))
            .await;
    shutdown.cancel();
    let _ = task.await;
    let (certificate, revocations) = result.map_err(|_| {
        anyhow::anyhow!("the owner's device did not answer within 30 s; is its node running and reachable?")
    })??;
    let cert =
        crate::actor::trust::accept_certificate(&mut trust, &key.peer_id(), data_dir, &token, certificate, revocations)
            .map_err(|e| anyhow::anyhow!(e))?;
    Ok(cert.name)
}

pub fn revoke(data_dir: &Path, device: &str) -> anyhow::Result<()> {
    match crate::runtime()?.block_on(control::call(data_dir, LocalRequest::Revoke { device: device.to_string() }))? {
        LocalResponse::Revoked { peer_id } => {
            outln!("revoked {peer_id}");
            Ok(())
        }
        other => bail!("unexpected answer from the node: {other:?}"),
    }
}

pub fn peers(data_dir: &Path, json: bool) -> anyhow::Result<()> {
    let rows = match crate::runtime()?.block_on(control::call(data_dir, LocalRequest::Peers))? {
        LocalResponse::Peers(rows) => rows,
        other => bail!("unexpected answer from the node: {other:?}"),
    };
    if json {
        outln!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        outln!("no peers yet");
        return Ok(());
    }
    outln!("{:<16} {:<54} {:<28} {:>9} {:>9}  addresses", "name", "peer id", "state", "last seen", "rtt");
    for r in rows {
        let state = match &r.reason {
            Some(why) => format!("{}: {why}", r.state),
            None if !r.connected => format!("{} (disconnected)", r.state),
            None => r.state.clone(),
        };
        let seen = r.last_seen_secs.map(|s| format!("{s:.0}s ago")).unwrap_or_else(|| "-".into());
        let rtt = r.rtt_ms.map(|ms| format!("{ms:.2} ms")).unwrap_or_else(|| "-".into());
        outln!(
            "{:<16} {:<54} {:<28} {:>9} {:>9}  {}",
            r.name.as_deref().unwrap_or("?"),
            r.peer_id,
            state,
            seen,
            rtt,
            r.addrs.join(" ")
        );
    }
    Ok(())
}
