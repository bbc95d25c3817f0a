-- touchpoint schema for SQLite. Times are TEXT in UTC, ISO 8601 with milliseconds
-- ('2026-11-23T09:00:00.000Z'); a trigger normalises whatever another application writes into
-- events.occurred_at (any format SQLite's date functions read, offsets included) so that times
-- compare correctly as text.

CREATE TABLE customers (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    email      TEXT NOT NULL,
    name       TEXT,
    timezone   TEXT,
    attributes TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(attributes)),
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE TABLE events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    customer_id TEXT NOT NULL REFERENCES customers (id) ON DELETE CASCADE,
    kind        TEXT NOT NULL,
    occurred_at TEXT NOT NULL,
    data        TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(data)),
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX events_kind_occurred ON events (kind, occurred_at);
CREATE INDEX events_customer_kind ON events (customer_id, kind, occurred_at);

CREATE TRIGGER events_occurred_at_is_a_time BEFORE INSERT ON events
WHEN strftime('%Y-%m-%dT%H:%M:%fZ', NEW.occurred_at) IS NULL
BEGIN
    SELECT RAISE(ABORT, 'events.occurred_at must be a time like 2026-11-23T09:00:00Z');
END;
CREATE TRIGGER events_occurred_at_normalised AFTER INSERT ON events
WHEN NEW.occurred_at IS NOT strftime('%Y-%m-%dT%H:%M:%fZ', NEW.occurred_at)
BEGIN
    UPDATE events SET occurred_at = strftime('%Y-%m-%dT%H:%M:%fZ', NEW.occurred_at) WHERE seq = NEW.seq;
END;
CREATE TRIGGER events_occurred_at_normalised_on_update AFTER UPDATE OF occurred_at ON events
WHEN NEW.occurred_at IS NOT strftime('%Y-%m-%dT%H:%M:%fZ', NEW.occurred_at)
BEGIN
    UPDATE events SET occurred_at = strftime('%Y-%m-%dT%H:%M:%fZ', NEW.occurred_at) WHERE seq = NEW.seq;
END;

-- The outbox and the log in one. A row is created by the planner (state 'scheduled') and moves
-- through 'sending' to a final state; dedupe_key makes planning idempotent.
CREATE TABLE messages (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    rule             TEXT NOT NULL,
    customer_id      TEXT NOT NULL,
    event_id         TEXT,
    dedupe_key       TEXT NOT NULL UNIQUE,
    trigger_at       TEXT NOT NULL,   -- when the rule fired (event + delay, the anniversary...)
    due_at           TEXT NOT NULL,   -- the first moment it may go out (send window applied)
    expires_at       TEXT,            -- past this it is skipped, never sent late
    next_attempt_at  TEXT NOT NULL,   -- when it is next eligible (moves on retry and windows)
    state            TEXT NOT NULL DEFAULT 'scheduled'
                     CHECK (state IN ('scheduled', 'sending', 'retrying', 'sent', 'failed', 'skipped', 'unknown')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    claim_token      TEXT,
    claimed_by       TEXT,
    lease_expires_at TEXT,
    phase            TEXT CHECK (phase IN ('claimed', 'body')),
    detail           TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(detail)),
    email            TEXT,
    subject          TEXT,
    message_id       TEXT,
    smtp_reply       TEXT,
    reason           TEXT,
    sent_at          TEXT,
    created_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX messages_waiting ON messages (next_attempt_at) WHERE state IN ('scheduled', 'retrying');
CREATE INDEX messages_leased ON messages (lease_expires_at) WHERE state = 'sending';
CREATE INDEX messages_rule_event ON messages (rule, event_id, trigger_at);
CREATE INDEX messages_rule_customer ON messages (rule, customer_id, trigger_at);
CREATE INDEX messages_customer ON messages (customer_id, id);
CREATE INDEX messages_state ON messages (state, id);
CREATE INDEX messages_message_id ON messages (message_id);

-- Every state change and every tracking event of a message, with time, attempt and detail.
CREATE TABLE message_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id  INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    kind        TEXT NOT NULL,
    at          TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    attempt     INTEGER,
    smtp_reply  TEXT,
    detail      TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(detail))
);
CREATE INDEX message_events_message ON message_events (message_id, id);
CREATE INDEX message_events_kind_at ON message_events (kind, at);

-- Addresses never to be mailed again (lower-cased), and why.
CREATE TABLE suppressions (
    email      TEXT PRIMARY KEY,
    reason     TEXT NOT NULL,
    source     TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
