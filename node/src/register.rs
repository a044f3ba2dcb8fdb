//! The device names this node knows, so a person can say `llnode mesh
//! revoke kitchen-tablet` rather than a peer id. The owner device records
//! every certificate it issues; every node records the names its trusted
//! peers' certificates carry. Kept in `devices.json`, written atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use llnode_mesh::PeerId;
use llnode_mesh::cert::SignedCertificate;
use serde::{Deserialize, Serialize};

const FILE: &str = "devices.json";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    /// When the owner issued its latest certificate (Unix seconds), if this device issued it.
    pub issued_at: Option<u64>,
}

pub struct Register {
    path: PathBuf,
    devices: BTreeMap<String, Device>,
}

impl Register {
    pub fn load(data_dir: &Path) -> anyhow::Result<Register> {
        let path = data_dir.join(FILE);
        let devices = match llnode_mesh::file::read_optional(&path)? {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| anyhow::anyhow!("{} is damaged ({e}); fix or remove it", path.display()))?,
            None => BTreeMap::new(),
        };
        Ok(Register { path, devices })
    }

    fn save(&self) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(&self.devices).expect("encodes");
        llnode_mesh::file::write_atomic(&self.path, &json, false)
    }

    pub fn issued(&mut self, name: &str, peer: &PeerId, certificate: &SignedCertificate) -> std::io::Result<()> {
        let issued_at = certificate.open().ok().map(|c| c.issued_at);
        self.devices.insert(peer.to_base58(), Device { name: name.to_string(), issued_at });
        self.save()
    }

    pub fn seen(&mut self, name: &str, peer: &PeerId) {
        let key = peer.to_base58();
        if self.devices.get(&key).is_some_and(|d| d.name == name) {
            return;
        }
        let issued_at = self.devices.get(&key).and_then(|d| d.issued_at);
        self.devices.insert(key, Device { name: name.to_string(), issued_at });
        if let Err(e) = self.save() {
            tracing::warn!("cannot save {}: {e}", self.path.display());
        }
    }

    /// A peer id, or the name of exactly one known device.
    pub fn resolve(&self, device: &str) -> Result<PeerId, String> {
        if let Ok(peer) = device.parse::<PeerId>() {
            return Ok(peer);
        }
        let matches: Vec<&String> = self.devices.iter().filter(|(_, d)| d.name == device).map(|(p, _)| p).collect();
        match matches.as_slice() {
            [one] => one.parse().map_err(|_| format!("{} holds a bad peer id", self.path.display())),
            [] => Err(format!("no known device is named {device:?}; `llnode peers` lists names and peer ids")),
            _ => Err(format!("several devices are named {device:?}; give the peer id instead (`llnode peers`)")),
        }
    }
}
