-- Products as the storefront first saw them: name and price.
-- not null: id, name, price
SELECT id, name, price
FROM products
