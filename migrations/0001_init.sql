-- Background tasks (folder delete/clone, delete-async): survive restarts.
CREATE TABLE bgtasks (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    params      TEXT NOT NULL,          -- JSON of the task's parameters
    status      TEXT NOT NULL,          -- running | done | failed | cancelled
    current     INTEGER NOT NULL DEFAULT 0,
    total       INTEGER NOT NULL DEFAULT 0,
    message     TEXT,
    error       TEXT,
    created_at  INTEGER NOT NULL,       -- unix seconds
    updated_at  INTEGER NOT NULL
);
CREATE INDEX bgtasks_status ON bgtasks(status);

-- tus upload sessions. `offset` is the last acknowledged (fsynced) byte count.
CREATE TABLE uploads (
    session     TEXT PRIMARY KEY,       -- 32 hex, the token's `session` claim
    volume      TEXT NOT NULL,
    vfid        TEXT NOT NULL,
    relpath     TEXT NOT NULL,
    size        INTEGER NOT NULL,
    "offset"    INTEGER NOT NULL DEFAULT 0,
    state       TEXT NOT NULL DEFAULT 'active',   -- active | done | expired
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
);
CREATE INDEX uploads_expires ON uploads(expires_at);
CREATE INDEX uploads_vfid ON uploads(volume, vfid);
