-- Opens, clicks and bounce reports are recorded once per message (and clicked link): a repeat
-- adds one to `count` instead of a row, so a flood of pixel fetches or repeated reports cannot
-- fill the database, and a repeated soft bounce counts once toward the suppression limit.
-- `once_key` tells such lines apart ('' or a hash of the clicked URL); older lines have none
-- and keep their own rows (the partial index starts empty, so this is quick on a big table).
ALTER TABLE message_events ADD COLUMN count bigint NOT NULL DEFAULT 1;
ALTER TABLE message_events ADD COLUMN once_key text;
CREATE UNIQUE INDEX message_events_once ON message_events (message_id, kind, once_key)
    WHERE once_key IS NOT NULL;
