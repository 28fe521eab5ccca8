-- The shop's private tables. No application ever reads these directly:
-- they see only the contract views gatehouse builds in api_v1, api_v2, ...
CREATE TABLE users (
    id          bigserial PRIMARY KEY,
    email       text NOT NULL UNIQUE,
    name        text NOT NULL,
    tier        text NOT NULL DEFAULT 'standard' CHECK (tier IN ('standard', 'premium')),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE categories (
    id    serial PRIMARY KEY,
    name  text NOT NULL UNIQUE
);

CREATE TABLE products (
    id           bigserial PRIMARY KEY,
    name         text NOT NULL,
    price        numeric(10, 2) NOT NULL CHECK (price >= 0),
    cost         numeric(10, 2) NOT NULL,          -- internal: never in a contract
    category_id  integer REFERENCES categories (id),
    stock        integer NOT NULL DEFAULT 0
);
CREATE INDEX products_category_id_idx ON products (category_id);

CREATE TABLE orders (
    id          bigserial PRIMARY KEY,
    user_id     bigint NOT NULL REFERENCES users (id),
    status      text NOT NULL DEFAULT 'placed' CHECK (status IN ('placed', 'paid', 'shipped', 'cancelled')),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_user_id_idx ON orders (user_id);

CREATE TABLE order_items (
    order_id    bigint NOT NULL REFERENCES orders (id),
    product_id  bigint NOT NULL REFERENCES products (id),
    quantity    integer NOT NULL CHECK (quantity > 0),
    unit_price  numeric(10, 2) NOT NULL,
    PRIMARY KEY (order_id, product_id)
);
CREATE INDEX order_items_product_id_idx ON order_items (product_id);
