-- touchpoint schema for PostgreSQL: timestamptz and jsonb, so another application can write
-- customers and events with plain SQL.

CREATE TABLE customers (
    seq        bigserial PRIMARY KEY,
    id         text NOT NULL UNIQUE,
    email      text NOT NULL,
    name       text,
    timezone   text,
    attributes jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(attributes) = 'object'),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE events (
    seq         bigserial PRIMARY KEY,
    id          text NOT NULL UNIQUE,
    customer_id text NOT NULL REFERENCES customers (id) ON DELETE CASCADE,
    kind        text NOT NULL,
    occurred_at timestamptz NOT NULL,
    data        jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(data) = 'object'),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_kind_occurred ON events (kind, occurred_at);
CREATE INDEX events_customer_kind ON events (customer_id, kind, occurred_at);

-- The outbox and the log in one. A row is created by the planner (state 'scheduled') and moves
-- through 'sending' to a final state; dedupe_key makes planning idempotent.
CREATE TABLE messages (
    id               bigserial PRIMARY KEY,
    rule             text NOT NULL,
    customer_id      text NOT NULL,
    event_id         text,
    dedupe_key       text NOT NULL UNIQUE,
    trigger_at       timestamptz NOT NULL,
    due_at           timestamptz NOT NULL,
    expires_at       timestamptz,
    next_attempt_at  timestamptz NOT NULL,
    state            text NOT NULL DEFAULT 'scheduled'
                     CHECK (state IN ('scheduled', 'sending', 'retrying', 'sent', 'failed', 'skipped', 'unknown')),
    attempts         integer NOT NULL DEFAULT 0,
    claim_token      text,
    claimed_by       text,
    lease_expires_at timestamptz,
    phase            text CHECK (phase IN ('claimed', 'body')),
    detail           jsonb NOT NULL DEFAULT '{}'::jsonb,
    email            text,
    subject          text,
    message_id       text,
    smtp_reply       text,
    reason           text,
    sent_at          timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX messages_waiting ON messages (next_attempt_at) WHERE state IN ('scheduled', 'retrying');
CREATE INDEX messages_leased ON messages (lease_expires_at) WHERE state = 'sending';
CREATE INDEX messages_rule_event ON messages (rule, event_id, trigger_at);
CREATE INDEX messages_rule_customer ON messages (rule, customer_id, trigger_at);
CREATE INDEX messages_customer ON messages (customer_id, id);
CREATE INDEX messages_state ON messages (state, id);
CREATE INDEX messages_message_id ON messages (message_id);

CREATE TABLE message_events (
    id          bigserial PRIMARY KEY,
    message_id  bigint NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    kind        text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    attempt     integer,
    smtp_reply  text,
    detail      jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX message_events_message ON message_events (message_id, id);
CREATE INDEX message_events_kind_at ON message_events (kind, at);

CREATE TABLE suppressions (
    email      text PRIMARY KEY,
    reason     text NOT NULL,
    source     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
