//! A hand-made HTTP/2 gRPC client (the `h2` crate, no tonic): it can do
//! what a well-behaved client library never does on purpose — reset a
//! stream with a reason of its choice, or send bytes that are no protobuf.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;

use bytes::Bytes;
use runtime::caller::Caller;
use tonic::Status;

/// One gRPC call on its own HTTP/2 connection.
pub struct RawCall {
    pub send: h2::SendStream<Bytes>,
    response: Option<h2::client::ResponseFuture>,
    conn: tokio::task::JoinHandle<()>,
}

impl RawCall {
    /// Opens `path` (`/package.Service/Method`) as `who`, headers only.
    pub async fn open(addr: SocketAddr, path: &str, who: &Caller) -> Self {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut client = client.ready().await.unwrap();
        let mut md = tonic::metadata::MetadataMap::new();
        who.to_metadata(&mut md);
        let mut req = http::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        req.headers_mut().extend(md.into_headers());
        let (response, send) = client.send_request(req, false).unwrap();
        Self {
            send,
            response: Some(response),
            conn,
        }
    }

    /// Sends one gRPC message (length-prefixed) made of `payload`.
    pub fn send_message(&mut self, payload: &[u8], end: bool) {
        self.send.reserve_capacity(payload.len() + 5);
        self.send.send_data(frame(payload), end).unwrap();
    }

    /// Resets the stream with `reason`, as a client that gives up would.
    pub fn reset(&mut self, reason: h2::Reason) {
        self.send.send_reset(reason);
    }

    /// The call's gRPC status: from the headers (trailers-only answer) or
    /// from the trailers after the body.
    pub async fn status(&mut self) -> Status {
        let resp = self.response.take().unwrap().await.unwrap();
        if let Some(s) = Status::from_header_map(resp.headers()) {
            return s;
        }
        let mut body = resp.into_body();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let trailers = body.trailers().await.unwrap().unwrap_or_default();
        Status::from_header_map(&trailers).unwrap_or_else(|| Status::unknown("no grpc-status"))
    }
}

impl Drop for RawCall {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

/// The gRPC length-prefixed framing of one uncompressed message.
pub fn frame(payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(payload.len() + 5);
    out.push(0);
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    out.extend_from_slice(payload);
    out.into()
}
