-- The lines of each order: which product, how many, and at what unit price.
-- not null: order_id, product_id, quantity, unit_price
SELECT order_id, product_id, quantity, unit_price
FROM order_items
