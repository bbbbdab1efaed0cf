-- Capacity per channel kind (JSON object, {} = any channel up to the total) and teams
-- (JSON list) of each agent. Skills stay in `skills`: a JSON list (every skill level 1) or
-- a JSON object {name: level}.
ALTER TABLE agents ADD COLUMN channels TEXT NOT NULL DEFAULT '{}';
ALTER TABLE agents ADD COLUMN teams TEXT NOT NULL DEFAULT '[]'
