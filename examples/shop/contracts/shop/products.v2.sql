-- Products with their category name and stock level.
-- not null: id, name, price, stock
SELECT p.id, p.name, p.price, c.name AS category, p.stock
FROM products AS p
LEFT JOIN categories AS c ON c.id = p.category_id
