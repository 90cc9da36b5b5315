-- The compute schema: owned by compute-api's migrations, read and written by
-- compute-api, the scheduler and conductor (never by a compute agent).

CREATE TABLE flavors (
    id uuid PRIMARY KEY,
    name text NOT NULL UNIQUE,
    vcpus integer NOT NULL CHECK (vcpus > 0),
    ram_mb integer NOT NULL CHECK (ram_mb > 0),
    disk_gb integer NOT NULL CHECK (disk_gb >= 0),
    ephemeral_gb integer NOT NULL DEFAULT 0 CHECK (ephemeral_gb >= 0),
    extra_specs jsonb NOT NULL DEFAULT '{}',
    is_public boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE flavor_access (
    flavor_id uuid NOT NULL REFERENCES flavors ON DELETE CASCADE,
    project_id text NOT NULL,
    PRIMARY KEY (flavor_id, project_id)
);

CREATE TABLE keypairs (
    user_id text NOT NULL,
    name text NOT NULL,
    project_id text NOT NULL,
    type text NOT NULL,
    public_key text NOT NULL,
    fingerprint text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, name)
);

CREATE TABLE server_groups (
    id uuid PRIMARY KEY,
    project_id text NOT NULL,
    user_id text NOT NULL,
    name text NOT NULL,
    policy text NOT NULL CHECK (policy IN ('affinity', 'anti-affinity', 'soft-affinity', 'soft-anti-affinity')),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX server_groups_project ON server_groups (project_id);

-- Limits per project; a missing row means the configured defaults.
CREATE TABLE quotas (
    project_id text PRIMARY KEY,
    instances bigint NOT NULL,
    cores bigint NOT NULL,
    ram_mb bigint NOT NULL,
    key_pairs bigint NOT NULL,
    server_groups bigint NOT NULL
);

-- A compute host as its agent reports it, with the usage the scheduler's
-- claims add up. `generation` grows with every change of the usage: a claim
-- applies only to the generation it was decided on (Placement's rule).
CREATE TABLE hosts (
    name text PRIMARY KEY,
    enabled boolean NOT NULL DEFAULT true,
    disabled_reason text NOT NULL DEFAULT '',
    availability_zone text NOT NULL DEFAULT 'nova',
    hypervisor_type text NOT NULL DEFAULT '',
    architecture text NOT NULL DEFAULT '',
    vcpus integer NOT NULL CHECK (vcpus >= 0),
    ram_mb bigint NOT NULL CHECK (ram_mb >= 0),
    disk_gb bigint NOT NULL CHECK (disk_gb >= 0),
    cpu_ratio double precision NOT NULL DEFAULT 16.0,
    ram_ratio double precision NOT NULL DEFAULT 1.5,
    disk_ratio double precision NOT NULL DEFAULT 1.0,
    vcpus_used integer NOT NULL DEFAULT 0 CHECK (vcpus_used >= 0),
    ram_mb_used bigint NOT NULL DEFAULT 0 CHECK (ram_mb_used >= 0),
    disk_gb_used bigint NOT NULL DEFAULT 0 CHECK (disk_gb_used >= 0),
    in_flight integer NOT NULL DEFAULT 0 CHECK (in_flight >= 0),
    -- Build failures since the last success (a weigher keeps builds away).
    failures integer NOT NULL DEFAULT 0,
    generation bigint NOT NULL DEFAULT 0,
    last_heartbeat timestamptz NOT NULL DEFAULT now(),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE servers (
    id uuid PRIMARY KEY,
    project_id text NOT NULL,
    user_id text NOT NULL,
    name text NOT NULL,
    flavor_id uuid NOT NULL,
    flavor_name text NOT NULL,
    vcpus integer NOT NULL,
    ram_mb integer NOT NULL,
    disk_gb integer NOT NULL,
    ephemeral_gb integer NOT NULL DEFAULT 0,
    image_id text NOT NULL DEFAULT '',
    image_properties jsonb NOT NULL DEFAULT '{}',
    key_name text NOT NULL DEFAULT '',
    public_key text NOT NULL DEFAULT '',
    user_data bytea NOT NULL DEFAULT '',
    metadata jsonb NOT NULL DEFAULT '{}',
    networks jsonb NOT NULL DEFAULT '[]',
    block_devices jsonb NOT NULL DEFAULT '[]',
    security_groups jsonb NOT NULL DEFAULT '[]',
    availability_zone text NOT NULL DEFAULT '',
    server_group_id uuid REFERENCES server_groups,
    host text,
    alternates text[] NOT NULL DEFAULT '{}',
    tried_hosts text[] NOT NULL DEFAULT '{}',
    attempt integer NOT NULL DEFAULT 0,
    vm_state text NOT NULL,
    task_state text,
    power_state text NOT NULL DEFAULT 'nostate',
    fault_code integer,
    fault_message text,
    fault_at timestamptz,
    locked boolean NOT NULL DEFAULT false,
    locked_by text,
    locked_reason text NOT NULL DEFAULT '',
    idempotency_key text,
    console_log text NOT NULL DEFAULT '',
    revision bigint NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    build_started_at timestamptz NOT NULL DEFAULT now(),
    launched_at timestamptz,
    deleted_at timestamptz,
    UNIQUE (project_id, idempotency_key)
);
CREATE INDEX servers_project ON servers (project_id, id) WHERE vm_state <> 'deleted';
CREATE INDEX servers_host ON servers (host) WHERE vm_state <> 'deleted';
CREATE INDEX servers_building ON servers (build_started_at) WHERE vm_state = 'building';
CREATE INDEX servers_group ON servers (server_group_id) WHERE server_group_id IS NOT NULL;

-- What a placed server holds on its host; released exactly once.
CREATE TABLE claims (
    server_id uuid PRIMARY KEY REFERENCES servers,
    host text NOT NULL REFERENCES hosts,
    vcpus integer NOT NULL,
    ram_mb bigint NOT NULL,
    disk_gb bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX claims_host ON claims (host);

-- Every change of a server's states, in order: what WatchServer streams.
CREATE TABLE server_events (
    seq bigserial PRIMARY KEY,
    server_id uuid NOT NULL,
    revision bigint NOT NULL,
    vm_state text NOT NULL,
    task_state text,
    power_state text NOT NULL,
    fault_code integer,
    fault_message text,
    host text,
    locked boolean NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX server_events_server ON server_events (server_id, seq);

-- The revision grows with every change a user can see, whoever writes it.
CREATE FUNCTION servers_bump() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.vm_state, NEW.task_state, NEW.power_state, NEW.fault_code, NEW.fault_message,
        NEW.host, NEW.locked, NEW.name, NEW.metadata)
       IS DISTINCT FROM
       (OLD.vm_state, OLD.task_state, OLD.power_state, OLD.fault_code, OLD.fault_message,
        OLD.host, OLD.locked, OLD.name, OLD.metadata) THEN
        NEW.revision := OLD.revision + 1;
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER servers_bump BEFORE UPDATE ON servers FOR EACH ROW EXECUTE FUNCTION servers_bump();

-- The event and its notification commit with the change itself.
CREATE FUNCTION servers_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.revision <> OLD.revision THEN
        INSERT INTO server_events (server_id, revision, vm_state, task_state, power_state,
                                   fault_code, fault_message, host, locked)
        VALUES (NEW.id, NEW.revision, NEW.vm_state, NEW.task_state, NEW.power_state,
                NEW.fault_code, NEW.fault_message, NEW.host, NEW.locked);
        PERFORM pg_notify('compute_server', NEW.id::text);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER servers_event AFTER INSERT OR UPDATE ON servers FOR EACH ROW EXECUTE FUNCTION servers_event();
