-- The owner's web page. What a message looked like when it went out (re-rendering later could
-- differ: templates, rules and customer data change), and indexes for the log's filters, which
-- page newest first by id (keyset pagination) and must stay fast with millions of messages.

ALTER TABLE messages ADD COLUMN body_text TEXT;
ALTER TABLE messages ADD COLUMN body_html TEXT;
-- A JSON array of the checks the dispatcher made just before sending, in words.
ALTER TABLE messages ADD COLUMN checks TEXT;

CREATE INDEX messages_rule_id ON messages (rule, id);
CREATE INDEX messages_rule_state_id ON messages (rule, state, id);
-- The log's date filter: when it was sent, or is (was) due when it was not.
CREATE INDEX messages_sent_or_due ON messages (COALESCE(sent_at, due_at));
-- The overview: final states by the time they were reached.
CREATE INDEX messages_finished ON messages (updated_at) WHERE state IN ('sent', 'failed', 'skipped', 'unknown');
-- Opens and clicks of a period, and a customer's timeline.
CREATE INDEX message_events_kind_at_message ON message_events (kind, at, message_id);
CREATE INDEX events_customer_occurred ON events (customer_id, occurred_at);
