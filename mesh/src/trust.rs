//! What a device believes about the mesh: which mesh it belongs to, its own
//! certificate, and the revocations it has seen. [`Trust::check`] is the
//! gate's whole decision about a peer, so it is pure and tested here.
//! Persisted in the data directory as `certificate.cbor` and
//! `revocations.cbor`, each written atomically.

use std::collections::HashSet;
use std::path::Path;

use libp2p::PeerId;

use crate::cert::{Certificate, MeshId, Revocation, SignedCertificate, SignedRevocation, now};
use crate::file;
use crate::identity;

pub const CERTIFICATE_FILE: &str = "certificate.cbor";
pub const REVOCATIONS_FILE: &str = "revocations.cbor";

/// Why a peer is not trusted; shown by `llnode peers` and in the log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("this device is not in a mesh")]
    NoMesh,
    #[error("presented no certificate")]
    NoCertificate,
    #[error("did not present a certificate in time")]
    Silent,
    #[error("certificate is malformed or its signature is bad")]
    BadSignature,
    #[error("certificate is from another mesh ({0})")]
    OtherMesh(MeshId),
    #[error("certificate is for another key than the one this connection authenticated")]
    WrongKey,
    #[error("certificate is not valid until {0} (Unix time)")]
    NotYetValid(u64),
    #[error("certificate expired at {0} (Unix time)")]
    Expired(u64),
    #[error("revoked by the mesh owner")]
    Revoked,
    #[error("refused us: {0}")]
    RefusedUs(String),
}

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot read or write {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path} is damaged ({why}); install the certificate again with `llnode mesh install`")]
    Damaged { path: String, why: String },
    #[error("the certificate is for another device (this one is {ours})")]
    NotOurs { ours: PeerId },
    #[error(
        "the certificate is from mesh {theirs}, but this device is in mesh {ours}; use a fresh data directory to join another mesh"
    )]
    OtherMesh { ours: MeshId, theirs: MeshId },
    #[error("{0}")]
    Invalid(Refusal),
}

#[derive(Clone, Debug, Default)]
pub struct Trust {
    own: Option<SignedCertificate>,
    mesh: Option<MeshId>,
    revocations: Vec<SignedRevocation>,
    revoked: HashSet<Revocation>,
}

impl Trust {
    /// Reads the trust files of a data directory (none yet: not in a mesh).
    pub fn load(data_dir: &Path) -> Result<Trust, TrustError> {
        let mut trust = Trust::default();
        let cert_path = data_dir.join(CERTIFICATE_FILE);
        if let Some(bytes) = read(&cert_path)? {
            let signed = SignedCertificate::from_bytes(&bytes).map_err(|e| damaged(&cert_path, e))?;
            let cert = signed.open().map_err(|e| damaged(&cert_path, e))?;
            trust.mesh = Some(cert.mesh);
            trust.own = Some(signed);
        }
        let rev_path = data_dir.join(REVOCATIONS_FILE);
        if let Some(bytes) = read(&rev_path)? {
            let list: Vec<SignedRevocation> = serde_cbor::from_slice(&bytes).map_err(|e| damaged(&rev_path, e))?;
            for r in list {
                trust.add_revocation(r);
            }
        }
        Ok(trust)
    }

    pub fn save(&self, data_dir: &Path) -> Result<(), TrustError> {
        if let Some(own) = &self.own {
            write(&data_dir.join(CERTIFICATE_FILE), &own.to_bytes())?;
        }
        write(&data_dir.join(REVOCATIONS_FILE), &serde_cbor::to_vec(&self.revocations).expect("encodes"))
    }

    pub fn mesh(&self) -> Option<MeshId> {
        self.mesh
    }

    pub fn own_certificate(&self) -> Option<&SignedCertificate> {
        self.own.as_ref()
    }

    pub fn revocations(&self) -> &[SignedRevocation] {
        &self.revocations
    }

    /// Installs this device's own certificate after checking it names `me`,
    /// is valid now, and belongs to the mesh this device is in (if any).
    pub fn install(&mut self, signed: SignedCertificate, me: &PeerId) -> Result<(), TrustError> {
        let cert = signed.open().map_err(|_| TrustError::Invalid(Refusal::BadSignature))?;
        if let Some(ours) = self.mesh
            && ours != cert.mesh
        {
            return Err(TrustError::OtherMesh { ours, theirs: cert.mesh });
        }
        self.mesh = Some(cert.mesh);
        self.check(me, Some(&signed), now()).map_err(|r| match r {
            Refusal::WrongKey => TrustError::NotOurs { ours: *me },
            r => TrustError::Invalid(r),
        })?;
        self.own = Some(signed);
        Ok(())
    }

    /// Records a revocation signed by this mesh's owner; returns the revoked
    /// device's peer id if it was new. Revocations for other meshes or with
    /// bad signatures are ignored.
    pub fn add_revocation(&mut self, signed: SignedRevocation) -> Option<PeerId> {
        let revocation = signed.open().ok()?;
        if self.mesh.is_some_and(|m| m != revocation.mesh) || self.revoked.contains(&revocation) {
            return None;
        }
        let key = ed25519_dalek::VerifyingKey::from_bytes(&revocation.device).ok()?;
        self.revoked.insert(revocation);
        self.revocations.push(signed);
        Some(identity::peer_id_of(&key))
    }

