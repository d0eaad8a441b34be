-- The source path a multipart upload was started for: its object's metadata (nearline's
-- original-path) was written when it was created, so another file of the same size and
-- mtime on the same key (two roots, one relative path) must not resume it. An upload
-- recorded before this column (NULL) is not resumed either: started over once.
ALTER TABLE multipart_uploads ADD COLUMN source_path TEXT;
