-- The SHA-256 of the content a file was copied as, where the object's checksum is another
-- algorithm's (the nearline vault's MD5): a file no longer there is taken for copied only
-- when its record's object still holds that content. With the MD5 alone, a key whose
-- object was lost and stored again with other content of the same size and MD5 (colliding
-- files are made in seconds) read as the gone file's copy. NULL: not known (archive
-- copies, whose checksum is SHA-256 already; older records).
ALTER TABLE copied_files ADD COLUMN content_sha256 TEXT;
