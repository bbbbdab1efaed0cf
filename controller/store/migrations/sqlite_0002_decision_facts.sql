-- convctl schema, version 2: the facts every decision was made on (JSON), so a stored event
-- can be explained and backtested exactly; decisions recorded before this stay NULL
ALTER TABLE decisions ADD COLUMN facts TEXT
