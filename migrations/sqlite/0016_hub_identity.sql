-- The hub's identity: one random id, made once with the schema, that says
-- which hub a database holds. `switchyard db copy` refuses to copy into a
-- database that holds another hub, and an empty target takes the id of the
-- hub copied into it, so a copy can be run again. Stored as the 16 bytes of
-- a UUID, like every other id.
CREATE TABLE hub_identity (
    one    INTEGER PRIMARY KEY DEFAULT 1 CHECK (one = 1),
    hub_id BLOB NOT NULL CHECK (length(hub_id) = 16)
);
INSERT INTO hub_identity (one, hub_id) VALUES (1, randomblob(16));
