-- The queue schema. A message is stored once per topic; every consumer group
-- of the topic has its own delivery row for it (fan-out), which consumers of
-- that group claim with FOR UPDATE SKIP LOCKED. Several queue replicas share
-- these tables; NOTIFY wakes their consumers.

CREATE TABLE topics (
    id              serial PRIMARY KEY,
    name            text NOT NULL UNIQUE,
    retention_secs  bigint NOT NULL CHECK (retention_secs > 0),
    ttl_secs        bigint NOT NULL CHECK (ttl_secs >= 0),   -- 0: never expires
    max_attempts    integer NOT NULL CHECK (max_attempts > 0),
    -- The topic that takes messages after max_attempts; NULL for a dead-letter topic.
    dead_letter_id  integer REFERENCES topics (id) ON DELETE SET NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE groups (
    id              serial PRIMARY KEY,
    topic_id        integer NOT NULL REFERENCES topics (id) ON DELETE CASCADE,
    name            text NOT NULL,
    dead_lettered   bigint NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (topic_id, name)
);

CREATE TABLE messages (
    -- Publish order: deliveries are claimed in seq order and per-key order follows it.
    seq             bigserial PRIMARY KEY,
    id              uuid NOT NULL,
    topic_id        integer NOT NULL REFERENCES topics (id) ON DELETE CASCADE,
    payload         bytea NOT NULL,
    headers         jsonb NOT NULL DEFAULT '{}',
    key             text,
    published_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX messages_topic_seq ON messages (topic_id, seq);
CREATE INDEX messages_published ON messages (published_at);

CREATE TABLE deliveries (
    group_id        integer NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
    seq             bigint NOT NULL,
    key             text,
    -- Deliveries made so far; the next claim makes attempt attempts + 1.
    attempts        integer NOT NULL DEFAULT 0,
    -- Not claimable before this: the end of the current lease or of a nack's delay.
    visible_at      timestamptz NOT NULL DEFAULT now(),
    -- Names the current lease; acks must quote it.
    lease_token     uuid,
    published_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, seq)
);
-- Per-key order: the head of a key within a group is its lowest seq.
CREATE INDEX deliveries_key ON deliveries (group_id, key, seq) WHERE key IS NOT NULL;

CREATE TABLE dedupe (
    topic_id        integer NOT NULL REFERENCES topics (id) ON DELETE CASCADE,
    idempotency_id  text NOT NULL,
    message_id      uuid NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic_id, idempotency_id)
);
CREATE INDEX dedupe_created ON dedupe (created_at);
