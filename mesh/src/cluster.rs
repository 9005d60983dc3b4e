//! What every member of the cluster shares: keys derived from the cluster secret (a Kubernetes
//! Secret mounted as a file, like Weave's `WEAVE_PASSWORD`), and the directory of who may
//! connect ([`PeerDirectory`], filled from Node objects by the agent).
//!
//! The secret itself is never used as a key: HKDF-SHA256 derives one HMAC key (proves that a
//! peer knows the secret) and one pre-shared key (mixed into every session's key material, so
//! that traffic keys also depend on the secret).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Mutex;

use ring::{hkdf, hmac};
use thiserror::Error;

use crate::wire::{KEY_LEN, MAC_LEN, NodeName};

const SALT: &[u8] = b"weft-mesh/1 cluster secret";

/// The cluster secret could not be used.
#[derive(Debug, Error)]
pub enum SecretError {
    /// Reading the mounted file.
    #[error("cluster secret {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// An empty secret would authenticate anyone.
    #[error("the cluster secret is empty")]
    Empty,
}

/// An HKDF output length for `ring::hkdf`.
pub(crate) struct Len(pub usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// Fills `out` with HKDF-SHA256(salt, ikm, info).
pub(crate) fn hkdf_fill(salt: &[u8], ikm: &[u8], info: &[u8], out: &mut [u8]) {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    prk.expand(&[info], Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .expect("HKDF-SHA256 output of at most 255 blocks");
}

/// Keys derived from the cluster secret.
#[derive(Debug)]
pub struct ClusterKeys {
    auth: hmac::Key,
    psk: [u8; KEY_LEN],
}

impl ClusterKeys {
    /// Derives the keys from the secret's bytes. One trailing newline is ignored (secrets
    /// written with `echo` carry one); an empty secret is refused.
    pub fn from_secret(secret: &[u8]) -> Result<ClusterKeys, SecretError> {
        let secret = ClusterKeys::usable_secret(secret)?;
        if secret.len() < 16 {
            tracing::warn!(
                bytes = secret.len(),
                "the cluster secret is short; use 32 random bytes"
            );
        }
        let mut auth = [0; MAC_LEN];
        hkdf_fill(SALT, secret, b"hmac", &mut auth);
        let mut psk = [0; KEY_LEN];
        hkdf_fill(SALT, secret, b"psk", &mut psk);
        Ok(ClusterKeys {
            auth: hmac::Key::new(hmac::HMAC_SHA256, &auth),
            psk,
        })
    }

    /// The secret as the keys are derived from it: one trailing newline ignored (a file
    /// written by `echo`), nothing left refused. Checks a secret without deriving keys.
    pub fn usable_secret(secret: &[u8]) -> Result<&[u8], SecretError> {
        let secret = secret.strip_suffix(b"\n").unwrap_or(secret);
        if secret.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(secret)
    }

    /// Reads the mounted secret file.
    pub fn load(path: &Path) -> Result<ClusterKeys, SecretError> {
        let bytes = std::fs::read(path).map_err(|source| SecretError::Io {
            path: path.display().to_string(),
            source,
        })?;
        ClusterKeys::from_secret(&bytes)
    }

    /// HMAC-SHA256 over the concatenation of `parts`.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; MAC_LEN] {
        let mut ctx = hmac::Context::with_key(&self.auth);
        for p in parts {
            ctx.update(p);
        }
        let mut out = [0; MAC_LEN];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }

    /// Constant-time check of a tag made by [`ClusterKeys::mac`].
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8; MAC_LEN]) -> bool {
        hmac::verify(&self.auth, &parts.concat(), tag).is_ok()
    }

    /// The pre-shared key mixed into session keys.
    pub(crate) fn psk(&self) -> &[u8; KEY_LEN] {
        &self.psk
    }
}

/// Why a peer is not admitted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Admission {
    /// No Node object of that name.
    #[error("node {0} is not a member of the cluster")]
    NotMember(NodeName),
    /// The Node publishes another identity key.
    #[error("node {0} presented an identity key other than the one it publishes")]
    KeyMismatch(NodeName),
    /// Published keys are required and this Node publishes none (yet).
    #[error("node {0} publishes no mesh identity key (yet)")]
    NoPublishedKey(NodeName),
}

