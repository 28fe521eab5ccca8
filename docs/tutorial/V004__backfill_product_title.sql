-- gatehouse: batch 1000
-- Fill title for the rows written before V003, 1000 at a time, each batch in its own short transaction:
-- readers never wait, and the subquery selects only rows not yet done, so a run that stops halfway
-- continues where it was.
UPDATE products SET title = name
WHERE id IN (SELECT id FROM products WHERE title IS NULL LIMIT :batch_size FOR UPDATE SKIP LOCKED);
