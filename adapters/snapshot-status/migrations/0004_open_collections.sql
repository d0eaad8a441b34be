-- The product checks ask whether a correlation id has a collection not yet Received (or
-- not yet Success) every time one of its collections moves: through these indexes of the
-- open collections alone, not by reading every collection of the run (a run of 150,000
-- collections made that quadratic: hours of the database's single writer).
CREATE INDEX snapshot_collections_not_received ON snapshot_collections (correlation_id)
    WHERE status NOT IN ('Received', 'Success');
CREATE INDEX snapshot_collections_not_success ON snapshot_collections (correlation_id)
    WHERE status <> 'Success';
