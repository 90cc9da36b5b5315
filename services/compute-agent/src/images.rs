//! The host's image cache (Nova's `_base`): each image's bytes downloaded
//! once from the image service into `<state_dir>/images/<sha256>`, checked
//! against the SHA-256 the image service recorded, and shared read-only by
//! every server's qcow2 overlay. Concurrent builds of one image wait on one
//! download (a lock per checksum). The cache has a size bound: after each
//! download the least recently used bases that no server's overlay uses are
//! removed until the cache fits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use proto::image::v1 as ipb;
use proto::image::v1::images_client::ImagesClient;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::clients::{Services, refused, req};

/// A base in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    pub path: PathBuf,
    /// `qcow2`, `raw`, `aki`, `ari` (as the image service records it).
    pub format: String,
    pub sha256: String,
    pub properties: HashMap<String, String>,
}

pub struct ImageCache {
    dir: PathBuf,
    max_bytes: u64,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn format_name(f: i32) -> &'static str {
    match ipb::DiskFormat::try_from(f).unwrap_or(ipb::DiskFormat::Unspecified) {
        ipb::DiskFormat::Qcow2 => "qcow2",
        ipb::DiskFormat::Aki => "aki",
        ipb::DiskFormat::Ari => "ari",
        ipb::DiskFormat::Iso => "iso",
        ipb::DiskFormat::Raw | ipb::DiskFormat::Unspecified => "raw",
    }
}

