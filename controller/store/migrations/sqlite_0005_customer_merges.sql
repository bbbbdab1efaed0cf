-- convctl schema, version 5: customer merges (Customer API). One row per merged-away
-- customer: its tombstone points to the customer it was merged into.
CREATE TABLE customer_merges (
    from_id TEXT PRIMARY KEY REFERENCES customers(id),
    into_id TEXT NOT NULL REFERENCES customers(id),
    identities INTEGER NOT NULL,
    conversations INTEGER NOT NULL,
    merged_at REAL NOT NULL
);
CREATE INDEX customer_merges_into ON customer_merges(into_id)