    /// The gate: may `peer` (authenticated by the connection) join us with `cert`?
    /// Returns its certificate.
    pub fn check(&self, peer: &PeerId, cert: Option<&SignedCertificate>, now: u64) -> Result<Certificate, Refusal> {
        let mesh = self.mesh.ok_or(Refusal::NoMesh)?;
        let cert = cert.ok_or(Refusal::NoCertificate)?.open().map_err(|_| Refusal::BadSignature)?;
        if cert.mesh != mesh {
            return Err(Refusal::OtherMesh(cert.mesh));
        }
        if identity::key_of(peer).map(|k| k.to_bytes()) != Some(cert.device) {
            return Err(Refusal::WrongKey);
        }
        if now < cert.not_before {
            return Err(Refusal::NotYetValid(cert.not_before));
        }
        if now > cert.not_after {
            return Err(Refusal::Expired(cert.not_after));
        }
        if self.revoked.iter().any(|r| r.device == cert.device && r.issued_at >= cert.issued_at) {
            return Err(Refusal::Revoked);
        }
        Ok(cert)
    }
}

fn read(path: &Path) -> Result<Option<Vec<u8>>, TrustError> {
    file::read_optional(path).map_err(|source| TrustError::Io { path: path.display().to_string(), source })
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), TrustError> {
    file::write_atomic(path, bytes, false).map_err(|source| TrustError::Io { path: path.display().to_string(), source })
}

fn damaged(path: &Path, why: impl std::fmt::Display) -> TrustError {
    TrustError::Damaged { path: path.display().to_string(), why: why.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::OwnerKey;
    use crate::identity::DeviceKey;

    fn member(owner: &OwnerKey, key: &DeviceKey) -> Trust {
        let mut t = Trust::default();
        t.install(owner.certify(&key.public(), "a", 0, u64::MAX), &key.peer_id()).unwrap();
        t
    }

    #[test]
    fn gate_decisions() {
        let owner = OwnerKey::generate();
        let (a, b) = (DeviceKey::generate(), DeviceKey::generate());
        let trust = member(&owner, &a);
        let now = now();
        let good = owner.certify(&b.public(), "b", now - 10, now + 10);
        assert_eq!(trust.check(&b.peer_id(), Some(&good), now).map(|c| c.name), Ok("b".into()));
        assert_eq!(trust.check(&b.peer_id(), None, now), Err(Refusal::NoCertificate));
        // b's certificate presented over a's connection.
        assert_eq!(trust.check(&a.peer_id(), Some(&good), now), Err(Refusal::WrongKey));
        assert_eq!(trust.check(&b.peer_id(), Some(&good), now + 11), Err(Refusal::Expired(now + 10)));
        assert_eq!(trust.check(&b.peer_id(), Some(&good), now - 11), Err(Refusal::NotYetValid(now - 10)));
        let other = OwnerKey::generate();
        let foreign = other.certify(&b.public(), "b", 0, u64::MAX);
        assert_eq!(trust.check(&b.peer_id(), Some(&foreign), now), Err(Refusal::OtherMesh(other.mesh())));
        assert_eq!(Trust::default().check(&b.peer_id(), Some(&good), now), Err(Refusal::NoMesh));
    }

    #[test]
    fn revocation_voids_older_certificates_only() {
        let owner = OwnerKey::generate();
        let (a, b) = (DeviceKey::generate(), DeviceKey::generate());
        let mut trust = member(&owner, &a);
        let old = owner.certify(&b.public(), "b", 0, u64::MAX);
        assert_eq!(trust.add_revocation(owner.revoke(&b.public())), Some(b.peer_id()));
        assert_eq!(trust.check(&b.peer_id(), Some(&old), now()), Err(Refusal::Revoked));
        // A revocation from another owner changes nothing.
        assert_eq!(trust.add_revocation(OwnerKey::generate().revoke(&a.public())), None);
        // Re-admission: a certificate issued after the revocation.
        let later = owner.certify_at(now() + 5, &b.public(), "b", 0, u64::MAX);
        assert_eq!(trust.check(&b.peer_id(), Some(&later), now()).map(|c| c.name), Ok("b".into()));
    }

    #[test]
    fn install_checks_the_certificate() {
        let owner = OwnerKey::generate();
        let (a, b) = (DeviceKey::generate(), DeviceKey::generate());
        let mut trust = Trust::default();
        let for_b = owner.certify(&b.public(), "b", 0, u64::MAX);
        assert!(matches!(trust.install(for_b, &a.peer_id()), Err(TrustError::NotOurs { .. })));
        let mut trust = member(&owner, &a);
        let foreign = OwnerKey::generate().certify(&a.public(), "a", 0, u64::MAX);
        assert!(matches!(trust.install(foreign, &a.peer_id()), Err(TrustError::OtherMesh { .. })));

        let dir = tempfile::tempdir().unwrap();
        trust.add_revocation(owner.revoke(&b.public()));
        trust.save(dir.path()).unwrap();
        let back = Trust::load(dir.path()).unwrap();
        assert_eq!(back.mesh(), Some(owner.mesh()));
        assert_eq!(back.revocations().len(), 1);
        assert_eq!(back.own_certificate(), trust.own_certificate());
    }
}
