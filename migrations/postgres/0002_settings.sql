-- Values the daemon keeps for itself, such as the secret that signs links when the config
-- names none (shared by every process using this database).
CREATE TABLE settings (
    key        text PRIMARY KEY,
    value      text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
