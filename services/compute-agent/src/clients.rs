//! The agent's calls to image, network and volume. They go through this
//! workload's sidecar by name (`http://image`, ...), which originates mTLS
//! with the agent's certificate. Each call carries the build's user token
//! (`authorization: Bearer`, from the cast, as Nova serialises the request
//! context into its RPC message) when there is one, so the target's sidecar
//! checks the user's roles and the service sees the user's project; without
//! one (an older cast, a heal, a delete after expiry) the call carries the
//! agent's own identity only, and a service that needs a user refuses it.

use std::time::Duration;

use runtime::trace::Channel;
use tonic::Request;

/// Every call to another service answers within this, or fails.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Services {
    pub image: Option<Channel>,
    pub network: Option<Channel>,
    pub volume: Option<Channel>,
    peer: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl Services {
    /// Through the sidecar at `outbound`; none without one (the test driver
    /// runs without image, network or volume).
    pub fn new(
        outbound: Option<impl Into<runtime::local::Outbound>>,
        spiffe_id: &str,
    ) -> Result<Self, String> {
        let outbound: Option<runtime::local::Outbound> = outbound.map(Into::into);
        let via = |name: &str| -> Result<Option<Channel>, String> {
            match &outbound {
                Some(out) => out.channel(name).map(Some),
                None => Ok(None),
            }
        };
        Ok(Self {
            image: via("image")?,
            network: via("network")?,
            volume: via("volume")?,
            peer: spiffe_id.parse().ok(),
        })
    }
}

/// A request with a deadline, the token (if any) and the agent's SPIFFE id
/// (the sidecar replaces it with the verified one).
pub fn req<T>(msg: T, token: Option<&str>, peer: &Services) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(CALL_TIMEOUT);
    if let Some(t) = token
        && let Ok(v) = format!("Bearer {t}").parse()
    {
        r.metadata_mut().insert("authorization", v);
    }
    if let Some(p) = &peer.peer {
        r.metadata_mut().insert(runtime::caller::PEER, p.clone());
    }
    r
}

/// A refusal in one line, with a hint when the call had no user token.
pub fn refused(what: &str, s: &tonic::Status, token: Option<&str>) -> String {
    let hint = if token.is_none()
        && matches!(
            s.code(),
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
        ) {
        " (the cast carried no user token: the call went with the agent's identity only)"
    } else {
        ""
    };
    format!("{what}: {:?}: {}{hint}", s.code(), s.message())
}
