//! Mesh certificates and revocations. A mesh is named by its owner's
//! ed25519 public key; the owner admits a device by signing a
//! [`Certificate`] (device key, name, validity window) and removes one by
//! signing a [`Revocation`]. Both travel as CBOR bodies with a detached
//! signature over a domain-separated copy of those exact bytes.

use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::file;
use crate::identity::{self, KeyError};

/// The owner key's file name inside the owner device's data directory.
pub const OWNER_KEY_FILE: &str = "owner.key";
const CERT_DOMAIN: &[u8] = b"llnode certificate v1\0";
const REVOCATION_DOMAIN: &[u8] = b"llnode revocation v1\0";

/// A mesh's identity: its owner's public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MeshId(pub [u8; 32]);

impl MeshId {
    pub fn key(&self) -> Option<VerifyingKey> {
        VerifyingKey::from_bytes(&self.0).ok()
    }
}

impl std::fmt::Display for MeshId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&bs58::encode(self.0).into_string())
    }
}

impl std::fmt::Debug for MeshId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MeshId({self})")
    }
}

/// What the owner vouches for: this device key belongs to the mesh from
/// `not_before` to `not_after` (Unix seconds) under this name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    pub mesh: MeshId,
    pub device: [u8; 32],
    pub name: String,
    pub issued_at: u64,
    pub not_before: u64,
    pub not_after: u64,
}

/// Every certificate of `device` issued at or before `issued_at` is void.
/// A later certificate admits the device again.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Revocation {
    pub mesh: MeshId,
    pub device: [u8; 32],
    pub issued_at: u64,
}

/// A CBOR body and the owner's signature over it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Signed {
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCertificate(pub Signed);

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SignedRevocation(pub Signed);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("the signed body is not valid CBOR")]
    Malformed,
    #[error("the mesh key is not a valid ed25519 key")]
    BadMeshKey,
    #[error("the signature does not match the mesh key")]
    BadSignature,
}

impl Signed {
    fn sign<T: Serialize>(domain: &[u8], value: &T, key: &SigningKey) -> Signed {
        let body = serde_cbor::to_vec(value).expect("plain structs encode");
        let signature = key.sign(&[domain, &body].concat()).to_bytes().to_vec();
        Signed { body, signature }
    }

    fn open<T: for<'de> Deserialize<'de>>(
        &self,
        domain: &[u8],
        mesh_of: impl Fn(&T) -> MeshId,
    ) -> Result<T, SignatureError> {
        let value: T = serde_cbor::from_slice(&self.body).map_err(|_| SignatureError::Malformed)?;
        let key = mesh_of(&value).key().ok_or(SignatureError::BadMeshKey)?;
        let signature = Signature::from_slice(&self.signature).map_err(|_| SignatureError::BadSignature)?;
        key.verify(&[domain, &self.body].concat(), &signature).map_err(|_| SignatureError::BadSignature)?;
        Ok(value)
    }
}

impl SignedCertificate {
    /// The certificate, once its signature checks against the mesh key it names.
    /// Whether that mesh is ours is the caller's question.
    pub fn open(&self) -> Result<Certificate, SignatureError> {
        self.0.open(CERT_DOMAIN, |c: &Certificate| c.mesh)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_cbor::to_vec(self).expect("encodes")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<SignedCertificate, SignatureError> {
        serde_cbor::from_slice(bytes).map_err(|_| SignatureError::Malformed)
    }
}

impl SignedRevocation {
    pub fn open(&self) -> Result<Revocation, SignatureError> {
        self.0.open(REVOCATION_DOMAIN, |r: &Revocation| r.mesh)
    }
}

/// The mesh owner's signing key; it lives only on the owner device.
pub struct OwnerKey {
    signing: SigningKey,
}

impl OwnerKey {
    pub fn load_or_create(path: &Path) -> Result<OwnerKey, KeyError> {
        Ok(OwnerKey { signing: SigningKey::from_bytes(&identity::load_or_create_secret(path)?) })
    }

    /// The owner key of `data_dir`, if this device owns a mesh.
    pub fn load(data_dir: &Path) -> Result<Option<OwnerKey>, KeyError> {
        let path = data_dir.join(OWNER_KEY_FILE);
        if !path.exists() {
            return Ok(None);
        }
        OwnerKey::load_or_create(&path).map(Some)
    }

    pub fn generate() -> OwnerKey {
        OwnerKey { signing: SigningKey::from_bytes(&identity::random_bytes()) }
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        file::write_atomic(path, &self.signing.to_bytes(), true)
    }

    pub fn mesh(&self) -> MeshId {
        MeshId(self.signing.verifying_key().to_bytes())
    }

    pub fn certify(&self, device: &VerifyingKey, name: &str, not_before: u64, not_after: u64) -> SignedCertificate {
        self.certify_at(now(), device, name, not_before, not_after)
    }

    pub(crate) fn certify_at(
        &self,
        issued_at: u64,
        device: &VerifyingKey,
        name: &str,
        not_before: u64,
        not_after: u64,
    ) -> SignedCertificate {
        let cert = Certificate {
            mesh: self.mesh(),
            device: device.to_bytes(),
            name: name.to_string(),
            issued_at,
            not_before,
            not_after,
        };
        SignedCertificate(Signed::sign(CERT_DOMAIN, &cert, &self.signing))
    }

    pub fn revoke(&self, device: &VerifyingKey) -> SignedRevocation {
        let revocation = Revocation { mesh: self.mesh(), device: device.to_bytes(), issued_at: now() };
        SignedRevocation(Signed::sign(REVOCATION_DOMAIN, &revocation, &self.signing))
    }
}

/// Unix seconds.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::DeviceKey;

    #[test]
    fn certificates_verify_and_tampering_is_caught() {
        let owner = OwnerKey::generate();
        let device = DeviceKey::generate();
        let signed = owner.certify(&device.public(), "phone", 0, u64::MAX);
        let cert = signed.open().unwrap();
        assert_eq!(cert.device, device.public().to_bytes());
        assert_eq!(cert.mesh, owner.mesh());

        let mut tampered = signed.clone();
        let last = tampered.0.body.len() - 1;
        tampered.0.body[last] ^= 1;
        assert!(tampered.open().is_err());

        // Signed by another owner but claiming this mesh.
        let other = OwnerKey::generate();
        let mut forged = other.certify(&device.public(), "phone", 0, u64::MAX);
        let mut body: Certificate = serde_cbor::from_slice(&forged.0.body).unwrap();
        body.mesh = owner.mesh();
        forged.0.body = serde_cbor::to_vec(&body).unwrap();
        assert_eq!(forged.open(), Err(SignatureError::BadSignature));

        let revocation = owner.revoke(&device.public());
        assert_eq!(revocation.open().unwrap().device, device.public().to_bytes());
        // A revocation's signature is not a certificate's.
        let confused = SignedCertificate(revocation.0.clone());
        assert!(confused.open().is_err());
    }
}
