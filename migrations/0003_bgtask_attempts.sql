-- Runs of a background task that ended in a crash (kill, OOM, abort) rather than a graceful
-- shutdown: a task is resumed after one crash but not after a second, so a task that crashes
-- the process (a pathological tree) cannot keep a node in a crash loop.
ALTER TABLE bgtasks ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1;
-- 1 when a graceful shutdown stopped the task (its next run is not counted as a crash retry).
ALTER TABLE bgtasks ADD COLUMN interrupted INTEGER NOT NULL DEFAULT 0;
