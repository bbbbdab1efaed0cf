-- convctl schema, version 6: what a transcript message shows besides its text (buttons, an
-- image), as JSON; NULL for plain text.
ALTER TABLE messages ADD COLUMN content TEXT;
