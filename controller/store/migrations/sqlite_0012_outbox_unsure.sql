-- convctl schema, version 12: whether an outbox row may already have reached its destination.
-- 1: the row was claimed (maybe in flight) when its process died; 2: it waits for the
-- provider's delivery status to tell (a WhatsApp status names the send by its
-- biz_opaque_callback_data) before it is sent again.
ALTER TABLE outbox ADD COLUMN unsure INTEGER NOT NULL DEFAULT 0;
