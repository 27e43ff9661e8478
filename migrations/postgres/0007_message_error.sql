-- Dead letters: a message that fails (tried too many times, or abandoned)
-- keeps why, as a dispatch intent already does.
ALTER TABLE messages ADD COLUMN error TEXT;
