-- The owner's web page. What a message looked like when it went out (re-rendering later could
-- differ: templates, rules and customer data change), and indexes for the log's filters, which
-- page newest first by id (keyset pagination) and must stay fast with millions of messages.

ALTER TABLE messages ADD COLUMN body_text text;
ALTER TABLE messages ADD COLUMN body_html text;
-- The checks the dispatcher made just before sending, in words (a JSON array of strings).
ALTER TABLE messages ADD COLUMN checks jsonb;

CREATE INDEX messages_rule_id ON messages (rule, id);
CREATE INDEX messages_rule_state_id ON messages (rule, state, id);
-- The log's date filter: when it was sent, or is (was) due when it was not.
CREATE INDEX messages_sent_or_due ON messages ((COALESCE(sent_at, due_at)), id);
-- The overview: messages by the time they reached their (final) state.
CREATE INDEX messages_updated ON messages (updated_at);
-- The log's opens, clicks, bounces... of each message (both columns equal: chosen over the
-- (kind, at) index even by SQLite, which has no statistics unless ANALYZE ran).
CREATE INDEX message_events_message_kind ON message_events (message_id, kind, at);
CREATE INDEX events_customer_occurred ON events (customer_id, occurred_at);
