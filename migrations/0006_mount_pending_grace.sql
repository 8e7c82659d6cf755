-- How long past its linger a mount waits for rclone's failing uploads before the unsaved files
-- are set aside and it goes (security review 2, G8).
ALTER TABLE fuse_mounts ADD COLUMN pending_grace_secs INTEGER NOT NULL DEFAULT 900;
