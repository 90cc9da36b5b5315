-- Volumes attached to servers after boot (Nova's block device mappings of
-- a live attach): `attaching` until the host reports, then `attached`;
-- `detaching` until the host reports, then gone. A volume is attached to
-- one server at a time (volumes are single-attach).
CREATE TABLE volume_attachments (
    volume_id uuid PRIMARY KEY,
    server_id uuid NOT NULL REFERENCES servers,
    status text NOT NULL CHECK (status IN ('attaching', 'attached', 'detaching')),
    device text NOT NULL DEFAULT '',
    attachment_id text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX volume_attachments_server ON volume_attachments (server_id);

-- Where compute-api reaches each host's agent (`conductor.v1.Agent`: the
-- interactive console), as the agent registered it through conductor.
CREATE TABLE agent_endpoints (
    host text PRIMARY KEY,
    endpoint text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
