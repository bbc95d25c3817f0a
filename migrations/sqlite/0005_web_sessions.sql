-- Logged-out sessions of the owner's page, so that a logout holds after a restart and on every
-- replica. A row names a session by a hash of its nonce and lives until the session's cookie
-- would have expired anyway (unix seconds); expired rows are deleted at the next logout.
CREATE TABLE web_session_revocations (
    nonce_hash TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL
);
CREATE INDEX web_session_revocations_expires ON web_session_revocations (expires_at);
