-- XFS project ids of quota scopes (backend = "xfs"): one per scope, unique per volume, freed
-- (and reused, smallest first) when its scope is deleted.
CREATE TABLE quota_projects (
    volume      TEXT NOT NULL,
    qsid        TEXT NOT NULL,
    project_id  INTEGER NOT NULL,
    PRIMARY KEY (volume, qsid),
    UNIQUE (volume, project_id)
);
