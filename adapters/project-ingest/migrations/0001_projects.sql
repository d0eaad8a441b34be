-- Pluto commissions, keyed by Pluto's commission id.
CREATE TABLE commissions (
    id TEXT PRIMARY KEY NOT NULL,
    title TEXT NOT NULL,
    production_office TEXT NOT NULL,
    -- Ordering key of the event that last wrote this row (see docs/adapter-project-ingest.md).
    version TEXT,
    updated_at TEXT NOT NULL
);

-- Pluto projects, keyed by Pluto's project id.
CREATE TABLE projects (
    id TEXT PRIMARY KEY NOT NULL,
    title TEXT NOT NULL,
    status TEXT NOT NULL,
    commission_id TEXT NOT NULL,
    commission_title TEXT NOT NULL,
    production_office TEXT NOT NULL,
    created TEXT NOT NULL,
    version TEXT,
    last_event TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
