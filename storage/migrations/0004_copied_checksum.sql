-- The checksum of the content a file was copied as: a key whose object was lost and then
-- stored again with other content (another file mapping to the same key) no longer
-- counts as a copy of the files recorded against the old content. NULL: older records.
ALTER TABLE copied_files ADD COLUMN checksum TEXT;
