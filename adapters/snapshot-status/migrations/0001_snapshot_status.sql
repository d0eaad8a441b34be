-- One row per (correlation id, collection): the original's DynamoDB export-status item.
-- status: Pending (only files seen so far) | Exported | Sent | Received | Success.
CREATE TABLE snapshot_collections (
    correlation_id TEXT NOT NULL,
    collection_name TEXT NOT NULL,
    status TEXT NOT NULL,
    files_exported BIGINT,
    files_sent BIGINT,
    files_received BIGINT NOT NULL,
    snapshot_type TEXT NOT NULL,
    export_date TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (correlation_id, collection_name)
);

-- Every received file once: a redelivered file message is not counted again.
-- triggered = 'received' on the file whose arrival moved the collection to Received.
CREATE TABLE snapshot_received_files (
    correlation_id TEXT NOT NULL,
    collection_name TEXT NOT NULL,
    file_key TEXT NOT NULL,
    received_at TEXT NOT NULL,
    triggered TEXT,
    PRIMARY KEY (correlation_id, collection_name, file_key)
);

-- Product status per correlation id: RECEIVED, then COMPLETED.
CREATE TABLE snapshot_products (
    correlation_id TEXT PRIMARY KEY NOT NULL,
    status TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
