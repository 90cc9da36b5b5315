//! The small runtime every Cirrus service shares, so that no service copies
//! plumbing:
//!
//! - [`caller`]: the trusted `x-cirrus-*` headers a sidecar sets for its service.
//! - [`config`]: defaults, then a TOML file, then `CIRRUS_*` environment.
//! - [`db`]: a Postgres pool per service schema, versioned migrations,
//!   per-service login roles, and throwaway databases for tests.
//! - [`telemetry`]: tracing to stderr, OTLP export when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` is set, Prometheus `/metrics` on its own port.
//! - [`process`]: the common start of every service binary's `main`.
//! - [`error`]: the one error type of every service and its one mapping to
//!   gRPC statuses; [`types`]: validated request values (`Name`, `NameOrId`).
//! - [`testing`] (feature `testing`): the shared test harness.
//! - [`serve`]: a gRPC server with reflection (v1 and v1alpha) and
//!   `grpc.health.v1.Health`, graceful shutdown on SIGINT/SIGTERM, and the
//!   client side of `healthcheck`.

//!
//! The Postgres parts ([`db`], and the database mapping of [`error`]) are
//! behind the default feature `db`: host agents build the runtime without it
//! and link no Postgres client.

pub mod caller;
pub mod config;
#[cfg(feature = "db")]
pub mod db;
pub mod error;
#[cfg(feature = "db")]
pub mod listen;
pub mod local;
pub mod process;
pub mod serve;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod trace;
pub mod types;

pub use error::{Error, Message};
