-- Where each projection has read up to, per topic partition. A projection
-- writes its rows and its next offset in one transaction, so a crash never
-- applies an event twice (DESIGN.md: each event is applied once).
CREATE TABLE projection_offsets (
    projection  text    NOT NULL,
    topic       text    NOT NULL,
    partition   integer NOT NULL CHECK (partition >= 0),
    next_offset bigint  NOT NULL CHECK (next_offset >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, topic, partition)
);
