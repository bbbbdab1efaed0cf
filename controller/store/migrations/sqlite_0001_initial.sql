-- convctl schema, version 1
CREATE TABLE customers (
    id TEXT PRIMARY KEY,
    identity_key TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);

CREATE TABLE conversations (
    id TEXT PRIMARY KEY,
    instance TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    identity TEXT NOT NULL,
    customer_id TEXT NOT NULL REFERENCES customers(id),
    state TEXT NOT NULL,
    closed INTEGER NOT NULL DEFAULT 0,
    queue TEXT,
    priority INTEGER NOT NULL DEFAULT 0,
    enqueued_at REAL,
    snapshot TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 0,
    next_seq INTEGER NOT NULL DEFAULT 1,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
-- one open conversation per (channel instance, business endpoint, customer identity)
CREATE UNIQUE INDEX conversations_open_identity
    ON conversations(instance, endpoint, identity) WHERE closed = 0;
CREATE INDEX conversations_queued ON conversations(state) WHERE state = 'queued';
CREATE INDEX conversations_identity ON conversations(instance, endpoint, identity, created_at);

CREATE TABLE events (
    id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations(id),
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    source TEXT NOT NULL,
    dedupe_key TEXT NOT NULL,
    data TEXT NOT NULL,
    accepted_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    UNIQUE (source, dedupe_key),
    UNIQUE (conversation_id, seq)
);
CREATE INDEX events_pending ON events(conversation_id, seq) WHERE status = 'pending';

CREATE TABLE decisions (
    event_id TEXT PRIMARY KEY REFERENCES events(id),
    conversation_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    rules_version TEXT NOT NULL,
    matcher TEXT NOT NULL,
    outcome TEXT NOT NULL,
    state_after TEXT NOT NULL,
    fired TEXT NOT NULL,
    refused TEXT NOT NULL,
    decided_at REAL NOT NULL
);
CREATE INDEX decisions_conversation ON decisions(conversation_id, seq);

CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    destination TEXT NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    claimed INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    created_at REAL NOT NULL,
    done_at REAL,
    UNIQUE (event_id, n)
);
CREATE INDEX outbox_due ON outbox(next_attempt_at) WHERE status = 'pending';
CREATE INDEX outbox_order ON outbox(conversation_id, destination, id) WHERE status = 'pending';

CREATE TABLE timers (
    conversation_id TEXT NOT NULL,
    name TEXT NOT NULL,
    generation INTEGER NOT NULL,
    due_at REAL NOT NULL,
    PRIMARY KEY (conversation_id, name)
);

CREATE TABLE messages (
    id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL,
    sender_role TEXT NOT NULL,
    sender_id TEXT NOT NULL,
    text TEXT NOT NULL,
    visibility TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX messages_conversation ON messages(conversation_id, created_at);

CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    presence TEXT NOT NULL,
    capacity INTEGER NOT NULL,
    skills TEXT NOT NULL,
    idle_since REAL NOT NULL
);

CREATE TABLE offers (
    id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    resolved_at REAL
);
CREATE INDEX offers_pending ON offers(status) WHERE status = 'pending';
CREATE INDEX offers_conversation ON offers(conversation_id);

CREATE TABLE assignments (
    agent_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    since REAL NOT NULL,
    PRIMARY KEY (agent_id, conversation_id)
);

CREATE TABLE tokens (
    hash TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    subject TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
