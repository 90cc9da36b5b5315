#!/usr/bin/env bash
# Open vSwitch, dnsmasq, ethtool and iproute2 for the network agent and its
# tests, installed when missing and started when down, idempotently.
# There is no kernel datapath on these machines (bridges use
# datapath_type=netdev) and no systemd: ovs-ctl starts the daemons.
set -euo pipefail

need_apt=()
command -v ovs-vsctl >/dev/null 2>&1 || need_apt+=(openvswitch-switch)
command -v dnsmasq >/dev/null 2>&1 || need_apt+=(dnsmasq-base)
command -v ethtool >/dev/null 2>&1 || need_apt+=(ethtool)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v busybox >/dev/null 2>&1 || need_apt+=(busybox-static)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# ovsdb-server and ovs-vswitchd: start them unless the database answers.
if ! ovs-vsctl --timeout=2 show >/dev/null 2>&1; then
  echo "setup: starting Open vSwitch"
  /usr/share/openvswitch/scripts/ovs-ctl start --system-id=random >/dev/null
fi
ovs-vsctl --timeout=5 show >/dev/null

# The agent reads and writes OVSDB over its JSON-RPC socket (agent config
# `ovsdb_socket`, this path by default).
test -S /var/run/openvswitch/db.sock || {
  echo "setup: no OVSDB socket at /var/run/openvswitch/db.sock" >&2
  exit 1
}
