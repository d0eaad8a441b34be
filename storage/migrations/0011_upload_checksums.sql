-- Whether a multipart upload was created with SHA-256 checksums (1) or without (0): S3
-- refuses to complete an upload with parts of the other mode, so one recorded before the
-- store's `checksums` option changed is started over, not resumed. NULL: recorded before
-- this column (resumed; a completion the store refuses gives it up).
ALTER TABLE multipart_uploads ADD COLUMN checksums BIGINT;
