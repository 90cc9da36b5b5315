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
//! - [`serve`]: a gRPC server with reflection (v1 and v1alpha) and
//!   `grpc.health.v1.Health`, graceful shutdown on SIGINT/SIGTERM, and the
//!   client side of `healthcheck`.

pub mod caller;
pub mod config;
pub mod db;
pub mod process;
pub mod serve;
pub mod telemetry;
