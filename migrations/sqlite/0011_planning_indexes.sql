-- Indexes that pay for themselves (issue #14): every index on `messages` is written by each
-- row the planner inserts and by every update that changes its columns. These served no query
-- any more, or held a row for every message where only a few are ever looked up
-- (BENCHMARKS.md, planning: what each index costs and which query uses it).

-- Nothing reads messages by `updated_at` since the log and the overview date messages by the
-- `messages_dated` expression (0009).
DROP INDEX IF EXISTS messages_updated;
-- The log filters by rule and orders by the dated expression, not by id (0009);
-- `messages_rule_state_id` has the same leading column for `rule = ?` and the overview's counts.
DROP INDEX IF EXISTS messages_rule_id;
-- A Message-ID exists only once the body is about to go out: a planned message has none, and
-- bounces and replies look up `message_id = ?`, which implies NOT NULL.
DROP INDEX IF EXISTS messages_message_id;
CREATE INDEX messages_message_id ON messages (message_id) WHERE message_id IS NOT NULL;
-- Only schedule rules (no event: `event_id IS NULL`) look up their messages by customer;
-- event and anniversary rules use `messages_rule_event` and the dedupe key.
DROP INDEX IF EXISTS messages_rule_customer;
CREATE INDEX messages_rule_customer ON messages (rule, customer_id, trigger_at) WHERE event_id IS NULL;
