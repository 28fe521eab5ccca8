-- The reviews service's private table, in a database of its own. A review names the shop's product by id:
-- no foreign key can cross databases, so gatehouse.toml declares the link ([[relations]]).
CREATE TABLE reviews (
    id          bigserial PRIMARY KEY,
    product_id  bigint NOT NULL,
    author      text NOT NULL,
    stars       integer NOT NULL CHECK (stars BETWEEN 1 AND 5),
    body        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX reviews_product_id_idx ON reviews (product_id);
