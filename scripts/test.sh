#!/usr/bin/env bash
# Run every test: unit, integration (real Postgres, real servers on ephemeral
# ports) and end-to-end (the real binaries), plus format and lint checks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The end-to-end tests run the real binaries (cirrus, identity, sidecar, ...).
cargo build --workspace --bins --quiet
cargo nextest run --workspace --no-fail-fast "$@"
