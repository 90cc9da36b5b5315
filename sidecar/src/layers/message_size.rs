//! Watches the request stream's gRPC framing (a 5-byte prefix: flag and
//! big-endian length, then the message) without buffering anything, and
//! cuts the stream off at the first message over the limit (the rule's
//! `max_message_bytes` or the default) with `RESOURCE_EXHAUSTED`. A stream
//! that is not gRPC framing at all — a flag other than 0 or 1, or an end in
//! the middle of a message — is cut off with `INVALID_ARGUMENT`, so garbage
//! bytes get the same answer from the sidecar as from the service's codec.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use tower::{Layer, Service};

use super::authorize::Route;
use super::rescue::Refusal;
use crate::connector::BoxError;
use crate::stack::{BoxBody, Req, Rsp};

/// How a request stream broke gRPC framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// over the limit (the text is the rescue's, which knows the limit)
    #[error("request message over the size limit")]
    TooLarge,
    /// a compressed-flag byte other than 0 or 1
    #[error("request body is not gRPC framing: bad compressed flag")]
    BadFlag,
    /// the stream ended inside a message or its prefix
    #[error("request body ends inside a gRPC message")]
    Truncated,
}

impl FrameError {
    fn code(self) -> u8 {
        match self {
            FrameError::TooLarge => 1,
            FrameError::BadFlag => 2,
            FrameError::Truncated => 3,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(FrameError::TooLarge),
            2 => Some(FrameError::BadFlag),
            3 => Some(FrameError::Truncated),
            _ => None,
        }
    }
}

/// Finds gRPC message boundaries in a byte stream. Nothing is buffered.
#[derive(Debug)]
pub struct Framer {
    limit: usize,
    prefix: [u8; 5],
    prefix_len: usize,
    remaining: usize,
}

impl Framer {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            prefix: [0; 5],
            prefix_len: 0,
            remaining: 0,
        }
    }

    /// Walks `data`; an error as soon as a message breaks the rules.
    pub fn scan(&mut self, mut data: &[u8]) -> Result<(), FrameError> {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len());
                self.remaining -= n;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.prefix_len).min(data.len());
            self.prefix[self.prefix_len..self.prefix_len + n].copy_from_slice(&data[..n]);
            self.prefix_len += n;
            data = &data[n..];
            if self.prefix_len == 5 {
                if self.prefix[0] > 1 {
                    return Err(FrameError::BadFlag);
                }
                let [_, a, b, c, d] = self.prefix;
                let len = u32::from_be_bytes([a, b, c, d]) as usize;
                if len > self.limit {
                    return Err(FrameError::TooLarge);
                }
                self.remaining = len;
                self.prefix_len = 0;
            }
        }
        Ok(())
    }

    /// At the end of the stream: is the last message whole?
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.prefix_len > 0 || self.remaining > 0 {
            Err(FrameError::Truncated)
        } else {
            Ok(())
        }
    }
}

/// A request body that checks its framing as it streams.
struct Checked {
    inner: BoxBody,
    framer: Framer,
    broken: Arc<AtomicU8>,
}

impl Checked {
    fn fail(&self, e: FrameError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.broken.store(e.code(), Ordering::Relaxed);
        Poll::Ready(Some(Err(Box::new(e))))
    }
}

