#!/usr/bin/env bash
# Run the whole cloud on this machine: install and start what is missing
# (PostgreSQL, libvirt, Open vSwitch, dnsmasq, QEMU and the tiny guest's
# packages, through scripts/setup.sh and scripts/setup.d/*.sh), build the
# binaries and the tiny test guest, then `cirrus up`.
# Arguments go to `cirrus up` (e.g. --detach, --state-dir DIR, --driver test).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# `cirrus up` uploads the guest from target/guest (beside target/release).
bash scripts/guest/build.sh target/guest
cargo build --release --bins
exec target/release/cirrus up "$@"
