-- Orders: who placed them, their status and when.
SELECT id, user_id, status, created_at
FROM orders
