//! The node's long-term Ed25519 identity: generated on first start, kept as a PKCS#8 document
//! in the state dir (mode 0600, written atomically), the same key across agent restarts. It
//! only signs handshake transcripts; it never encrypts anything.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use ring::rand::SecureRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use thiserror::Error;

use crate::wire::{KEY_LEN, SIG_LEN};

/// File name of the identity in the state dir.
pub const IDENTITY_FILE: &str = "mesh-identity.pk8";

/// Failure to load or create the identity.
#[derive(Debug, Error)]
pub enum IdentityError {
    /// Reading or writing the key file.
    #[error("identity file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not an Ed25519 PKCS#8 document.
    #[error("identity file {0} is not an Ed25519 PKCS#8 key")]
    Corrupt(PathBuf),
    /// The random generator failed.
    #[error("could not generate an identity key")]
    Generate,
}

/// This node's signing key.
#[derive(Debug)]
pub struct Identity {
    key: Ed25519KeyPair,
}

impl Identity {
    /// Loads `state_dir/mesh-identity.pk8`, or generates and persists it if it does not exist.
    pub fn load_or_generate(
        state_dir: &Path,
        rng: &dyn SecureRandom,
    ) -> Result<Identity, IdentityError> {
        let path = state_dir.join(IDENTITY_FILE);
        let io = |source| IdentityError::Io {
            path: path.clone(),
            source,
        };
        match fs::read(&path) {
            Ok(doc) => {
                let mode = fs::metadata(&path).map_err(io)?.permissions().mode();
                if mode & 0o077 != 0 {
                    tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "mesh identity key is readable by group or others");
                }
                let key = Ed25519KeyPair::from_pkcs8(&doc)
                    .map_err(|_| IdentityError::Corrupt(path.clone()))?;
                Ok(Identity { key })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let doc =
                    Ed25519KeyPair::generate_pkcs8(rng).map_err(|_| IdentityError::Generate)?;
                fs::create_dir_all(state_dir).map_err(io)?;
                write_atomically(&path, doc.as_ref()).map_err(io)?;
                tracing::info!(path = %path.display(), "generated the mesh identity key");
                let key = Ed25519KeyPair::from_pkcs8(doc.as_ref())
                    .map_err(|_| IdentityError::Corrupt(path.clone()))?;
                Ok(Identity { key })
            }
            Err(e) => Err(io(e)),
        }
    }

    /// A key that lives only in memory (tests, benchmarks).
    pub fn ephemeral(rng: &dyn SecureRandom) -> Result<Identity, IdentityError> {
        let doc = Ed25519KeyPair::generate_pkcs8(rng).map_err(|_| IdentityError::Generate)?;
        let key = Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|_| IdentityError::Generate)?;
        Ok(Identity { key })
    }

    /// The public key peers verify with.
    pub fn public_key(&self) -> [u8; KEY_LEN] {
        let mut k = [0; KEY_LEN];
        k.copy_from_slice(self.key.public_key().as_ref());
        k
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; SIG_LEN] {
        let mut s = [0; SIG_LEN];
        s.copy_from_slice(self.key.sign(message).as_ref());
        s
    }
}

/// Whether `signature` is `public_key`'s over `message`.
pub fn verify(public_key: &[u8; KEY_LEN], message: &[u8], signature: &[u8; SIG_LEN]) -> bool {
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(message, signature)
        .is_ok()
}

/// Writes `path` through a temporary file: create 0600, write, fsync, rename, fsync the dir.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    pub(crate) fn scratch_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("weft-mesh-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn identity_is_generated_once_and_kept_across_restarts() {
        let dir = scratch_dir("identity");
        let rng = SystemRandom::new();
        let first = Identity::load_or_generate(&dir, &rng).expect("generate");
        let mode = fs::metadata(dir.join(IDENTITY_FILE))
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = Identity::load_or_generate(&dir, &rng).expect("load");
        assert_eq!(first.public_key(), again.public_key());
        let sig = again.sign(b"transcript");
        assert!(verify(&first.public_key(), b"transcript", &sig));
        assert!(!verify(&first.public_key(), b"other", &sig));
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_corrupt_identity_file_is_an_error_not_a_new_key() {
        let dir = scratch_dir("corrupt");
        fs::create_dir_all(&dir).expect("dir");
        fs::write(dir.join(IDENTITY_FILE), b"garbage").expect("write");
        let err = Identity::load_or_generate(&dir, &SystemRandom::new()).expect_err("corrupt");
        assert!(matches!(err, IdentityError::Corrupt(_)), "{err}");
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