impl ImageCache {
    pub fn new(dir: PathBuf, max_bytes: u64) -> Self {
        Self {
            dir,
            max_bytes,
            locks: Mutex::new(HashMap::new()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock_of(&self, sha: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, l| Arc::strong_count(l) > 1);
        m.entry(sha.to_string()).or_default().clone()
    }

    /// The image's base in the cache, downloaded if missing. `in_use` lists
    /// the bases that must survive an eviction this call triggers.
    pub async fn fetch(
        &self,
        services: &Services,
        token: Option<&str>,
        image_id: &str,
        in_use: impl FnOnce() -> Vec<PathBuf>,
    ) -> Result<Cached, String> {
        let channel = services
            .image
            .clone()
            .ok_or("no image service: the agent has no sidecar_outbound")?;
        let mut client = ImagesClient::new(channel).max_decoding_message_size(4 * 1024 * 1024);
        let image = client
            .get_image(req(
                ipb::GetImageRequest {
                    id: image_id.to_string(),
                },
                token,
                services,
            ))
            .await
            .map_err(|s| refused(&format!("image {image_id}"), &s, token))?
            .into_inner();
        if image.status != ipb::Status::Active as i32 {
            return Err(format!("image {image_id} is not active"));
        }
        let sha = image.sha256.to_ascii_lowercase();
        if sha.len() != 64 || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!("image {image_id} has no checksum"));
        }
        let cached = Cached {
            path: self.dir.join(&sha),
            format: format_name(image.disk_format).to_string(),
            sha256: sha.clone(),
            properties: image.properties.clone(),
        };
        let lock = self.lock_of(&sha);
        let _held = lock.lock().await;
        if tokio::fs::metadata(&cached.path).await.is_ok() {
            touch(&cached.path);
            return Ok(cached);
        }
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(|e| format!("image cache: {e}"))?;
        open_dir(&self.dir);
        let tmp = self.dir.join(format!("{sha}.part"));
        let result = self
            .download(&mut client, services, token, image_id, &sha, &tmp)
            .await;
        if let Err(e) = result {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        tokio::fs::rename(&tmp, &cached.path)
            .await
            .map_err(|e| format!("image cache: {e}"))?;
        let mut keep = in_use();
        keep.push(cached.path.clone());
        self.evict(&keep).await;
        Ok(cached)
    }

    async fn download(
        &self,
        client: &mut ImagesClient<runtime::trace::Channel>,
        services: &Services,
        token: Option<&str>,
        image_id: &str,
        sha: &str,
        tmp: &Path,
    ) -> Result<(), String> {
        let mut r = req(
            ipb::DownloadRequest {
                image_id: image_id.to_string(),
                offset: 0,
                length: None,
            },
            token,
            services,
        );
        // A whole image may take longer than one call's deadline.
        r.set_timeout(std::time::Duration::from_secs(3600));
        let mut stream = client
            .download(r)
            .await
            .map_err(|s| refused(&format!("download of image {image_id}"), &s, token))?
            .into_inner();
        let mut file = tokio::fs::File::create(tmp)
            .await
            .map_err(|e| format!("image cache: {e}"))?;
        let mut hash = Sha256::new();
        loop {
            let chunk = tokio::time::timeout(crate::clients::CALL_TIMEOUT, stream.message())
                .await
                .map_err(|_| format!("download of image {image_id} stalled"))?
                .map_err(|s| refused(&format!("download of image {image_id}"), &s, token))?;
            let Some(chunk) = chunk else { break };
            hash.update(&chunk.data);
            file.write_all(&chunk.data)
                .await
                .map_err(|e| format!("image cache: {e}"))?;
        }
        file.flush()
            .await
            .map_err(|e| format!("image cache: {e}"))?;
        file.sync_all()
            .await
            .map_err(|e| format!("image cache: {e}"))?;
        let got = hex::encode(hash.finalize());
        if got != sha {
            return Err(format!(
                "image {image_id}: downloaded bytes have SHA-256 {got}, the image service says {sha}"
            ));
        }
        // QEMU runs as another user: bases are world-readable, never writable.
        set_mode(tmp, 0o444);
        Ok(())
    }

    /// Removes least recently used bases not in `keep` until the cache fits.
    pub async fn evict(&self, keep: &[PathBuf]) {
        let Ok(mut rd) = tokio::fs::read_dir(&self.dir).await else {
            return;
        };
        let mut entries = Vec::new();
        let mut total = 0u64;
        while let Ok(Some(e)) = rd.next_entry().await {
            let Ok(m) = e.metadata().await else { continue };
            if !m.is_file() || e.path().extension().is_some() {
                continue;
            }
            total += m.len();
            let used = m.modified().unwrap_or(std::time::UNIX_EPOCH);
            entries.push((used, m.len(), e.path()));
        }
        entries.sort();
        for (_, len, path) in entries {
            if total <= self.max_bytes {
                break;
            }
            if keep.contains(&path) {
                continue;
            }
            if tokio::fs::remove_file(&path).await.is_ok() {
                tracing::info!(base = %path.display(), "image cache: evicted");
                total -= len;
            }
        }
    }
}

/// Marks a base as just used (its mtime is the LRU clock).
fn touch(p: &Path) {
    if let Ok(f) = std::fs::File::options().append(true).open(p) {
        let _ = f.set_modified(std::time::SystemTime::now());
    } else if let Ok(f) = std::fs::File::open(p) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

pub fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
}

/// Directories QEMU (another user) must traverse.
pub fn open_dir(p: &Path) {
    set_mode(p, 0o755);
}

/// `qemu-img create -f qcow2 -b <base> -F <fmt> <overlay> [size]`, unless
/// the overlay exists (written beside, then renamed: a crash leaves no half).
pub async fn create_overlay(
    base: &Path,
    base_format: &str,
    overlay: &Path,
    size_gb: u32,
) -> Result<(), String> {
    if tokio::fs::metadata(overlay).await.is_ok() {
        return Ok(());
    }
    let tmp = overlay.with_extension("qcow2.tmp");
    let mut cmd = tokio::process::Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(base)
        .args(["-F", base_format])
        .arg(&tmp);
    if size_gb > 0 {
        let virtual_size = virtual_size(base).await.unwrap_or(0);
        let want = u64::from(size_gb) << 30;
        if want > virtual_size {
            cmd.arg(format!("{size_gb}G"));
        }
    }
    let out = cmd.output().await.map_err(|e| format!("qemu-img: {e}"))?;
    if !out.status.success() {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(format!(
            "qemu-img create: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    tokio::fs::rename(&tmp, overlay)
        .await
        .map_err(|e| format!("overlay: {e}"))
}

async fn virtual_size(p: &Path) -> Option<u64> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(p)
        .output()
        .await
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.get("virtual-size")?.as_u64()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn base(dir: &Path, name: &str, len: usize, age_s: u64) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, vec![0u8; len]).unwrap();
        let f = std::fs::File::options().append(true).open(&p).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(age_s))
            .unwrap();
        p
    }

    /// Over its bound, the cache drops the least recently used bases that no
    /// server stands on, and stops as soon as it fits.
    #[tokio::test]
    async fn eviction_drops_the_least_recently_used_unused_bases_until_it_fits() {
        let d = tempfile::tempdir().unwrap();
        let oldest = base(d.path(), &"a".repeat(64), 400, 300);
        let old_in_use = base(d.path(), &"b".repeat(64), 400, 200);
        let older = base(d.path(), &"c".repeat(64), 400, 100);
        let newest = base(d.path(), &"d".repeat(64), 400, 0);
        // A download in progress is never counted or removed.
        let part = base(d.path(), &format!("{}.part", "e".repeat(64)), 400, 500);
        let cache = ImageCache::new(d.path().to_path_buf(), 1000);
        cache.evict(std::slice::from_ref(&old_in_use)).await;
        assert!(!oldest.exists());
        assert!(old_in_use.exists());
        assert!(!older.exists());
        assert!(newest.exists());
        assert!(part.exists());
        // Within the bound nothing goes.
        cache.evict(&[]).await;
        assert!(old_in_use.exists() && newest.exists());
    }
}
