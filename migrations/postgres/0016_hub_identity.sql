-- The hub's identity: one random id, made once with the schema, that says
-- which hub a database holds. `switchyard db copy` refuses to copy into a
-- database that holds another hub, and an empty target takes the id of the
-- hub copied into it, so a copy can be run again.
CREATE TABLE hub_identity (
    one    BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    hub_id UUID NOT NULL
);
INSERT INTO hub_identity (one, hub_id) VALUES (TRUE, gen_random_uuid());
