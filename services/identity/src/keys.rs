//! Signing keys, shared by every identity replica through the database.
//!
//! The keys live in the `signing_keys` table, numbered like Keystone's Fernet
//! key repository: `0` is the staged key, the highest index the primary, the
//! rest are secondaries. Only the primary signs; every key verifies, so the
//! staged key is known to every verifier before it starts signing.
//!
//! A private key never sits in a table column in the clear: each is sealed
//! with ChaCha20-Poly1305 under a 256-bit **key-encryption key** (KEK) that
//! every replica reads from its own file (mode 0600, refused if group or
//! others may read it), with the key's public half as associated data. The
//! database alone (a dump, a backup, a read-only SQL user) yields no key that
//! signs; the KEK file alone yields nothing either. See the README for the
//! threat model.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use deadpool_postgres::GenericClient;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use token::SigningKey;

use runtime::error::{Error, Result};

use crate::repo;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Staged,
    Primary,
    Secondary,
}

pub struct Key {
    pub index: i32,
    pub state: KeyState,
    pub key: SigningKey,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::internal(format!("{what} {}: {e}", path.display()))
}

/// The key-encryption key that seals private signing keys at rest.
pub struct Kek {
    key: LessSafeKey,
    path: PathBuf,
}

const NONCE_LEN: usize = 12;

impl Kek {
    /// Reads the KEK file (64 hex digits), creating it with a fresh random
    /// key (mode 0600, in a 0700 directory) if it does not exist. A file
    /// that group or others may access is refused.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
            && !dir.exists()
        {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| io("create key directory", dir, e))?;
        }
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| Error::internal("no randomness for the key-encryption key"))?;
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(mut f) => {
                f.write_all(hex::encode(bytes).as_bytes())
                    .and_then(|()| f.sync_all())
                    .map_err(|e| io("write key-encryption key", path, e))?;
                tracing::info!(path = %path.display(), "created a new key-encryption key");
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io("create key-encryption key", path, e)),
        }
        let meta = fs::metadata(path).map_err(|e| io("read key-encryption key", path, e))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(Error::internal(format!(
                "key-encryption key {} is accessible to group or others (mode {:o}); chmod 600 it",
                path.display(),
                meta.permissions().mode() & 0o777
            )));
        }
        let text = fs::read_to_string(path).map_err(|e| io("read key-encryption key", path, e))?;
        let bytes = hex::decode(text.trim())
            .ok()
            .filter(|b| b.len() == 32)
            .ok_or_else(|| {
                Error::internal(format!(
                    "key-encryption key {} is not 64 hex digits",
                    path.display()
                ))
            })?;
        let key = UnboundKey::new(&aead::CHACHA20_POLY1305, &bytes)
            .map_err(|_| Error::internal("key-encryption key rejected"))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            path: path.to_path_buf(),
        })
    }

    /// nonce || ciphertext || tag, bound to `aad`.
    fn seal(&self, secret: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| Error::internal("no randomness for a nonce"))?;
        let mut buf = secret.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .map_err(|_| Error::internal("sealing a signing key failed"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(out)
    }

    fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        let wrong = || {
            Error::internal(format!(
                "a signing key in the database does not open with the key-encryption key {} \
                 (every replica needs the same file: copy it from a running replica)",
                self.path.display()
            ))
        };
        if sealed.len() < NONCE_LEN {
            return Err(wrong());
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| wrong())?;
        let mut buf = ct.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .map_err(|_| wrong())?;
        Ok(plain.to_vec())
    }
}

/// The associated data of a sealed key: what it must open as.
fn aad(public_key: &[u8]) -> Vec<u8> {
    let mut a = b"cirrus-identity-signing-key:".to_vec();
    a.extend_from_slice(public_key);
    a
}

async fn insert_new(c: &impl GenericClient, kek: &Kek, index: i32) -> Result<()> {
    let key =
        SigningKey::generate().map_err(|e| Error::internal(format!("key generation: {e}")))?;
    insert(c, kek, index, &key).await
}

async fn insert(c: &impl GenericClient, kek: &Kek, index: i32, key: &SigningKey) -> Result<()> {
    let sealed = kek.seal(key.secret_bytes(), &aad(key.public_key()))?;
    repo::insert_signing_key(c, index, key.public_key(), &sealed).await
}

