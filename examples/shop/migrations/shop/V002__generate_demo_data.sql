-- Deterministic demo data: 1,000 users, 12 categories, 5,000 products,
-- 3,000 orders and about 9,000 order items.
SELECT setseed(0.42);

INSERT INTO categories (name)
SELECT unnest(ARRAY['books', 'garden', 'kitchen', 'toys', 'music', 'sports',
                    'office', 'tools', 'games', 'outdoor', 'health', 'pets']);

INSERT INTO users (email, name, tier, created_at)
SELECT format('user%s@example.com', g),
       format('User %s', g),
       CASE WHEN g % 7 = 0 THEN 'premium' ELSE 'standard' END,
       timestamptz '2025-01-01' + g * interval '7 hours'
FROM generate_series(1, 1000) AS g;

INSERT INTO products (name, price, cost, category_id, stock)
SELECT format('%s %s', (ARRAY['Red', 'Blue', 'Green', 'Small', 'Large', 'Classic', 'Smart', 'Quiet'])[1 + g % 8],
              (ARRAY['lamp', 'mug', 'chair', 'kettle', 'book', 'ball', 'pen', 'drill', 'puzzle', 'tent'])[1 + g % 10])
           || ' #' || g,
       round((2 + random() * 198)::numeric, 2),
       round((1 + random() * 90)::numeric, 2),
       1 + g % 12,
       (random() * 500)::int
FROM generate_series(1, 5000) AS g;

INSERT INTO orders (user_id, status, created_at)
SELECT 1 + (g * 37) % 1000,
       (ARRAY['placed', 'paid', 'shipped', 'cancelled'])[1 + g % 4],
       timestamptz '2025-06-01' + g * interval '53 minutes'
FROM generate_series(1, 3000) AS g;

INSERT INTO order_items (order_id, product_id, quantity, unit_price)
SELECT o.id, p.product_id, 1 + (o.id + p.product_id) % 4, pr.price
FROM orders AS o
CROSS JOIN LATERAL (
    SELECT DISTINCT 1 + ((o.id * 131 + k * 977) % 5000) AS product_id
    FROM generate_series(1, 3) AS k
) AS p
JOIN products AS pr ON pr.id = p.product_id;
