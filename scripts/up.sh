#!/usr/bin/env bash
# Run the cloud on this machine: install what is missing, build, `cirrus up`.
# Arguments go to `cirrus up` (e.g. --detach, --state-dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --bins
exec target/release/cirrus up "$@"
