-- One row per customer: how many orders they placed and what they spent in all.
-- not null: customer_id, name, email, tier, order_count, total_spent
SELECT u.id AS customer_id,
       u.name,
       u.email,
       u.tier,
       count(DISTINCT o.id) AS order_count,
       coalesce(sum(oi.quantity * oi.unit_price), 0) AS total_spent
FROM users AS u
LEFT JOIN orders AS o ON o.user_id = u.id AND o.status <> 'cancelled'
LEFT JOIN order_items AS oi ON oi.order_id = o.id
GROUP BY u.id, u.name, u.email, u.tier
