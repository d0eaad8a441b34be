-- Runs deleted once completed and past `keep_completed_runs_days`: a message of such a run
-- that comes afterwards (a dead letter replayed weeks later) is dropped, instead of
-- starting the run over as a collection that never completes.
CREATE TABLE pruned_runs (
    correlation_id TEXT PRIMARY KEY NOT NULL,
    pruned_at TEXT NOT NULL
);
