-- Ratings from the links in messages (`rating = { scale = ... }` rules): one row per rated
-- message, the customer's last answer; a comment, once given, is kept when the score changes.
CREATE TABLE ratings (
    message_id  bigint PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
    customer_id text NOT NULL,
    rule        text NOT NULL,
    scale       text NOT NULL CHECK (scale IN ('csat', 'nps')),
    score       bigint NOT NULL CHECK (score BETWEEN 0 AND 10),
    comment     text,
    answers     bigint NOT NULL DEFAULT 1,
    rated_at    timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ratings_rule_score ON ratings (rule, scale, score);
CREATE INDEX ratings_customer ON ratings (customer_id, updated_at);
