//! One-time join tokens. The owner device prints one (`llnode mesh invite`);
//! it names the mesh, the owner device's peer id and addresses, a random
//! secret and an expiry. The joining device dials that peer id (Noise proves
//! it is the owner device and proves the joiner holds its own key), sends the
//! secret, and gets a certificate for the key it connected with. The owner
//! keeps only the secret's hash and forgets it on first use.

use serde::{Deserialize, Serialize};

use crate::cert::MeshId;

const PREFIX: &str = "llnode-join-";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub mesh: MeshId,
    #[serde(with = "serde_bytes")]
    pub owner_peer: Vec<u8>,
    pub addrs: Vec<String>,
    pub secret: [u8; 16],
    pub expires: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error(
        "this is not a join token (it should start with {PREFIX}); copy the whole line `llnode mesh invite` printed"
    )]
    NotAToken,
    #[error("the join token is damaged; copy the whole line `llnode mesh invite` printed")]
    Damaged,
}

impl JoinToken {
    pub fn encode(&self) -> String {
        format!("{PREFIX}{}", bs58::encode(serde_cbor::to_vec(self).expect("encodes")).into_string())
    }

    pub fn decode(text: &str) -> Result<JoinToken, TokenError> {
        let body = text.trim().strip_prefix(PREFIX).ok_or(TokenError::NotAToken)?;
        let bytes = bs58::decode(body).into_vec().map_err(|_| TokenError::Damaged)?;
        if bytes.len() > 4096 {
            return Err(TokenError::Damaged);
        }
        serde_cbor::from_slice(&bytes).map_err(|_| TokenError::Damaged)
    }

    pub fn owner_peer(&self) -> Option<libp2p::PeerId> {
        libp2p::PeerId::from_bytes(&self.owner_peer).ok()
    }

    /// What the owner stores instead of the secret.
    pub fn secret_hash(secret: &[u8; 16]) -> [u8; 32] {
        *blake3::hash(secret).as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_damage_is_reported() {
        let token = JoinToken {
            mesh: MeshId([7; 32]),
            owner_peer: crate::identity::DeviceKey::generate().peer_id().to_bytes(),
            addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
            secret: [1; 16],
            expires: 123,
        };
        let text = token.encode();
        assert_eq!(JoinToken::decode(&text), Ok(token));
        assert_eq!(JoinToken::decode("hello"), Err(TokenError::NotAToken));
        assert_eq!(JoinToken::decode(&text[..text.len() - 3]), Err(TokenError::Damaged));
    }
}
