//! What the nouns of the wave-2 services share: a channel to a service's
//! public endpoint found through the catalog (TLS with the cluster CA, the
//! certificate checked against the service's mesh name), and the lookups
//! that turn a name into exactly one resource (none or several: one clear
//! line).

use anyhow::{Context as _, bail};
use proto::identity::v1 as idpb;
use tonic::Request;
use tonic::transport::Channel;

use crate::session::{Ctx, Profile, Session, channel};

/// The catalog names (or types) a service is registered under, in order of preference.
pub const COMPUTE: &[&str] = &["compute-api", "compute"];
pub const NETWORK: &[&str] = &["network"];
pub const VOLUME: &[&str] = &["volume"];
pub const IMAGE: &[&str] = &["image"];

/// A session with identity plus a channel to one other service.
pub struct Api {
    pub s: Session,
    pub ch: Channel,
    profile: Profile,
}

impl Api {
    /// Logs in (or reuses the cached token) and connects to `service`'s public endpoint.
    pub async fn open(ctx: &Ctx<'_>, service: &[&str]) -> anyhow::Result<Self> {
        let profile = ctx.profile()?;
        let s = Session::open(&profile, ctx.profile_path).await?;
        let ch = connect(&s, &profile, service).await?;
        Ok(Self { s, ch, profile })
    }

    /// A channel to another service, with the same credentials.
    pub async fn other(&self, service: &[&str]) -> anyhow::Result<Channel> {
        connect(&self.s, &self.profile, service).await
    }

    pub fn req<T>(&self, msg: T) -> Request<T> {
        self.s.req(msg)
    }
}

/// The public URL of the first of `names` the catalog lists, and that service's name.
pub async fn public_url(s: &Session, names: &[&str]) -> anyhow::Result<(String, String)> {
    let req = s.req(idpb::GetCatalogRequest {});
    let cat = s.catalog().get_catalog(req).await?.into_inner().catalog;
    for want in names {
        let found = cat.iter().find(|c| c.name == *want || c.r#type == *want);
        if let Some(svc) = found {
            let e = svc
                .endpoints
                .iter()
                .find(|e| e.interface == idpb::Interface::Public as i32)
                .with_context(|| format!("the catalog's {want} service has no public endpoint"))?;
            return Ok((e.url.clone(), svc.name.clone()));
        }
    }
    bail!(
        "the catalog has no {} service (is it running? `cirrus catalog` lists what is)",
        names[0]
    )
}

async fn connect(s: &Session, profile: &Profile, names: &[&str]) -> anyhow::Result<Channel> {
    let (url, name) = public_url(s, names).await?;
    let mut p = profile.clone();
    p.url = url;
    p.server_name = name;
    // The public endpoint is server-TLS: no client certificate.
    p.client_cert.clear();
    p.client_key.clear();
    channel(&p).await
}

/// Exactly one of `items` whose id or name is `wanted`: an id wins; a name
/// held by none or by several is one clear error.
pub fn pick<T>(
    kind: &str,
    wanted: &str,
    items: Vec<T>,
    id: impl Fn(&T) -> &str,
    name: impl Fn(&T) -> &str,
) -> anyhow::Result<T> {
    let mut by_name = Vec::new();
    for item in items {
        if id(&item) == wanted {
            return Ok(item);
        }
        if name(&item) == wanted {
            by_name.push(item);
        }
    }
    match by_name.len() {
        0 => bail!("NOT_FOUND: no {kind} named {wanted:?}"),
        1 => Ok(by_name.remove(0)),
        n => {
            let ids: Vec<&str> = by_name.iter().map(&id).collect();
            bail!(
                "{n} {kind}s are named {wanted:?} ({}): give an id",
                ids.join(", ")
            )
        }
    }
}

/// An image's id from its id or name (through the image service).
pub async fn image_id(api: &Api, image: &str) -> anyhow::Result<String> {
    use proto::image::v1 as ipb;
    if crate::common::is_id(image) {
        return Ok(image.to_string());
    }
    let mut c = ipb::images_client::ImagesClient::new(api.other(IMAGE).await?);
    let r = api.req(ipb::ListImagesRequest {
        name: Some(image.to_string()),
        limit: 1000,
        ..Default::default()
    });
    let list = c.list_images(r).await?.into_inner().images;
    Ok(pick("image", image, list, |i| &i.id, |i| &i.name)?.id)
}

/// `VOLUME_STATUS_IN_USE` → `in-use`, as OpenStack prints statuses.
pub fn enum_name(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
        .replace('_', "-")
}

/// `k=v` pairs into a map.
pub fn pairs(
    items: &[String],
    what: &str,
) -> anyhow::Result<std::collections::HashMap<String, String>> {
    items
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("{what} must be KEY=VALUE, not {kv:?}"))
        })
        .collect()
}

/// Joins values for one cell.
pub fn join<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> String {
    items
        .into_iter()
        .map(|s| s.as_ref().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn items() -> Vec<(String, String)> {
        [("1", "a"), ("2", "b"), ("3", "b")]
            .iter()
            .map(|(i, n)| (i.to_string(), n.to_string()))
            .collect()
    }

    #[test]
    fn a_name_resolves_to_one_or_fails_clearly() {
        let f = |w: &str| pick("network", w, items(), |x| &x.0, |x| &x.1);
        assert_eq!(f("a").unwrap().0, "1");
        assert_eq!(f("3").unwrap().0, "3");
        let none = f("zz").unwrap_err().to_string();
        assert_eq!(none, "NOT_FOUND: no network named \"zz\"");
        let two = f("b").unwrap_err().to_string();
        assert!(two.contains("2 networks are named \"b\" (2, 3)"), "{two}");
    }

    #[test]
    fn statuses_print_as_openstack() {
        assert_eq!(
            enum_name("VOLUME_STATUS_IN_USE", "VOLUME_STATUS_"),
            "in-use"
        );
    }
}
