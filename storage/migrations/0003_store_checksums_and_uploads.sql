-- What the store said about each verified object (S3: ETag, version id, ChecksumSHA256
-- as `<base64>` or `<base64>-<parts>`), so a redelivery can confirm an object with one
-- HEAD instead of downloading it again. NULL: not known (a local store, older records).
ALTER TABLE stored_objects ADD COLUMN store_etag TEXT;
ALTER TABLE stored_objects ADD COLUMN store_version TEXT;
ALTER TABLE stored_objects ADD COLUMN store_checksum TEXT;

-- Multipart uploads under way (S3), kept until completed or aborted so that an upload
-- interrupted by a crash resumes from its stored parts; one abandoned for longer than
-- the service's `abort_abandoned_uploads_after_ms` is aborted.
CREATE TABLE IF NOT EXISTS multipart_uploads (
    object_key TEXT PRIMARY KEY,
    upload_id TEXT NOT NULL,
    -- The source as it was when the upload started: another size or mtime starts over.
    source_size BIGINT NOT NULL,
    source_mtime TEXT NOT NULL,
    part_size BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    -- Epoch milliseconds of the last stored part (what "abandoned" is measured from).
    touched_at BIGINT NOT NULL
);

-- Parts stored for those uploads: reused on resume when the store still lists the part
-- with this ETag and the file's bytes still hash to this SHA-256.
CREATE TABLE IF NOT EXISTS multipart_parts (
    upload_id TEXT NOT NULL,
    part_number BIGINT NOT NULL,
    etag TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL,
    PRIMARY KEY (upload_id, part_number)
);
