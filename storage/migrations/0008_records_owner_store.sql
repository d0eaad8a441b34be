-- Which store these records describe (s3://bucket/prefix, or file:// and a directory).
-- Two deployments of one tier with different stores on one database (staging and
-- production) aborted each other's recorded multipart uploads against the wrong bucket
-- and forgot them, and overwrote each other's records of one key: the second is refused.
-- NULL: recorded by a release before this column; the next start fills it in.
ALTER TABLE records_owner ADD COLUMN store TEXT;
