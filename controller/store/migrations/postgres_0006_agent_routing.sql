-- Capacity per channel kind ({} = any channel up to the total) and teams of each agent.
-- Skills stay in `skills`: a JSON list (every skill level 1) or an object {name: level}.
ALTER TABLE agents ADD COLUMN channels JSONB NOT NULL DEFAULT '{}'::jsonb;
ALTER TABLE agents ADD COLUMN teams JSONB NOT NULL DEFAULT '[]'::jsonb;
