//! compute-api's clients of image, network and volume: the create-time
//! checks Nova's API makes (the image exists, is visible to the caller,
//! active and fits the flavor; each network and port exists; each volume
//! exists and is available), made **as the caller**.
//!
//! How the caller travels (the volume service's pattern): the sidecar
//! verifies the client's bearer token and forwards the request with its
//! `authorization` header in place; compute-api sets that header on its own
//! call to `http://image` (network, volume) through its sidecar's outbound
//! listener, and the peer's sidecar verifies the same token and applies the
//! peer's policy and visibility. So a user may boot only what they may read.
//!
//! Each peer is named in `[peers]`: `"mesh"` (through `sidecar_outbound`,
//! by service name) or an `http://host:port` URL (no mesh, for tests and
//! development: the caller's verified `x-cirrus-*` headers are passed on,
//! playing the sidecar's part). A peer left unset is not consulted, and a
//! request that needs it is refused with `FAILED_PRECONDITION` naming the
//! setting — never accepted unchecked.

use std::collections::BTreeMap;
use std::time::Duration;

use proto::image::v1 as ipb;
use proto::network::v1 as npb;
use proto::volume::v1 as vpb;
use runtime::caller::Caller;
use runtime::error::{Error, Result};
use runtime::trace::Channel;
use serde::{Deserialize, Serialize};
use tonic::Code;
use uuid::Uuid;

/// Where image, network and volume are (`[peers]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeersConfig {
    /// `"mesh"` or `http://host:port`; unset: boots from images are refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Unset: servers asking for networks or ports are refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Unset: servers asking for volumes, and volume attachments, are refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// Deadline of one lookup.
    pub timeout_secs: u64,
}

impl Default for PeersConfig {
    fn default() -> Self {
        Self {
            image: None,
            network: None,
            volume: None,
            timeout_secs: 10,
        }
    }
}

