-- convctl schema, version 9: outbound campaigns, one row per recipient (a campaign never
-- messages a customer twice), and the opt-out list campaigns honour at send time.
CREATE TABLE campaigns (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    owner TEXT NOT NULL,
    channel TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    template TEXT NOT NULL,
    text TEXT,
    audience TEXT NOT NULL,
    rate REAL NOT NULL,
    starts_at REAL,
    ends_at REAL,
    hours_from TEXT,
    hours_to TEXT,
    status TEXT NOT NULL,
    recipients INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX campaigns_status ON campaigns(status);
CREATE INDEX campaigns_owner ON campaigns(owner, id);

CREATE TABLE campaign_recipients (
    campaign_id TEXT NOT NULL REFERENCES campaigns(id),
    customer_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    params TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL DEFAULT 'pending',
    reason TEXT,
    conversation_id TEXT,
    event_id TEXT,
    sent_at REAL,
    delivered_at REAL,
    read_at REAL,
    replied_at REAL,
    failed_at REAL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (campaign_id, customer_id),
    UNIQUE (campaign_id, position)
);
CREATE INDEX campaign_recipients_pending ON campaign_recipients(campaign_id, position)
    WHERE status = 'pending';
CREATE INDEX campaign_recipients_status ON campaign_recipients(campaign_id, status, position);
CREATE INDEX campaign_recipients_event ON campaign_recipients(event_id)
    WHERE event_id IS NOT NULL;
CREATE INDEX campaign_recipients_conversation ON campaign_recipients(conversation_id)
    WHERE conversation_id IS NOT NULL;

CREATE TABLE campaign_opt_outs (
    customer_id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    created_at REAL NOT NULL
);
