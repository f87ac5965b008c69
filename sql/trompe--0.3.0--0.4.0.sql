-- Upgrade of trompe from 0.3.0 to 0.4.0 (ALTER EXTENSION trompe UPDATE): a row retired by a
-- unique collision is removed everywhere by a transaction of the retiring node whose version is
-- newer than the row's (0.3.0 logged the removal inside the apply transaction, with the row's
-- own commit time, and it lost to the row on nodes whose id sorts higher).
\echo Use "ALTER EXTENSION trompe UPDATE TO '0.4.0'" to load this file. \quit

CREATE TABLE trompe.retirements (
    relid oid NOT NULL,
    key text[] NOT NULL,
    PRIMARY KEY (relid, key)
);
COMMENT ON TABLE trompe.retirements IS 'Rows retired by a unique collision whose removal the worker has still to log as this node''s own change.';
