-- When an address is allowed again (`suppress remove`), the time it was suppressed is kept:
-- events that occurred then never become messages, so nothing from that time is mailed late.
CREATE TABLE suppression_periods (
    email      TEXT NOT NULL,
    reason     TEXT NOT NULL,
    source     TEXT NOT NULL,
    since      TEXT NOT NULL,
    until      TEXT NOT NULL
);
CREATE INDEX suppression_periods_email ON suppression_periods (email, since);
