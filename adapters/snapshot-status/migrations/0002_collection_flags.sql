-- The shutdown_flag / reprocess_files the collection's files came with: the export-state
-- message carries them even when the counts message (with its own defaults) completes it.
ALTER TABLE snapshot_collections ADD COLUMN shutdown_flag TEXT;
ALTER TABLE snapshot_collections ADD COLUMN reprocess_files TEXT;