impl Body for Checked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let chunk = data.chunk();
                    if let Err(e) = self.framer.scan(chunk) {
                        return self.fail(e);
                    }
                } else if let Err(e) = self.framer.finish() {
                    // Trailers end the stream too.
                    return self.fail(e);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => match self.framer.finish() {
                Err(e) => self.fail(e),
                Ok(()) => Poll::Ready(None),
            },
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        // Ended on a message boundary: say so, so that HTTP/2 sets END_STREAM
        // on the last DATA frame. (Always `false` made every request end with
        // an extra empty frame, often after the service had answered and reset
        // the stream; h2 counts those resets and sent GOAWAY after ~1,000.)
        // Ended inside a message: not yet, so that the end is polled and refused.
        self.inner.is_end_stream() && self.framer.finish().is_ok()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pub fn layer(default: usize) -> MessageSizeLayer {
    MessageSizeLayer { default }
}

#[derive(Clone, Copy)]
pub struct MessageSizeLayer {
    default: usize,
}

impl<S> Layer<S> for MessageSizeLayer {
    type Service = MessageSize<S>;
    fn layer(&self, inner: S) -> MessageSize<S> {
        MessageSize {
            inner,
            default: self.default,
        }
    }
}

#[derive(Clone)]
pub struct MessageSize<S> {
    inner: S,
    default: usize,
}

impl<S> Service<Req> for MessageSize<S>
where
    S: Service<Req, Response = Rsp, Error = Refusal>,
    S::Future: Send + 'static,
{
    type Response = Rsp;
    type Error = Refusal;
    type Future = BoxFuture<'static, Result<Rsp, Refusal>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Refusal>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let limit = req
            .extensions()
            .get::<Route>()
            .and_then(|r| r.max_message_bytes)
            .unwrap_or(self.default);
        let broken = Arc::new(AtomicU8::new(0));
        let flag = broken.clone();
        let req = req.map(|inner| {
            BoxBody::new(Checked {
                inner,
                framer: Framer::new(limit),
                broken: flag,
            })
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            // A broken request explains whatever came back: the service saw
            // a stream cut off, or answered before it noticed.
            match FrameError::from_code(broken.load(Ordering::Relaxed)) {
                Some(FrameError::TooLarge) => Err(Refusal::MessageTooLarge { limit }),
                Some(e) => Err(Refusal::BadFraming(e)),
                None => result,
            }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::layers::test_support::{body, frame, ok, req};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    #[test]
    fn framer_finds_messages_across_chunk_boundaries() {
        let mut stream = frame(&[7; 10]);
        stream.extend(frame(&[7; 100]));
        let mut f = Framer::new(100);
        for chunk in stream.chunks(3) {
            f.scan(chunk).unwrap();
        }
        f.finish().unwrap();
        let mut f = Framer::new(99);
        let r: Result<(), _> = stream.chunks(7).try_for_each(|c| f.scan(c));
        assert_eq!(
            r,
            Err(FrameError::TooLarge),
            "the second message is over 99 bytes"
        );
        let mut f = Framer::new(100);
        f.scan(&stream[..stream.len() - 1]).unwrap();
        assert_eq!(f.finish(), Err(FrameError::Truncated));
        let mut f = Framer::new(100);
        assert_eq!(f.scan(b"hello, world"), Err(FrameError::BadFlag));
    }

    /// An inner service that reads the whole request body, as a forward does.
    async fn read_all(r: Req) -> Result<Rsp, Refusal> {
        match r.into_body().collect().await {
            Ok(_) => Ok(ok()),
            Err(e) => Err(Refusal::Upstream(e.to_string())),
        }
    }

    async fn send(bytes: Vec<u8>, route: Option<usize>) -> Result<Rsp, Refusal> {
        let mut r = req("/a.B/C");
        *r.body_mut() = body(bytes);
        if let Some(n) = route {
            r.extensions_mut().insert(Route {
                max_message_bytes: Some(n),
                timeout: None,
            });
        }
        layer(64)
            .layer(tower::service_fn(read_all))
            .oneshot(r)
            .await
    }

    #[tokio::test]
    async fn oversized_messages_and_garbage_are_refused_whole_ones_pass() {
        send(frame(&[1; 64]), None).await.unwrap();
        assert_eq!(
            send(frame(&[1; 65]), None).await.unwrap_err(),
            Refusal::MessageTooLarge { limit: 64 }
        );
        // The rule's limit wins over the default.
        send(frame(&[1; 65]), Some(100)).await.unwrap();
        assert_eq!(
            send(frame(&[1; 11]), Some(10)).await.unwrap_err(),
            Refusal::MessageTooLarge { limit: 10 }
        );
        assert_eq!(
            send(b"\xde\xad\xbe\xef garbage".to_vec(), None)
                .await
                .unwrap_err(),
            Refusal::BadFraming(FrameError::BadFlag)
        );
        let mut cut = frame(&[1; 20]);
        cut.truncate(12);
        assert_eq!(
            send(cut, None).await.unwrap_err(),
            Refusal::BadFraming(FrameError::Truncated)
        );
        send(Vec::new(), None).await.unwrap();
    }
}
