//! A device's ed25519 key: kept in its data directory (mode 0600) and used
//! both to sign (ed25519-dalek) and as its libp2p identity, so the peer id a
//! connection authenticates with Noise is the key its certificate names.

use std::path::Path;

use ed25519_dalek::{SigningKey, VerifyingKey};
use libp2p::PeerId;

use crate::file;

/// Key file name inside a data directory.
pub const DEVICE_KEY_FILE: &str = "device.key";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read or write the key {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path} is not a key file (expected 32 bytes, found {len}); move it away and a new key is made")]
    Malformed { path: String, len: usize },
}

#[derive(Clone)]
pub struct DeviceKey {
    signing: SigningKey,
}

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceKey({})", self.peer_id())
    }
}

impl DeviceKey {
    pub fn generate() -> DeviceKey {
        DeviceKey { signing: SigningKey::from_bytes(&random_bytes()) }
    }

    pub fn from_secret(secret: [u8; 32]) -> DeviceKey {
        DeviceKey { signing: SigningKey::from_bytes(&secret) }
    }

    /// Loads the key at `path`, making and saving a new one (mode 0600) if there is none.
    pub fn load_or_create(path: &Path) -> Result<DeviceKey, KeyError> {
        load_or_create_secret(path).map(DeviceKey::from_secret)
    }

    pub fn signing(&self) -> &SigningKey {
        &self.signing
    }

    pub fn public(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    pub fn keypair(&self) -> libp2p::identity::Keypair {
        let mut secret = self.signing.to_bytes();
        libp2p::identity::Keypair::ed25519_from_bytes(&mut secret).expect("32-byte ed25519 secret")
    }

    pub fn peer_id(&self) -> PeerId {
        peer_id_of(&self.public())
    }
}

/// Reads a 32-byte secret, or makes one and writes it privately.
pub(crate) fn load_or_create_secret(path: &Path) -> Result<[u8; 32], KeyError> {
    let io = |source| KeyError::Io { path: path.display().to_string(), source };
    match file::read_optional(path).map_err(io)? {
        Some(bytes) => bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::Malformed { path: path.display().to_string(), len: bytes.len() }),
        None => {
            let secret = random_bytes();
            file::write_atomic(path, &secret, true).map_err(io)?;
            Ok(secret)
        }
    }
}

pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::Rng::fill(&mut rand::rng(), &mut b[..]);
    b
}

/// The libp2p peer id of an ed25519 public key.
pub fn peer_id_of(key: &VerifyingKey) -> PeerId {
    let public = libp2p::identity::ed25519::PublicKey::try_from_bytes(key.as_bytes())
        .expect("a valid ed25519 key is a valid libp2p key");
    libp2p::identity::PublicKey::from(public).to_peer_id()
}

/// The ed25519 key a peer id was made from (ed25519 peer ids embed the key).
pub fn key_of(peer: &PeerId) -> Option<VerifyingKey> {
    let multihash = peer.as_ref();
    if multihash.code() != 0 {
        return None; // not an identity multihash: the key is not inside
    }
    let public = libp2p::identity::PublicKey::try_decode_protobuf(multihash.digest()).ok()?;
    let ed = public.try_into_ed25519().ok()?;
    VerifyingKey::from_bytes(&ed.to_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_kept_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DEVICE_KEY_FILE);
        let a = DeviceKey::load_or_create(&path).unwrap();
        let b = DeviceKey::load_or_create(&path).unwrap();
        assert_eq!(a.peer_id(), b.peer_id());
        assert_eq!(a.keypair().public().to_peer_id(), a.peer_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert_eq!(key_of(&a.peer_id()), Some(a.public()));
    }

    #[test]
    fn malformed_key_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DEVICE_KEY_FILE);
        std::fs::write(&path, b"short").unwrap();
        let err = DeviceKey::load_or_create(&path).unwrap_err();
        assert!(err.to_string().contains("expected 32 bytes"), "{err}");
    }
}
