-- The frequency limit counts what went out to a customer: the moment a message's body started
-- going out (the phase fence), kept on the message. Messages sent or `unknown` before this
-- migration take their sent_at, or the last change of an `unknown` one.
ALTER TABLE messages ADD COLUMN body_at TEXT;
UPDATE messages SET body_at = COALESCE(sent_at, updated_at)
    WHERE state IN ('sent', 'unknown') OR (state = 'sending' AND phase = 'body');
-- "What went out to this customer since": a look-up per customer at every send.
CREATE INDEX messages_customer_body ON messages (customer_id, body_at) WHERE body_at IS NOT NULL;
