-- When each message first reached the service (its ordering key where it carries no time
-- of its own), by a digest of the message: a broker redelivery (an instance died between
-- its write and its ack) or a replay keeps its first place instead of being ordered as
-- received again, after newer updates applied meanwhile. Rows older than the retention
-- are pruned.
CREATE TABLE receipts (
    message TEXT PRIMARY KEY NOT NULL,
    received TEXT NOT NULL
);

CREATE INDEX receipts_received ON receipts (received);
