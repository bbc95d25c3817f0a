-- Planned messages out of the log's date index (issue #14): a waiting message (scheduled or
-- retrying) has no sent_at (sent_at is set only with state 'sent', which is final), so its
-- date is its next_attempt_at, which `messages_waiting` already holds. The log and the overview
-- read the messages that do not wait through this index, with this predicate word for word in
-- their WHERE, and the waiting ones through `messages_waiting` (`store::engine::LogPart`).
-- The expression stays `store::engine::dated`, word for word.
DROP INDEX IF EXISTS messages_dated;
CREATE INDEX messages_dated ON messages ((CASE WHEN sent_at IS NOT NULL THEN sent_at WHEN state IN ('sent', 'failed', 'skipped', 'unknown') THEN updated_at ELSE next_attempt_at END), id) WHERE state NOT IN ('scheduled', 'retrying');
