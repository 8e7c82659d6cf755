-- tus concatenation: a partial upload names the upload (token session) it belongs to, where
-- its client declared it starts in the final upload (if it did), and that upload's length; a
-- final upload lists its partials' sessions, in order, separated by spaces.
ALTER TABLE uploads ADD COLUMN parent TEXT;
ALTER TABLE uploads ADD COLUMN partial_at INTEGER;
ALTER TABLE uploads ADD COLUMN partial_total INTEGER;
ALTER TABLE uploads ADD COLUMN parts TEXT;
CREATE INDEX uploads_parent ON uploads (parent) WHERE parent IS NOT NULL;

-- S3 partial uploads whose bytes are whole parts go straight into one multipart upload of the
-- final destination (`object_shared_uploads`, one per upload), numbered from `part_base`.
ALTER TABLE object_uploads ADD COLUMN part_base INTEGER NOT NULL DEFAULT 0;
ALTER TABLE object_uploads ADD COLUMN shared INTEGER NOT NULL DEFAULT 0;
CREATE TABLE object_shared_uploads (
    volume     TEXT NOT NULL,
    parent     TEXT NOT NULL,
    bucket     TEXT NOT NULL,
    key        TEXT NOT NULL,
    upload_id  TEXT NOT NULL,
    part_size  INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (volume, parent)
);
