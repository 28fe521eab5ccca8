-- Products with their title (it replaces name), category and stock.
-- not null: id, title, price, stock
SELECT p.id, p.title, p.price, c.name AS category, p.stock
FROM products AS p
LEFT JOIN categories AS c ON c.id = p.category_id
