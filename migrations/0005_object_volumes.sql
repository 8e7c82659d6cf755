-- Object-store volumes (backend = "s3"): which bucket (and key prefix) each vfolder is, whether
-- it is ours or registered (someone else's bucket), and its usage counters, kept up to date by
-- our own writes and recounted by rescans.
CREATE TABLE object_vfolders (
    volume      TEXT NOT NULL,
    vfid        TEXT NOT NULL,
    bucket      TEXT NOT NULL,
    prefix      TEXT NOT NULL,           -- "" or ending with "/"
    registered  INTEGER NOT NULL DEFAULT 0,
    read_only   INTEGER NOT NULL DEFAULT 0,
    objects     INTEGER NOT NULL DEFAULT 0,
    bytes       INTEGER NOT NULL DEFAULT 0,
    scanned_at  INTEGER,                 -- unix seconds of the last recount, NULL: never
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (volume, vfid)
);

-- Quota scopes of object-store volumes: a limit checked against the counters (the service
-- itself enforces none).
CREATE TABLE object_quota_scopes (
    volume      TEXT NOT NULL,
    qsid        TEXT NOT NULL,
    limit_bytes INTEGER,
    PRIMARY KEY (volume, qsid)
);

-- A tus upload going up as a multipart upload: its id, the parts stored so far and where the
-- local buffer of the next part starts, so a restart continues the same multipart upload.
CREATE TABLE object_uploads (
    volume      TEXT NOT NULL,
    session     TEXT NOT NULL,
    bucket      TEXT NOT NULL,
    key         TEXT NOT NULL,
    upload_id   TEXT,                    -- NULL until the first part goes up
    base        INTEGER NOT NULL DEFAULT 0,
    part_size   INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (volume, session)
);

CREATE TABLE object_upload_parts (
    volume      TEXT NOT NULL,
    session     TEXT NOT NULL,
    part        INTEGER NOT NULL,         -- 0-based
    content_id  TEXT NOT NULL,            -- the part's ETag (S3) or block id (Azure)
    size        INTEGER NOT NULL,
    PRIMARY KEY (volume, session, part)
);

-- FUSE mounts shared by sessions: one per (volume, bucket, mode), with who uses it. A mount no
-- one uses goes after its linger.
CREATE TABLE fuse_mounts (
    key          TEXT PRIMARY KEY,
    mountpoint   TEXT NOT NULL,
    linger_secs  INTEGER NOT NULL,
    released_at  INTEGER                 -- unix seconds its last user left, NULL: in use
);

CREATE TABLE fuse_mount_holders (
    key     TEXT NOT NULL,
    holder  TEXT NOT NULL,
    PRIMARY KEY (key, holder)
);
