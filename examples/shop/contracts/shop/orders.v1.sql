-- Orders: who placed them, their status and when.
-- not null: id, user_id, status, created_at
SELECT id, user_id, status, created_at
FROM orders
