-- Products as the storefront first saw them: name and price.
SELECT id, name, price
FROM products
