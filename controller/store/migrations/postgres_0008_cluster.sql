-- convctl schema on PostgreSQL, version 8: several processes on one database.
-- processes: every running `convctl serve` registers and heartbeats (database time, epoch
-- seconds); one whose heartbeat is older than the heartbeat timeout is dead, and the
-- survivor that notices takes its row, its leases and its claims away in one transaction.
CREATE TABLE processes (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    heartbeat_at DOUBLE PRECISION NOT NULL
);

-- conversation_leases: the one process that decides a conversation's events, with a fencing
-- token that grows with every new lease; a decision commits only while its token is the
-- lease's token.
CREATE SEQUENCE lease_tokens;
CREATE TABLE conversation_leases (
    conversation_id TEXT COLLATE "C" PRIMARY KEY,
    owner TEXT NOT NULL,
    token BIGINT NOT NULL,
    acquired_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX conversation_leases_owner ON conversation_leases(owner);

-- which process claimed an outbox row or a due timer (NULL: nobody)
ALTER TABLE outbox ADD COLUMN claimed_by TEXT;
CREATE INDEX outbox_claimed_by ON outbox(claimed_by) WHERE claimed_by IS NOT NULL;
ALTER TABLE timers ADD COLUMN claimed_by TEXT;
CREATE INDEX timers_due ON timers(due_at);
