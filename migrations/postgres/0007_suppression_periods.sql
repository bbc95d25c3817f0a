-- When an address is allowed again (`suppress remove`), the time it was suppressed is kept:
-- events that occurred then never become messages, so nothing from that time is mailed late.
CREATE TABLE suppression_periods (
    email      text NOT NULL,
    reason     text NOT NULL,
    source     text NOT NULL,
    since      timestamptz NOT NULL,
    until      timestamptz NOT NULL
);
CREATE INDEX suppression_periods_email ON suppression_periods (email, since);
