-- The log, its date filters, the overview's counts and the exports date every message the same
-- way: history by what happened when (sent at; failed, skipped or unknown at), the plan by
-- when it is due. This index is on that expression (`store::engine::dated`, word for word) and
-- gives the log's order (newest first, then by id).
CREATE INDEX messages_dated ON messages ((CASE WHEN sent_at IS NOT NULL THEN sent_at WHEN state IN ('sent', 'failed', 'skipped', 'unknown') THEN updated_at ELSE next_attempt_at END), id);
-- The date filter used to date a message by when it was sent or due (never by when it failed
-- or was skipped); nothing reads that expression any more.
DROP INDEX IF EXISTS messages_sent_or_due;
