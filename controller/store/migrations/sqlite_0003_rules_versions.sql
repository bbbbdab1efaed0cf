-- convctl schema, version 3: every rules version that became current, with its files
CREATE TABLE rules_versions (
    version TEXT PRIMARY KEY,
    files TEXT NOT NULL,
    loaded_at REAL NOT NULL,
    source TEXT NOT NULL
);
CREATE INDEX rules_versions_loaded ON rules_versions(loaded_at)
