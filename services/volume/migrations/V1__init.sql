-- The volume schema: Cinder's volumes, snapshots, attachments and
-- per-project quota overrides, owned by the service's login role.

CREATE TABLE volumes (
    id                 uuid PRIMARY KEY,
    name               text NOT NULL DEFAULT '',
    description        text NOT NULL DEFAULT '',
    project_id         text NOT NULL,
    user_id            text NOT NULL,
    size_gb            bigint NOT NULL CHECK (size_gb > 0),
    status             text NOT NULL CHECK (status IN ('creating', 'available', 'reserved',
                           'attaching', 'in-use', 'detaching', 'extending', 'deleting',
                           'error', 'error_deleting')),
    format             text NOT NULL CHECK (format IN ('raw', 'qcow2')),
    bootable           boolean NOT NULL DEFAULT false,
    metadata           jsonb NOT NULL DEFAULT '{}',
    source_image_id    uuid,
    source_snapshot_id uuid,
    status_reason      text NOT NULL DEFAULT '',
    -- Snapshots being copied from this volume: extend and delete wait for 0.
    -- A counter on the row (not a subquery) so that the conditional UPDATEs
    -- of racing transactions re-check it under the row lock.
    snapshots_copying  integer NOT NULL DEFAULT 0 CHECK (snapshots_copying >= 0),
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX volumes_project ON volumes (project_id, created_at, id);
CREATE INDEX volumes_created ON volumes (created_at, id);

CREATE TABLE snapshots (
    id            uuid PRIMARY KEY,
    -- A volume with snapshots cannot be deleted.
    volume_id     uuid NOT NULL REFERENCES volumes (id) ON DELETE RESTRICT,
    name          text NOT NULL DEFAULT '',
    description   text NOT NULL DEFAULT '',
    project_id    text NOT NULL,
    size_gb       bigint NOT NULL CHECK (size_gb > 0),
    status        text NOT NULL CHECK (status IN ('creating', 'available', 'deleting',
                      'error', 'error_deleting')),
    metadata      jsonb NOT NULL DEFAULT '{}',
    status_reason text NOT NULL DEFAULT '',
    -- Volumes being restored from this snapshot: delete waits for 0.
    readers       integer NOT NULL DEFAULT 0 CHECK (readers >= 0),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX snapshots_volume ON snapshots (volume_id);
CREATE INDEX snapshots_project ON snapshots (project_id, created_at, id);

CREATE TABLE attachments (
    id              uuid PRIMARY KEY,
    volume_id       uuid NOT NULL REFERENCES volumes (id) ON DELETE RESTRICT,
    server_id       text NOT NULL,
    project_id      text NOT NULL,
    status          text NOT NULL CHECK (status IN ('reserved', 'attaching', 'attached', 'detaching')),
    connector       jsonb,
    connection_info jsonb,
    mountpoint      text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Volumes are single-attach: the database itself refuses a second attachment.
CREATE UNIQUE INDEX attachments_one_per_volume ON attachments (volume_id);
CREATE INDEX attachments_server ON attachments (server_id);

-- Per-project limits; a project without a row has the configured defaults.
CREATE TABLE quotas (
    project_id    text PRIMARY KEY,
    max_volumes   bigint NOT NULL CHECK (max_volumes >= 0),
    max_gigabytes bigint NOT NULL CHECK (max_gigabytes >= 0),
    max_snapshots bigint NOT NULL CHECK (max_snapshots >= 0)
);
