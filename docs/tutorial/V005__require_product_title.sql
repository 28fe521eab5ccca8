-- Every product has a title now (V004). Validating the constraint V003 added scans the table under a lock
-- that readers and writers do not wait for; SET NOT NULL then trusts it instead of scanning the table again
-- under its ACCESS EXCLUSIVE lock, which it holds for milliseconds.
SET LOCAL lock_timeout = '500ms';
SET LOCAL statement_timeout = '60s';
ALTER TABLE products VALIDATE CONSTRAINT products_title_not_null;
ALTER TABLE products ALTER COLUMN title SET NOT NULL;
-- The column says it now: the constraint is not needed any more.
-- squawk-ignore ban-drop-constraint
ALTER TABLE products DROP CONSTRAINT products_title_not_null;
