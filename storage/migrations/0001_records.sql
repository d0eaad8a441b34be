-- Records of one storage tier (each service has its own database).
-- Portable between SQLite and PostgreSQL.

-- Every object this tier stored, with its verified size and checksum.
CREATE TABLE IF NOT EXISTS stored_objects (
    object_key TEXT PRIMARY KEY,
    size BIGINT NOT NULL,
    algorithm TEXT NOT NULL,
    checksum TEXT NOT NULL,
    stored_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS stored_objects_by_content ON stored_objects (checksum, size);

-- Which online file is held in which object (a file may map to a sibling key when the
-- natural key already held other content).
CREATE TABLE IF NOT EXISTS copied_files (
    original_path TEXT NOT NULL,
    object_key TEXT NOT NULL,
    size BIGINT NOT NULL,
    mtime TEXT NOT NULL,
    imported_id TEXT,
    recorded_at TEXT NOT NULL,
    PRIMARY KEY (original_path, object_key)
);

-- Files the sweeper marked `ignore: true`.
CREATE TABLE IF NOT EXISTS ignored_files (
    original_path TEXT PRIMARY KEY,
    imported_id TEXT,
    recorded_at TEXT NOT NULL
);

-- Every failed attempt, with its error.
CREATE TABLE IF NOT EXISTS failures (
    id TEXT PRIMARY KEY,
    original_path TEXT NOT NULL,
    error TEXT NOT NULL,
    permanent BIGINT NOT NULL,
    attempt BIGINT NOT NULL,
    failed_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS failures_by_path ON failures (original_path);
