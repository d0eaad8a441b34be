-- The SHA-256 of an object's content where its checksum is another algorithm's (the
-- nearline vault's MD5): MD5 and size alone tell no two contents apart (colliding files
-- are made in seconds), so reusing an object for a file, or taking it for the file's
-- earlier copy, also needs this to match. NULL: not known (archive objects, whose
-- checksum is SHA-256 already; older records, read back and filled in when looked at).
ALTER TABLE stored_objects ADD COLUMN content_sha256 TEXT;
