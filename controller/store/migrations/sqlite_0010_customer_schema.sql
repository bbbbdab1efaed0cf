-- convctl schema, version 10: the custom profile field schema of the Customer API, one row
-- per version (the newest is in force; older ones stay for reference). ``document`` is the
-- JSON the admin sent: {"fields": [{name, type, values?, required, max_length?}], "allow_unknown"}.
CREATE TABLE customer_schemas (
    version INTEGER PRIMARY KEY,
    document TEXT NOT NULL,
    created_at REAL NOT NULL
);