/// Who may connect: the member nodes and, where known, each one's published identity key.
///
/// Until [`PeerDirectory::set_members`] is called any name is admitted (the cluster secret
/// still gates everyone). A node without a published key is authenticated by the cluster
/// secret only, unless [`PeerDirectory::require_published_keys`] is on (the agent turns it
/// on: a peer must prove the secret *and* present the key its Node object publishes); a node
/// with one must present it.
#[derive(Debug, Default)]
pub struct PeerDirectory {
    members: Mutex<Option<BTreeSet<NodeName>>>,
    keys: Mutex<BTreeMap<NodeName, [u8; KEY_LEN]>>,
    require_keys: std::sync::atomic::AtomicBool,
}

impl PeerDirectory {
    /// Replaces the member list (from the Node objects).
    pub fn set_members(&self, members: impl IntoIterator<Item = NodeName>) {
        *self.members.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(members.into_iter().collect());
    }

    /// Records the identity key `node` publishes.
    pub fn set_key(&self, node: NodeName, key: [u8; KEY_LEN]) {
        self.keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node, key);
    }

    /// Replaces every published key at once (from the Node objects' annotations): a key
    /// withdrawn or changed on the Node is withdrawn or changed here.
    pub fn replace_keys(&self, keys: impl IntoIterator<Item = (NodeName, [u8; KEY_LEN])>) {
        *self.keys.lock().unwrap_or_else(|e| e.into_inner()) = keys.into_iter().collect();
    }

    /// Refuse members that publish no key (instead of trusting the cluster secret alone).
    pub fn require_published_keys(&self, on: bool) {
        self.require_keys
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether `node` presenting `identity` may connect.
    pub fn admit(&self, node: &NodeName, identity: &[u8; KEY_LEN]) -> Result<(), Admission> {
        if let Some(m) = &*self.members.lock().unwrap_or_else(|e| e.into_inner())
            && !m.contains(node)
        {
            return Err(Admission::NotMember(node.clone()));
        }
        match self
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
        {
            Some(k) if k != identity => Err(Admission::KeyMismatch(node.clone())),
            Some(_) => Ok(()),
            None if self.require_keys.load(std::sync::atomic::Ordering::Relaxed) => {
                Err(Admission::NoPublishedKey(node.clone()))
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> NodeName {
        NodeName::new(s).expect("name")
    }

    #[test]
    fn macs_agree_only_between_holders_of_the_same_secret() {
        let a = ClusterKeys::from_secret(b"correct horse battery staple").expect("a");
        let a2 = ClusterKeys::from_secret(b"correct horse battery staple\n").expect("a2");
        let b = ClusterKeys::from_secret(b"another secret entirely").expect("b");
        let tag = a.mac(&[b"x", b"y"]);
        assert!(a2.verify(&[b"xy"], &tag));
        assert!(!b.verify(&[b"xy"], &tag));
        assert!(!a.verify(&[b"xz"], &tag));
        assert_ne!(a.psk(), b.psk());
        assert_ne!(&a.mac(&[]), a.psk(), "hmac and psk keys are separate");
    }

    #[test]
    fn an_empty_secret_is_refused() {
        assert!(matches!(
            ClusterKeys::from_secret(b""),
            Err(SecretError::Empty)
        ));
        assert!(matches!(
            ClusterKeys::from_secret(b"\n"),
            Err(SecretError::Empty)
        ));
    }

    #[test]
    fn directory_admits_members_with_their_published_key() {
        let d = PeerDirectory::default();
        assert_eq!(
            d.admit(&name("x"), &[1; 32]),
            Ok(()),
            "open until the first member list"
        );
        d.set_members([name("a"), name("b")]);
        d.set_key(name("b"), [2; 32]);
        assert_eq!(d.admit(&name("a"), &[1; 32]), Ok(()));
        assert_eq!(d.admit(&name("b"), &[2; 32]), Ok(()));
        assert_eq!(
            d.admit(&name("b"), &[1; 32]),
            Err(Admission::KeyMismatch(name("b")))
        );
        assert_eq!(
            d.admit(&name("x"), &[1; 32]),
            Err(Admission::NotMember(name("x")))
        );
        d.require_published_keys(true);
        assert_eq!(
            d.admit(&name("a"), &[1; 32]),
            Err(Admission::NoPublishedKey(name("a")))
        );
        d.replace_keys([(name("a"), [1; 32])]);
        assert_eq!(d.admit(&name("a"), &[1; 32]), Ok(()));
        assert_eq!(
            d.admit(&name("b"), &[2; 32]),
            Err(Admission::NoPublishedKey(name("b"))),
            "b's key withdrawn"
        );
    }
}
