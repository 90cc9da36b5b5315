//! The signing key repository, kept like Keystone's Fernet key repository: a
//! directory (mode 0700) of key files (mode 0600) named by index. `0` is the
//! staged key, the highest index is the primary, the rest are secondaries.
//! Only the primary signs; every key verifies, so the staged key is already
//! known to every verifier before it starts signing.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use token::SigningKey;

use runtime::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Staged,
    Primary,
    Secondary,
}

pub struct Key {
    pub index: u32,
    pub state: KeyState,
    pub key: SigningKey,
}

pub struct KeyRepository {
    dir: PathBuf,
    /// How many keys to keep: staged + primary + secondaries (at least 3).
    max_active: usize,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::internal(format!("{what} {}: {e}", path.display()))
}

impl KeyRepository {
    /// Opens the repository, creating it with a staged and a primary key if empty.
    pub fn open(dir: &Path, max_active: usize) -> Result<Self> {
        if max_active < 3 {
            return Err(Error::invalid(
                "max_active_keys",
                "must be at least 3 (staged, primary, secondary)",
            ));
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io("create key directory", dir, e))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| io("restrict key directory", dir, e))?;
        let repo = Self {
            dir: dir.to_path_buf(),
            max_active,
        };
        if repo.indexes()?.is_empty() {
            repo.write_new(0)?;
            repo.write_new(1)?;
        }
        Ok(repo)
    }

    fn indexes(&self) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(|e| io("read", &self.dir, e))? {
            let entry = entry.map_err(|e| io("read", &self.dir, e))?;
            if let Some(i) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            {
                out.push(i);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    fn path(&self, index: u32) -> PathBuf {
        self.dir.join(index.to_string())
    }

    /// Writes a fresh key to `index` through a temporary file, so a crash
    /// never leaves a half-written key.
    fn write_new(&self, index: u32) -> Result<()> {
        let key =
            SigningKey::generate().map_err(|e| Error::internal(format!("key generation: {e}")))?;
        let tmp = self.dir.join(format!(".tmp-{index}"));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io("write key", &tmp, e))?;
        f.write_all(hex::encode(key.secret_bytes()).as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| io("write key", &tmp, e))?;
        fs::rename(&tmp, self.path(index)).map_err(|e| io("install key", &tmp, e))
    }

    /// Every key, staged first and primary last.
    pub fn load(&self) -> Result<Vec<Key>> {
        let indexes = self.indexes()?;
        let primary = indexes.iter().copied().max().unwrap_or(0);
        if primary == 0 {
            return Err(Error::internal(format!(
                "key repository {} has no primary key",
                self.dir.display()
            )));
        }
        indexes
            .into_iter()
            .map(|index| {
                let path = self.path(index);
                let text = fs::read_to_string(&path).map_err(|e| io("read key", &path, e))?;
                let bytes = hex::decode(text.trim()).map_err(|_| {
                    Error::internal(format!("key file {} is corrupt", path.display()))
                })?;
                let key = SigningKey::from_secret_bytes(&bytes).map_err(|_| {
                    Error::internal(format!("key file {} is corrupt", path.display()))
                })?;
                let state = match index {
                    0 => KeyState::Staged,
                    i if i == primary => KeyState::Primary,
                    _ => KeyState::Secondary,
                };
                Ok(Key { index, state, key })
            })
            .collect()
    }

    /// The staged key becomes primary, a new staged key is made, and the
    /// oldest secondaries beyond `max_active` are removed.
    pub fn rotate(&self) -> Result<()> {
        let indexes = self.indexes()?;
        let next = indexes.iter().copied().max().unwrap_or(0) + 1;
        fs::rename(self.path(0), self.path(next))
            .map_err(|e| io("promote staged key", &self.path(0), e))?;
        self.write_new(0)?;
        let mut secondaries: Vec<u32> = self
            .indexes()?
            .into_iter()
            .filter(|i| *i != 0 && *i != next)
            .collect();
        while secondaries.len() + 2 > self.max_active {
            let oldest = secondaries.remove(0);
            fs::remove_file(self.path(oldest))
                .map_err(|e| io("remove key", &self.path(oldest), e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn setup_rotate_and_prune() {
        let dir = tempfile::tempdir().unwrap();
        let repo = KeyRepository::open(dir.path(), 3).unwrap();
        let keys = repo.load().unwrap();
        assert_eq!(
            keys.iter().map(|k| k.state).collect::<Vec<_>>(),
            [KeyState::Staged, KeyState::Primary]
        );
        let staged_id = keys[0].key.key_id().to_string();
        let first_primary = keys[1].key.key_id().to_string();

        repo.rotate().unwrap();
        let keys = repo.load().unwrap();
        assert_eq!(keys.len(), 3);
        let primary = keys.iter().find(|k| k.state == KeyState::Primary).unwrap();
        assert_eq!(primary.key.key_id(), staged_id, "staged key became primary");
        assert!(
            keys.iter()
                .any(|k| k.state == KeyState::Secondary && k.key.key_id() == first_primary)
        );

        repo.rotate().unwrap();
        let keys = repo.load().unwrap();
        assert_eq!(keys.len(), 3, "oldest secondary pruned");
        assert!(keys.iter().all(|k| k.key.key_id() != first_primary));

        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(dir.path()), 0o700);
        for k in keys {
            assert_eq!(mode(&dir.path().join(k.index.to_string())), 0o600);
        }
    }
}
