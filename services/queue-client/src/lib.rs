//! `queue-client` — being written (wave 2); see docs/architecture.md.
