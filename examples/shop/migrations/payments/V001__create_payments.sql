-- The payments service's private tables, in a database of its own: each customer's prepaid balance, and the
-- charges made against it. customer_id is the shop's users.id (another database: no foreign key can say so).
CREATE TABLE accounts (
    customer_id  bigint PRIMARY KEY,
    balance      numeric(10, 2) NOT NULL CHECK (balance >= 0)
);

CREATE TABLE charges (
    id           bigserial PRIMARY KEY,
    customer_id  bigint NOT NULL REFERENCES accounts (customer_id),
    amount       numeric(10, 2) NOT NULL CHECK (amount > 0),
    status       text NOT NULL DEFAULT 'captured' CHECK (status IN ('captured', 'refunded')),
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX charges_customer_id_idx ON charges (customer_id);
