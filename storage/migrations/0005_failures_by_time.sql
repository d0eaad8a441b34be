-- Failure records older than `keep_failures_days` are deleted every hour: found by time.
CREATE INDEX IF NOT EXISTS failures_by_time ON failures (failed_at);
