-- Commissions Pluto deleted (a message whose `commissionTitle` is "(DELETE)"), with the
-- deletion's ordering key: an event of the commission no newer than its deletion (a retry,
-- a redelivery, a replay of an older message) is stale instead of bringing back the
-- commission or one of its projects.
CREATE TABLE deleted_commissions (
    id TEXT PRIMARY KEY NOT NULL,
    version TEXT,
    version_tie TEXT,
    deleted_at TEXT NOT NULL
);
