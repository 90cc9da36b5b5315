-- The image schema: Glance's images, members, tags and properties, and
-- per-project quota overrides, in one schema owned by the service's login role.

CREATE TABLE images (
    id               uuid PRIMARY KEY,
    name             text NOT NULL DEFAULT '',
    -- The owner project's id, as the sidecar reports it.
    owner            text NOT NULL,
    status           text NOT NULL
        CHECK (status IN ('queued', 'saving', 'active', 'killed', 'deactivated')),
    visibility       text NOT NULL
        CHECK (visibility IN ('private', 'shared', 'community', 'public')),
    disk_format      text NOT NULL CHECK (disk_format IN ('raw', 'qcow2', 'iso', 'aki', 'ari')),
    container_format text NOT NULL CHECK (container_format IN ('bare', 'ovf')),
    min_disk         integer NOT NULL DEFAULT 0 CHECK (min_disk >= 0),
    min_ram          integer NOT NULL DEFAULT 0 CHECK (min_ram >= 0),
    protected        boolean NOT NULL DEFAULT false,
    properties       jsonb NOT NULL DEFAULT '{}',
    tags             text[] NOT NULL DEFAULT '{}',
    expected_size    bigint CHECK (expected_size >= 0),
    expected_sha256  text NOT NULL DEFAULT '',
    -- Set when the bytes are stored (status active or deactivated).
    size             bigint CHECK (size >= 0),
    sha256           text NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX images_owner ON images (owner);
CREATE INDEX images_status ON images (status);
CREATE INDEX images_created ON images (created_at, id);
CREATE INDEX images_tags ON images USING gin (tags);
CREATE INDEX images_properties ON images USING gin (properties jsonb_path_ops);

CREATE TABLE image_members (
    image_id   uuid NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    member     text NOT NULL,
    status     text NOT NULL CHECK (status IN ('pending', 'accepted', 'rejected')),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (image_id, member)
);

CREATE INDEX image_members_member ON image_members (member);

-- Per-project limits; a project without a row has the configured defaults.
CREATE TABLE quotas (
    project_id text PRIMARY KEY,
    max_bytes  bigint NOT NULL CHECK (max_bytes >= 0),
    max_images bigint NOT NULL CHECK (max_images >= 0)
);
