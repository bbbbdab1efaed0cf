-- convctl schema on PostgreSQL, version 3 (SQLite's version 7): the provider's id of each
-- message a channel sent (a WhatsApp wamid, a Messenger mid), so a delivery status can name
-- our message.
CREATE TABLE provider_messages (
    instance TEXT NOT NULL,
    provider_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    sent_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (instance, provider_id)
);
CREATE INDEX provider_messages_message ON provider_messages(conversation_id, message_id);
