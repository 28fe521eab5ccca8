-- Charges against a customer's balance, captured or refunded.
-- not null: id, customer_id, amount, status, created_at
SELECT id, customer_id, amount, status, created_at
FROM charges
