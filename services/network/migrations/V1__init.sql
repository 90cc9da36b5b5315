-- The network schema: networks, subnets, IP allocations, ports and their
-- host binding, security groups, quotas, agents and the event outbox, in one
-- schema owned by the service's login role.

CREATE TABLE networks (
    id              uuid PRIMARY KEY,
    project_id      text NOT NULL,
    name            text NOT NULL,
    shared          boolean NOT NULL DEFAULT false,
    admin_state_up  boolean NOT NULL DEFAULT true,
    mtu             integer NOT NULL CHECK (mtu BETWEEN 68 AND 9000),
    -- The VXLAN VNI: unique, from the configured range, freed with the row.
    segmentation_id integer NOT NULL UNIQUE,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX networks_project ON networks (project_id);

CREATE TABLE subnets (
    id               uuid PRIMARY KEY,
    network_id       uuid NOT NULL REFERENCES networks (id) ON DELETE CASCADE,
    project_id       text NOT NULL,
    name             text NOT NULL,
    ip_version       smallint NOT NULL CHECK (ip_version IN (4, 6)),
    cidr             cidr NOT NULL,
    gateway_ip       inet,
    -- [{"start": "10.0.0.2", "end": "10.0.0.254"}, ...], checked by the service.
    allocation_pools jsonb NOT NULL,
    dns_nameservers  text[] NOT NULL DEFAULT '{}',
    -- [{"destination": "...", "nexthop": "..."}]
    host_routes      jsonb NOT NULL DEFAULT '[]',
    enable_dhcp      boolean NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX subnets_network ON subnets (network_id, created_at);

CREATE TABLE ports (
    id              uuid PRIMARY KEY,
    network_id      uuid NOT NULL REFERENCES networks (id) ON DELETE CASCADE,
    project_id      text NOT NULL,
    name            text NOT NULL DEFAULT '',
    mac_address     text NOT NULL,
    device_id       text NOT NULL DEFAULT '',
    device_owner    text NOT NULL DEFAULT '',
    admin_state_up  boolean NOT NULL DEFAULT true,
    status          text NOT NULL DEFAULT 'DOWN' CHECK (status IN ('DOWN', 'ACTIVE')),
    port_security   boolean NOT NULL DEFAULT true,
    -- '' when unbound.
    binding_host    text NOT NULL DEFAULT '',
    -- The bridge of the host's agent at bind time (libvirt's source bridge).
    binding_bridge  text NOT NULL DEFAULT '',
    -- Why the last bind failed, in one line ('' when it did not).
    binding_error   text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (network_id, mac_address)
);
CREATE INDEX ports_project ON ports (project_id);
CREATE INDEX ports_device ON ports (device_id) WHERE device_id <> '';
CREATE INDEX ports_host ON ports (binding_host) WHERE binding_host <> '';
-- One DHCP port per network and host.
CREATE UNIQUE INDEX ports_dhcp ON ports (network_id, device_id) WHERE device_owner = 'network:dhcp';

-- IPAM: the primary key is what makes an address go to one port only, even
-- with many concurrent creates on several replicas.
CREATE TABLE ip_allocations (
    subnet_id  uuid NOT NULL REFERENCES subnets (id) ON DELETE CASCADE,
    ip         inet NOT NULL,
    port_id    uuid NOT NULL REFERENCES ports (id) ON DELETE CASCADE,
    PRIMARY KEY (subnet_id, ip)
);
CREATE INDEX ip_allocations_port ON ip_allocations (port_id);

CREATE TABLE security_groups (
    id          uuid PRIMARY KEY,
    project_id  text NOT NULL,
    name        text NOT NULL,
    description text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (project_id, name)
);

CREATE TABLE security_group_rules (
    id                uuid PRIMARY KEY,
    security_group_id uuid NOT NULL REFERENCES security_groups (id) ON DELETE CASCADE,
    direction         text NOT NULL CHECK (direction IN ('ingress', 'egress')),
    ethertype         smallint NOT NULL CHECK (ethertype IN (4, 6)),
    protocol          text NOT NULL CHECK (protocol IN ('any', 'tcp', 'udp', 'icmp')),
    port_range_min    integer NOT NULL DEFAULT 0,
    port_range_max    integer NOT NULL DEFAULT 0,
    remote_ip_prefix  text NOT NULL DEFAULT '',
    remote_group_id   uuid REFERENCES security_groups (id) ON DELETE CASCADE,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sg_rules_group ON security_group_rules (security_group_id);

CREATE TABLE port_security_groups (
    port_id           uuid NOT NULL REFERENCES ports (id) ON DELETE CASCADE,
    -- RESTRICT: a group in use cannot be deleted.
    security_group_id uuid NOT NULL REFERENCES security_groups (id) ON DELETE RESTRICT,
    PRIMARY KEY (port_id, security_group_id)
);
CREATE INDEX port_sg_group ON port_security_groups (security_group_id);

-- Per-project limit overrides; a missing row means the configured default.
CREATE TABLE quotas (
    project_id text NOT NULL,
    resource   text NOT NULL,
    max        bigint NOT NULL,
    PRIMARY KEY (project_id, resource)
);

-- Usage counters, charged in the creating transaction (last, so the row
-- lock is held only until commit) and refunded by deletes.
CREATE TABLE usage (
    project_id text NOT NULL,
    resource   text NOT NULL,
    used       bigint NOT NULL CHECK (used >= 0),
    PRIMARY KEY (project_id, resource)
);

CREATE TABLE agents (
    host           text PRIMARY KEY,
    last_heartbeat timestamptz NOT NULL,
    started_at     text NOT NULL DEFAULT '',
    version        text NOT NULL DEFAULT '',
    bridge         text NOT NULL DEFAULT ''
);

-- Port status events, written in the transaction that changes the status
-- and relayed to the queue's `network.port` topic (then deleted).
CREATE TABLE outbox (
    id         bigserial PRIMARY KEY,
    topic      text NOT NULL,
    msg_key    text NOT NULL,
    payload    bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
