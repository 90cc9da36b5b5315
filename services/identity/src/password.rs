//! Password hashing with argon2id, off the async runtime's threads.

use argon2::password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash};
use argon2::{Algorithm, Argon2, Params, Version};
use serde::{Deserialize, Serialize};

use runtime::error::{Error, Result};

/// argon2id cost; the defaults are OWASP's minimum (m = 19 MiB, t = 2, p = 1).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HashParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for HashParams {
    fn default() -> Self {
        Self {
            memory_kib: 19 * 1024,
            iterations: 2,
            parallelism: 1,
        }
    }
}

#[derive(Clone)]
pub struct Hasher {
    argon: Argon2<'static>,
    /// Verified against when the user does not exist, so that an unknown user
    /// costs the same time as a wrong password.
    dummy_hash: String,
}

impl Hasher {
    pub fn new(p: HashParams) -> Result<Self> {
        let params = Params::new(p.memory_kib, p.iterations, p.parallelism, None)
            .map_err(|e| Error::invalid("password_hash", format!("argon2 parameters: {e}")))?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let dummy_hash = argon
            .hash_password(b"cirrus-dummy-password")
            .map_err(|e| Error::internal(format!("argon2: {e}")))?
            .to_string();
        Ok(Self { argon, dummy_hash })
    }

    pub async fn hash(&self, password: &str) -> Result<String> {
        let argon = self.argon.clone();
        let password = password.to_owned();
        tokio::task::spawn_blocking(move || {
            argon
                .hash_password(password.as_bytes())
                .map(|h| h.to_string())
                .map_err(|e| Error::internal(format!("argon2: {e}")))
        })
        .await
        .map_err(|e| Error::internal(format!("hash task: {e}")))?
    }

    /// True when `password` matches `hash`; with no hash, burns the same time and says false.
    pub async fn verify(&self, password: &str, hash: Option<&str>) -> Result<bool> {
        let argon = self.argon.clone();
        let known = hash.is_some();
        let hash = hash.unwrap_or(&self.dummy_hash).to_owned();
        let password = password.to_owned();
        let ok = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash)
                .map(|parsed| argon.verify_password(password.as_bytes(), &parsed).is_ok())
                .unwrap_or(false)
        })
        .await
        .map_err(|e| Error::internal(format!("verify task: {e}")))?;
        Ok(known && ok)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_verify_and_differ() {
        let h = Hasher::new(HashParams {
            memory_kib: 1024,
            iterations: 1,
            parallelism: 1,
        })
        .unwrap();
        let a = h.hash("s3cret").await.unwrap();
        let b = h.hash("s3cret").await.unwrap();
        assert_ne!(a, b, "salted");
        assert!(a.starts_with("$argon2id$"));
        assert!(h.verify("s3cret", Some(&a)).await.unwrap());
        assert!(!h.verify("wrong", Some(&a)).await.unwrap());
        assert!(!h.verify("s3cret", None).await.unwrap());
        assert!(!h.verify("s3cret", Some("garbage")).await.unwrap());
    }
}
