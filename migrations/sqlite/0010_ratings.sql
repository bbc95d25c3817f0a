-- Ratings from the links in messages (`rating = { scale = ... }` rules): one row per rated
-- message, the customer's last answer; a comment, once given, is kept when the score changes.
CREATE TABLE ratings (
    message_id  INTEGER PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
    customer_id TEXT NOT NULL,
    rule        TEXT NOT NULL,
    scale       TEXT NOT NULL CHECK (scale IN ('csat', 'nps')),
    score       INTEGER NOT NULL CHECK (score BETWEEN 0 AND 10),
    comment     TEXT,
    answers     INTEGER NOT NULL DEFAULT 1,
    rated_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX ratings_rule_score ON ratings (rule, scale, score);
CREATE INDEX ratings_customer ON ratings (customer_id, updated_at);