/// Keys of the former per-replica key directory (files named by index,
/// holding the hex secret), imported once so that tokens signed before the
/// upgrade keep verifying.
fn legacy_keys(dir: &Path) -> Result<Vec<(i32, SigningKey)>> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io("read", dir, e))?;
        let Some(index) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let path = entry.path();
        let text = fs::read_to_string(&path).map_err(|e| io("read key", &path, e))?;
        let key = hex::decode(text.trim())
            .ok()
            .and_then(|b| SigningKey::from_secret_bytes(&b).ok())
            .ok_or_else(|| Error::internal(format!("key file {} is corrupt", path.display())))?;
        out.push((index, key));
    }
    Ok(out)
}

/// Makes sure the shared key set exists: the first replica to start on an
/// empty table imports its legacy key directory or makes a staged and a
/// primary key; the table lock makes concurrent starts agree on one set.
pub async fn ensure(tx: &impl GenericClient, kek: &Kek, legacy_dir: &Path) -> Result<()> {
    repo::lock_signing_keys(tx).await?;
    if !repo::signing_keys(tx).await?.is_empty() {
        return Ok(());
    }
    let legacy = legacy_keys(legacy_dir)?;
    if legacy.iter().any(|(i, _)| *i == 0) && legacy.iter().any(|(i, _)| *i > 0) {
        for (index, key) in &legacy {
            insert(tx, kek, *index, key).await?;
        }
        tracing::info!(dir = %legacy_dir.display(), keys = legacy.len(), "imported the key directory into the shared key set");
    } else {
        insert_new(tx, kek, 0).await?;
        insert_new(tx, kek, 1).await?;
    }
    Ok(())
}

/// Every key, staged first and primary last, opened with the KEK.
pub async fn load(c: &impl GenericClient, kek: &Kek) -> Result<Vec<Key>> {
    let rows = repo::signing_keys(c).await?;
    let primary = rows.iter().map(|r| r.0).max().unwrap_or(0);
    if primary == 0 {
        return Err(Error::internal("the shared key set has no primary key"));
    }
    rows.into_iter()
        .map(|(index, public, sealed)| {
            let secret = kek.open(&sealed, &aad(&public))?;
            let key = SigningKey::from_secret_bytes(&secret)
                .ok()
                .filter(|k| k.public_key() == public.as_slice())
                .ok_or_else(|| Error::internal(format!("signing key {index} is corrupt")))?;
            let state = match index {
                0 => KeyState::Staged,
                i if i == primary => KeyState::Primary,
                _ => KeyState::Secondary,
            };
            Ok(Key { index, state, key })
        })
        .collect()
}

/// In a transaction: the staged key becomes primary, a new staged key is
/// made, and the oldest secondaries beyond `max_active` are removed. The
/// table lock serialises rotations made through different replicas.
pub async fn rotate(tx: &impl GenericClient, kek: &Kek, max_active: usize) -> Result<()> {
    repo::lock_signing_keys(tx).await?;
    let indexes: Vec<i32> = repo::signing_keys(tx)
        .await?
        .into_iter()
        .map(|r| r.0)
        .collect();
    let next = indexes.iter().copied().max().unwrap_or(0) + 1;
    repo::renumber_signing_key(tx, 0, next).await?;
    insert_new(tx, kek, 0).await?;
    let mut secondaries: Vec<i32> = indexes.into_iter().filter(|i| *i != 0).collect();
    secondaries.sort_unstable();
    while secondaries.len() + 2 > max_active {
        let oldest = secondaries.remove(0);
        repo::delete_signing_key(tx, oldest).await?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_kek_is_made_0600_refused_when_wider_and_seals_bound_to_the_public_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/kek");
        let kek = Kek::load_or_create(&path).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);

        let key = SigningKey::generate().unwrap();
        let sealed = kek
            .seal(key.secret_bytes(), &aad(key.public_key()))
            .unwrap();
        assert!(
            !sealed.windows(32).any(|w| w == &key.secret_bytes()[..32]),
            "the seed is not in the sealed bytes"
        );
        // The same file opens it again; another row's public key does not.
        let again = Kek::load_or_create(&path).unwrap();
        assert_eq!(
            again.open(&sealed, &aad(key.public_key())).unwrap(),
            key.secret_bytes()
        );
        let other = SigningKey::generate().unwrap();
        assert!(again.open(&sealed, &aad(other.public_key())).is_err());
        // Another KEK does not open it, and says which file to copy.
        let stranger = Kek::load_or_create(&dir.path().join("other")).unwrap();
        let e = stranger.open(&sealed, &aad(key.public_key())).unwrap_err();
        assert!(
            e.internal_detail()
                .unwrap()
                .contains("copy it from a running replica"),
            "{e:?}"
        );

        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let e = Kek::load_or_create(&path).err().unwrap();
        assert!(e.internal_detail().unwrap().contains("chmod 600"), "{e:?}");
    }
}
