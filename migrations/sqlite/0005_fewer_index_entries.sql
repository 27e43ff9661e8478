-- PostgreSQL's 0005 slims the indexes its claims no longer read. SQLite
-- keeps them: its claim still finds pending rows by broker, and an inline
-- UNIQUE cannot be replaced without rebuilding the table. This migration
-- keeps the two schema versions in step.
SELECT 1;
