-- Which message made each change (a counts message's key; the collection whose success
-- file completed the product), so a retry or redelivery of that message re-sends its
-- export-state or monitoring message (its publish may have been lost) and no other
-- message's does.
ALTER TABLE snapshot_collections ADD COLUMN received_by TEXT;
ALTER TABLE snapshot_products ADD COLUMN completed_by TEXT;