impl PeersConfig {
    pub fn validate(&self, outbound: bool) -> std::result::Result<(), String> {
        if self.timeout_secs == 0 || self.timeout_secs > 300 {
            return Err("peers.timeout_secs must be between 1 and 300".into());
        }
        for (name, v) in [
            ("image", &self.image),
            ("network", &self.network),
            ("volume", &self.volume),
        ] {
            match v.as_deref() {
                None => {}
                Some("mesh") if !outbound => {
                    return Err(format!("peers.{name} = \"mesh\" needs sidecar_outbound"));
                }
                Some("mesh") => {}
                Some(u) if u.starts_with("http://") || u.starts_with("https://") => {}
                Some(u) => {
                    return Err(format!(
                        "peers.{name} must be \"mesh\" or an http:// URL, not {u:?}"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// What compute-api passes on of its caller: the verified identity (for
/// direct peers) and the bearer token (for everyone, and for the host).
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    pub caller: Caller,
    /// The bare token of the caller's `authorization: Bearer <token>`.
    pub token: String,
}

impl Credentials {
    /// From a request's metadata (the sidecar leaves `authorization` in place).
    pub fn from_metadata(m: &tonic::metadata::MetadataMap) -> Self {
        let token = m
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(|t| t.trim().to_string())
            .unwrap_or_default();
        Self {
            caller: Caller::from_metadata(m),
            token,
        }
    }
}

/// What a boot needs to know of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub id: Uuid,
    pub status: String,
    pub size: u64,
    pub min_disk_gb: u32,
    pub min_ram_mb: u32,
    pub properties: BTreeMap<String, String>,
}

#[derive(Clone)]
struct Peer {
    channel: Channel,
    direct: bool,
}

#[derive(Clone)]
pub struct Peers {
    image: Option<Peer>,
    network: Option<Peer>,
    volume: Option<Peer>,
    timeout: Duration,
}

fn peer(
    v: &Option<String>,
    outbound: Option<&runtime::local::Outbound>,
    name: &str,
) -> anyhow::Result<Option<Peer>> {
    Ok(match (v.as_deref(), outbound) {
        (None, _) => None,
        (Some("mesh"), Some(out)) => Some(Peer {
            channel: out.channel(name).map_err(anyhow::Error::msg)?,
            direct: false,
        }),
        (Some("mesh"), None) => anyhow::bail!("peers.{name} = \"mesh\" needs sidecar_outbound"),
        (Some(url), _) => Some(Peer {
            channel: runtime::trace::traced(
                tonic::transport::Endpoint::from_shared(url.to_string())?
                    .connect_timeout(Duration::from_secs(2))
                    .connect_lazy(),
            ),
            direct: true,
        }),
    })
}

fn unconfigured(what: &str, setting: &str) -> Error {
    Error::precondition(format!(
        "this cloud has no {what} service configured (compute-api [peers] {setting})"
    ))
}

impl Peers {
    pub fn new(
        cfg: &PeersConfig,
        outbound: Option<&runtime::local::Outbound>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            image: peer(&cfg.image, outbound, "image")?,
            network: peer(&cfg.network, outbound, "network")?,
            volume: peer(&cfg.volume, outbound, "volume")?,
            timeout: Duration::from_secs(cfg.timeout_secs),
        })
    }

    fn request<T>(&self, p: &Peer, msg: T, creds: &Credentials) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if p.direct {
            creds.caller.to_metadata(r.metadata_mut());
        }
        if !creds.token.is_empty()
            && let Ok(v) = format!("Bearer {}", creds.token).parse()
        {
            r.metadata_mut().insert("authorization", v);
        }
        r.set_timeout(self.timeout);
        r
    }

    /// The image, if the caller may see it (NOT_FOUND otherwise).
    pub async fn image(&self, creds: &Credentials, id: Uuid) -> Result<ImageInfo> {
        let p = self
            .image
            .as_ref()
            .ok_or_else(|| unconfigured("image", "image"))?;
        let req = self.request(p, ipb::GetImageRequest { id: id.to_string() }, creds);
        let i = ipb::images_client::ImagesClient::new(p.channel.clone())
            .get_image(req)
            .await
            .map_err(|s| from_status("image", "image", s, id))?
            .into_inner();
        let status = ipb::Status::try_from(i.status)
            .unwrap_or(ipb::Status::Unspecified)
            .as_str_name()
            .trim_start_matches("STATUS_")
            .to_ascii_lowercase();
        Ok(ImageInfo {
            id,
            status,
            size: i.size.unwrap_or(0),
            min_disk_gb: i.min_disk,
            min_ram_mb: i.min_ram,
            properties: i.properties.into_iter().collect(),
        })
    }

    /// Whether the network exists for the caller (NOT_FOUND otherwise).
    pub async fn network(&self, creds: &Credentials, id: Uuid) -> Result<()> {
        let p = self
            .network
            .as_ref()
            .ok_or_else(|| unconfigured("network", "network"))?;
        let req = self.request(p, npb::GetRequest { id: id.to_string() }, creds);
        npb::networks_client::NetworksClient::new(p.channel.clone())
            .get_network(req)
            .await
            .map_err(|s| from_status("network", "network", s, id))?;
        Ok(())
    }

    /// The port, if the caller may see it and no device holds it.
    pub async fn port(&self, creds: &Credentials, id: Uuid) -> Result<()> {
        let p = self
            .network
            .as_ref()
            .ok_or_else(|| unconfigured("network", "network"))?;
        let req = self.request(p, npb::GetRequest { id: id.to_string() }, creds);
        let port = npb::networks_client::NetworksClient::new(p.channel.clone())
            .get_port(req)
            .await
            .map_err(|s| from_status("network", "port", s, id))?
            .into_inner();
        if !port.device_id.is_empty() {
            return Err(Error::precondition(format!(
                "port {id} is in use by device {}",
                port.device_id
            )));
        }
        Ok(())
    }

    /// The volume's status (`available`, `in-use`, ...), if the caller may see it.
    pub async fn volume(&self, creds: &Credentials, id: Uuid) -> Result<String> {
        let p = self
            .volume
            .as_ref()
            .ok_or_else(|| unconfigured("volume", "volume"))?;
        let req = self.request(p, vpb::GetVolumeRequest { id: id.to_string() }, creds);
        let v = vpb::volumes_client::VolumesClient::new(p.channel.clone())
            .get_volume(req)
            .await
            .map_err(|s| from_status("volume", "volume", s, id))?
            .into_inner();
        Ok(vpb::VolumeStatus::try_from(v.status)
            .unwrap_or(vpb::VolumeStatus::Unspecified)
            .as_str_name()
            .trim_start_matches("VOLUME_STATUS_")
            .to_ascii_lowercase()
            .replace('_', "-"))
    }

    /// Refuses volume work early when no volume service is configured.
    pub fn require_volume(&self) -> Result<()> {
        self.volume
            .as_ref()
            .map(|_| ())
            .ok_or_else(|| unconfigured("volume", "volume"))
    }
}

/// A peer's answer, as compute-api's caller should see it.
fn from_status(service: &str, what: &'static str, s: tonic::Status, id: Uuid) -> Error {
    match s.code() {
        // What the caller may not read is, to it, missing.
        Code::NotFound | Code::PermissionDenied => Error::not_found(what, id),
        Code::Unauthenticated => {
            Error::unauthenticated(format!("{service} service: {}", s.message()))
        }
        _ => Error::unavailable(format!(
            "{service} service: {:?} {}",
            s.code(),
            runtime::types::short(s.message())
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_token_is_read_from_authorization() {
        let mut m = tonic::metadata::MetadataMap::new();
        m.insert("authorization", "Bearer abc.def".parse().unwrap());
        assert_eq!(Credentials::from_metadata(&m).token, "abc.def");
        let none = Credentials::from_metadata(&tonic::metadata::MetadataMap::new());
        assert_eq!(none.token, "");
    }

    #[test]
    fn a_peer_is_mesh_or_a_url() {
        let out: Option<std::net::SocketAddr> = Some("127.0.0.1:1".parse().unwrap());
        let cfg = |image: &str| PeersConfig {
            image: Some(image.into()),
            ..Default::default()
        };
        assert!(cfg("mesh").validate(out.is_some()).is_ok());
        assert!(cfg("http://127.0.0.1:9292").validate(false).is_ok());
        assert_eq!(
            cfg("mesh").validate(false),
            Err("peers.image = \"mesh\" needs sidecar_outbound".into())
        );
        assert_eq!(
            cfg("image").validate(out.is_some()),
            Err("peers.image must be \"mesh\" or an http:// URL, not \"image\"".into())
        );
    }
}
