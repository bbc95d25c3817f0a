-- The expiry sweep (state = ? AND expires_at < now) runs every few seconds; the anniversary
-- and schedule planners page through one kind of event in seq order.
CREATE INDEX messages_expiring ON messages (state, expires_at);
CREATE INDEX events_kind_seq ON events (kind, seq);
-- 'infinity' is a valid timestamptz but no moment anything happened; refusing it here keeps
-- one bad row written by another application from stopping planning.
ALTER TABLE events ADD CONSTRAINT events_occurred_at_finite CHECK (isfinite(occurred_at));
