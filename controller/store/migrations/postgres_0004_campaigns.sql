-- convctl schema on PostgreSQL, version 4 (SQLite's version 9): outbound campaigns, one row
-- per recipient (a campaign never messages a customer twice), and the opt-out list campaigns
-- honour at send time.
CREATE TABLE campaigns (
    id TEXT COLLATE "C" PRIMARY KEY,
    name TEXT NOT NULL,
    owner TEXT NOT NULL,
    channel TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    template JSONB NOT NULL,
    text TEXT,
    audience JSONB NOT NULL,
    rate DOUBLE PRECISION NOT NULL,
    starts_at DOUBLE PRECISION,
    ends_at DOUBLE PRECISION,
    hours_from TEXT,
    hours_to TEXT,
    status TEXT NOT NULL,
    recipients INTEGER NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    finished_at DOUBLE PRECISION
);
CREATE INDEX campaigns_status ON campaigns(status);
CREATE INDEX campaigns_owner ON campaigns(owner, id);

CREATE TABLE campaign_recipients (
    campaign_id TEXT COLLATE "C" NOT NULL REFERENCES campaigns(id),
    customer_id TEXT COLLATE "C" NOT NULL,
    position INTEGER NOT NULL,
    params JSONB NOT NULL DEFAULT '{}',
    status TEXT NOT NULL DEFAULT 'pending',
    reason TEXT,
    conversation_id TEXT COLLATE "C",
    event_id TEXT COLLATE "C",
    sent_at DOUBLE PRECISION,
    delivered_at DOUBLE PRECISION,
    read_at DOUBLE PRECISION,
    replied_at DOUBLE PRECISION,
    failed_at DOUBLE PRECISION,
    updated_at DOUBLE PRECISION NOT NULL,
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
    customer_id TEXT COLLATE "C" PRIMARY KEY,
    source TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
