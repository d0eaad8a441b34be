-- Which service's records these are. online-archive and online-nearline share this schema,
-- and two tiers pointed at one database took each other's multipart uploads (and forgot
-- them), swept each other's, and blocked each other's claims: the second is refused.
CREATE TABLE IF NOT EXISTS records_owner (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    service TEXT NOT NULL
);
