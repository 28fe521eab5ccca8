-- Deterministic demo data: an account for each of the shop's 1,000 customers. Every tenth customer (10, 20,
-- ...) has nothing left to spend, so that an order of theirs is declined and undone.
INSERT INTO accounts (customer_id, balance)
SELECT g, CASE WHEN g % 10 = 0 THEN 0 ELSE 500 + (g % 7) * 100 END
FROM generate_series(1, 1000) AS g;
