-- convctl schema, version 4: customer profiles (Customer API), their identities, and the
-- answers of API writes by Idempotency-Key
ALTER TABLE customers ADD COLUMN name TEXT;
ALTER TABLE customers ADD COLUMN email TEXT;
ALTER TABLE customers ADD COLUMN phone TEXT;
ALTER TABLE customers ADD COLUMN language TEXT;
ALTER TABLE customers ADD COLUMN external_id TEXT;
ALTER TABLE customers ADD COLUMN custom TEXT NOT NULL DEFAULT '{}';
ALTER TABLE customers ADD COLUMN known INTEGER NOT NULL DEFAULT 0;
ALTER TABLE customers ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE customers ADD COLUMN updated_at REAL;
ALTER TABLE customers ADD COLUMN deleted_at REAL;
UPDATE customers SET updated_at = created_at;
CREATE UNIQUE INDEX customers_external_id ON customers(external_id) WHERE external_id IS NOT NULL;
CREATE INDEX customers_email ON customers(email) WHERE email IS NOT NULL;
CREATE INDEX customers_phone ON customers(phone) WHERE phone IS NOT NULL;
CREATE INDEX customers_name ON customers(name) WHERE name IS NOT NULL;

-- kind: whatsapp, messenger, webchat (channel identities) or email, phone, external
CREATE TABLE identities (
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    customer_id TEXT NOT NULL REFERENCES customers(id),
    created_at REAL NOT NULL,
    PRIMARY KEY (kind, value)
);
CREATE INDEX identities_customer ON identities(customer_id);
-- the channel identities of the customers made before this version
INSERT OR IGNORE INTO identities (kind, value, customer_id, created_at)
SELECT json_extract(v.snapshot, '$.channel'),
       CASE WHEN json_extract(v.snapshot, '$.channel') = 'whatsapp'
                 AND substr(v.identity, 1, 1) <> '+'
            THEN '+' || v.identity ELSE v.identity END,
       c.id, c.created_at
FROM customers c JOIN conversations v ON v.customer_id = c.id;

-- one row per (principal + route, Idempotency-Key): the request's hash and the answer given
CREATE TABLE idempotency_keys (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    status INTEGER NOT NULL,
    response TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (scope, key)
)
