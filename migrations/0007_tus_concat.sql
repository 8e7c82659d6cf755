-- tus concatenation: a partial upload names the upload (token session) it belongs to; a final
-- upload lists its partials' sessions, in order, separated by spaces.
ALTER TABLE uploads ADD COLUMN parent TEXT;
ALTER TABLE uploads ADD COLUMN parts TEXT;
