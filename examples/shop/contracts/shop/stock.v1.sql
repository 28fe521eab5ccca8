-- The stock of each product and its price, which checkout holds and puts back.
-- not null: product_id, price, stock
SELECT id AS product_id, price, stock
FROM products
