-- Deterministic demo data: product N of the shop's 5,000 has N % 3 reviews (product 1 one, product 2 two,
-- product 3 none, ...), about 5,000 in all.
INSERT INTO reviews (product_id, author, stars, body, created_at)
SELECT p,
       format('User %s', 1 + (p * 37 + k * 11) % 1000),
       s.stars,
       (ARRAY['Broke within a week.', 'Smaller than in the picture.', 'Does the job.',
              'Good value for the price.', 'Excellent, would buy again.'])[s.stars],
       timestamptz '2025-07-01' + (p * 3 + k) * interval '41 minutes'
FROM generate_series(1, 5000) AS p
CROSS JOIN LATERAL generate_series(1, p % 3) AS k
CROSS JOIN LATERAL (SELECT 1 + (p * 7 + k * 3 + 3) % 5 AS stars) AS s;
