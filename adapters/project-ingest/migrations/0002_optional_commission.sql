-- pluto-core's own project entries may have no commission (`commissionId` null or absent)
-- and never carry the commission's title: both columns of `projects` become nullable.
-- The table is rebuilt rather than altered so that one script serves SQLite (which cannot
-- drop a NOT NULL) and PostgreSQL. The rename comes first: in PostgreSQL it locks the table
-- until the migration commits, so a replica still running cannot write a row into the old
-- table after it was copied.
ALTER TABLE projects RENAME TO projects_0001;

CREATE TABLE projects (
    id TEXT PRIMARY KEY NOT NULL,
    title TEXT NOT NULL,
    status TEXT NOT NULL,
    commission_id TEXT,
    commission_title TEXT,
    production_office TEXT NOT NULL,
    created TEXT NOT NULL,
    version TEXT,
    last_event TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

INSERT INTO projects (id, title, status, commission_id, commission_title, production_office,
                      created, version, last_event, updated_at)
SELECT id, title, status, commission_id, commission_title, production_office,
       created, version, last_event, updated_at
FROM projects_0001;

DROP TABLE projects_0001;
