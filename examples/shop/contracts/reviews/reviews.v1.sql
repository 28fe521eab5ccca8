-- Product reviews, from the reviews service's own database. product_id is the shop's products.id
-- (gatehouse.toml links them: GET /products?select=id,name,reviews(stars,body) embeds across databases).
-- not null: id, product_id, author, stars, body, created_at
SELECT id, product_id, author, stars, body, created_at
FROM reviews
