-- convctl schema, version 8: the app registry, apps' event subscriptions, and replays of
-- outbox rows (a dead webhook delivery queued again keeps its id).
CREATE TABLE apps (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    description TEXT,
    scopes TEXT NOT NULL,
    webhook_url TEXT,
    webhook_secret TEXT NOT NULL,
    enabled INTEGER NOT NULL DEFAULT 1,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    deleted_at REAL
);
-- names are unique among the apps that are not deleted
CREATE UNIQUE INDEX apps_live_name ON apps(name) WHERE deleted_at IS NULL;

CREATE TABLE app_subscriptions (
    id TEXT PRIMARY KEY,
    app_id TEXT NOT NULL REFERENCES apps(id),
    event_types TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX app_subscriptions_app ON app_subscriptions(app_id);

ALTER TABLE outbox ADD COLUMN replays INTEGER NOT NULL DEFAULT 0;
CREATE INDEX outbox_destination ON outbox(destination, id);
