-- Contract: no live API version reads products.name any more (v1 and v2 are retired), so it goes.
SET LOCAL lock_timeout = '500ms';
SET LOCAL statement_timeout = '5s';
DROP TRIGGER products_sync_title ON products;
DROP FUNCTION products_sync_title();
ALTER TABLE products DROP COLUMN name;
