-- The expiry sweep (state = ? AND expires_at < now) runs every few seconds under the write
-- lock; the anniversary and schedule planners page through one kind of event in seq order.
CREATE INDEX messages_expiring ON messages (state, expires_at);
CREATE INDEX events_kind_seq ON events (kind, seq);
