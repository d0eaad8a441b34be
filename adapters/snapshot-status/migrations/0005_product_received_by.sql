-- Which message moved the run to RECEIVED (the collection and the message, as
-- completed_by names them), so only its retry or redelivery re-sends the run's
-- all-received monitoring message (its publish may have been lost), no other message's.
ALTER TABLE snapshot_products ADD COLUMN received_by TEXT;
