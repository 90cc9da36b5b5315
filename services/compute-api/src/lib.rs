//! `compute-api` — being written (wave 2); see docs/architecture.md.
