-- Per-user session containers (SFTP, file browser). Rows in starting/running/terminating are
-- what counts against the node's capacity and the per-user limit.
CREATE TABLE sessions (
    id              TEXT PRIMARY KEY,        -- UUID
    kind            TEXT NOT NULL,           -- sftp | filebrowser
    user_id         TEXT NOT NULL,
    access_key      TEXT NOT NULL,
    resource_group  TEXT NOT NULL,
    username        TEXT NOT NULL,
    spec            TEXT NOT NULL,           -- JSON: mounts, keys, limits, idle timeout, ...
    state           TEXT NOT NULL,           -- starting | running | terminating | terminated | failed
    reason          TEXT,
    container_id    TEXT,
    port            INTEGER,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
CREATE INDEX sessions_state ON sessions(state);
CREATE INDEX sessions_user ON sessions(resource_group, user_id, state);
