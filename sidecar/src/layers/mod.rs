//! One module per concern of the request paths; [`crate::stack`] puts them
//! in order. Each exposes `layer(..)` and is tested with a stand-in inner
//! service (`tower::service_fn`), without TLS or sockets.

pub mod authenticate;
pub mod authorize;
pub mod deadline;
pub mod forward;
pub mod header_limit;
pub mod message_size;
pub mod method;
pub mod observe;
pub mod rescue;
pub mod resolve;
pub mod shed;
pub mod strip;
pub mod trusted;

/// Test helpers shared by the layers' unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    use bytes::Bytes;
    use http_body_util::Full;

    use crate::stack::{BoxBody, Req, Rsp};

    pub fn body(b: impl Into<Bytes>) -> BoxBody {
        BoxBody::new(Full::new(b.into()))
    }

    pub fn req(path: &str) -> Req {
        http::Request::builder()
            .uri(format!("http://svc{path}"))
            .body(body(Bytes::new()))
            .expect("request")
    }

    pub fn ok() -> Rsp {
        http::Response::new(body(Bytes::new()))
    }

    /// A gRPC message frame: flag 0, big-endian length, the bytes.
    pub fn frame(payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8];
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }
}
