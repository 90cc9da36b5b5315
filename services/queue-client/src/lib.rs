//! The Cirrus queue's client library, for the services and host agents that
//! cast and consume. It links no Postgres client and none of the queue server,
//! so a compute or network agent depends on it alone.
//!
//! ```no_run
//! # async fn example() -> Result<(), tonic::Status> {
//! use queue_client::{Client, SubscribeOptions};
//! // Through this workload's sidecar (outbound listener on loopback):
//! let q = Client::via_sidecar("127.0.0.1:15001".parse().unwrap())?;
//! q.cast_json("compute.host1", &serde_json::json!({"op": "build"})).await?;
//! let mut sub = q.subscribe_with("compute.host1", "compute", SubscribeOptions::default());
//! while let Some(d) = sub.next().await {
//!     let d = d?;
//!     let _span = d.span().entered();
//!     let _op: serde_json::Value = d.json().map_err(|e| tonic::Status::internal(e.to_string()))?;
//!     // ... handle it, deduping by d.message_id ...
//!     d.ack().await?;
//! }
//! # Ok(()) }
//! ```
//!
//! - [`Client::cast`] / [`Client::cast_json`] publish one message with the
//!   current span's trace context in its headers and a fresh idempotency id,
//!   and retry while the queue is unavailable (the id makes the retry exact).
//!   A publish is answered only once the message is committed.
//! - [`Client::subscribe`] yields [`Delivery`] values to `ack()`, `nack()` or
//!   `extend()`. When the stream breaks it reconnects with exponential
//!   backoff; deliveries of the broken stream cannot be settled any more (they
//!   come back after their lease), so handlers must be idempotent by message id.
//! - [`Delivery::span`] opens a span whose parent is the publisher's.
//! - [`names`]: topic and group name rules, shared with the server.

mod client;
pub mod names;

pub use client::*;
pub use proto::queue::v1 as pb;
