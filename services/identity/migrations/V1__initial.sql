-- The identity schema: Keystone's resource, identity, assignment, revoke and
-- catalog tables, in one schema owned by the service's login role.

CREATE TABLE domains (
    id          uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    description text NOT NULL DEFAULT '',
    enabled     boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE projects (
    id          uuid PRIMARY KEY,
    domain_id   uuid NOT NULL REFERENCES domains (id),
    name        text NOT NULL,
    description text NOT NULL DEFAULT '',
    enabled     boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (domain_id, name)
);

CREATE TABLE users (
    id                  uuid PRIMARY KEY,
    domain_id           uuid NOT NULL REFERENCES domains (id),
    name                text NOT NULL,
    email               text NOT NULL DEFAULT '',
    description         text NOT NULL DEFAULT '',
    -- argon2id PHC string; NULL means password login is impossible.
    password_hash       text,
    enabled             boolean NOT NULL DEFAULT true,
    failed_attempts     integer NOT NULL DEFAULT 0,
    locked_until        timestamptz,
    password_changed_at timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (domain_id, name)
);

CREATE TABLE roles (
    id          uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    description text NOT NULL DEFAULT ''
);

CREATE TABLE implied_roles (
    prior_role_id   uuid NOT NULL REFERENCES roles (id) ON DELETE CASCADE,
    implied_role_id uuid NOT NULL REFERENCES roles (id) ON DELETE CASCADE,
    PRIMARY KEY (prior_role_id, implied_role_id),
    CHECK (prior_role_id <> implied_role_id)
);

-- A role held by a user on exactly one target: a project, a domain or the system.
CREATE TABLE role_assignments (
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role_id    uuid NOT NULL REFERENCES roles (id) ON DELETE CASCADE,
    project_id uuid REFERENCES projects (id) ON DELETE CASCADE,
    domain_id  uuid REFERENCES domains (id) ON DELETE CASCADE,
    system     boolean NOT NULL DEFAULT false,
    CHECK ((project_id IS NOT NULL)::int + (domain_id IS NOT NULL)::int + system::int = 1)
);
CREATE UNIQUE INDEX role_assignments_unique ON role_assignments
    (user_id, role_id, coalesce(project_id, domain_id, '00000000-0000-0000-0000-000000000000'::uuid), system);
CREATE INDEX role_assignments_project ON role_assignments (project_id);

-- OS-REVOKE style rules: a token issued at or before issued_before is revoked
-- when every non-null column matches it.
CREATE TABLE revocation_events (
    id            bigserial PRIMARY KEY,
    user_id       uuid,
    project_id    uuid,
    domain_id     uuid,
    audit_id      text,
    issued_before timestamptz NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX revocation_events_issued_before ON revocation_events (issued_before);

CREATE TABLE services (
    id          uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    type        text NOT NULL,
    description text NOT NULL DEFAULT '',
    enabled     boolean NOT NULL DEFAULT true
);

CREATE TABLE endpoints (
    id         uuid PRIMARY KEY,
    service_id uuid NOT NULL REFERENCES services (id) ON DELETE CASCADE,
    interface  text NOT NULL CHECK (interface IN ('public', 'internal', 'admin')),
    region     text NOT NULL,
    url        text NOT NULL,
    enabled    boolean NOT NULL DEFAULT true,
    UNIQUE (service_id, interface, region)
);

-- Cloud-wide facts written by bootstrap, such as the admin project's id.
CREATE TABLE settings (
    key   text PRIMARY KEY,
    value text NOT NULL
);
