-- Commissions Pluto deleted (a message whose `commissionTitle` is "(DELETE)"), with the
-- deletion's ordering key and what it deleted (JSON: `commissionDeleted`,
-- `deletedProjects`, announced again by a retry or redelivery of the same deletion): an
-- event of the commission no newer than its deletion (a retry, a redelivery, a replay of
-- an older message) is stale instead of bringing back the commission or a project of it.
CREATE TABLE deleted_commissions (
    id TEXT PRIMARY KEY NOT NULL,
    version TEXT,
    version_tie TEXT,
    deleted_at TEXT NOT NULL,
    result TEXT
);

-- Projects deleted with their commission: the commission, the deletion's key and the key
-- of the newest state known of the project in it before the deletion (its row's, or an
-- older event's delivered after the deletion). An older update that had moved the project
-- to another commission after that state (delivered after the deletion) stores the project
-- again instead of finding it missing. `deleted_by_event`: the key of the event, delivered
-- after the deletion, that deleted the project's row (announced again at its retry).
CREATE TABLE deleted_projects (
    id TEXT PRIMARY KEY NOT NULL,
    commission_id TEXT NOT NULL,
    version TEXT,
    version_tie TEXT,
    row_version TEXT,
    row_version_tie TEXT,
    deleted_at TEXT NOT NULL,
    deleted_by_event TEXT
);

-- A deletion finds its commission's projects without reading every project.
CREATE INDEX projects_commission ON projects (commission_id);
