-- convctl schema on PostgreSQL, version 2 (SQLite's version 8): the app registry, apps' event
-- subscriptions, and replays of outbox rows (a dead webhook delivery queued again keeps its id).
CREATE TABLE apps (
    id TEXT COLLATE "C" PRIMARY KEY,
    ord BIGINT GENERATED ALWAYS AS IDENTITY,  -- insertion order (SQLite's rowid)
    name TEXT NOT NULL,
    description TEXT,
    scopes JSONB NOT NULL,
    webhook_url TEXT,
    webhook_secret TEXT NOT NULL,
    enabled BOOLEAN NOT NULL DEFAULT TRUE,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    deleted_at DOUBLE PRECISION
);
-- names are unique among the apps that are not deleted
CREATE UNIQUE INDEX apps_live_name ON apps(name) WHERE deleted_at IS NULL;

CREATE TABLE app_subscriptions (
    id TEXT COLLATE "C" PRIMARY KEY,
    ord BIGINT GENERATED ALWAYS AS IDENTITY,
    app_id TEXT NOT NULL REFERENCES apps(id),
    event_types JSONB NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX app_subscriptions_app ON app_subscriptions(app_id);

ALTER TABLE outbox ADD COLUMN replays INTEGER NOT NULL DEFAULT 0;
CREATE INDEX outbox_destination ON outbox(destination, id);
