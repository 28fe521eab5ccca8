-- Each customer's prepaid balance at the payments service.
-- not null: customer_id, balance
SELECT customer_id, balance
FROM accounts
