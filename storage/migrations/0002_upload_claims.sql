-- Who is uploading to a key right now: taken before the key is checked and released
-- after the copy is recorded, so two handlers or instances never both find a key free
-- and overwrite each other. A claim is a lease (renewed while the upload runs), so one
-- left by a killed process expires on its own.
CREATE TABLE IF NOT EXISTS upload_claims (
    object_key TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
