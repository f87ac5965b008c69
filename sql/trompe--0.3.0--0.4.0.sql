-- Upgrade of trompe from 0.3.0 to 0.4.0 (ALTER EXTENSION trompe UPDATE): conflict rules
-- first_update_wins and node_priority (trompe.set_node_priority, trompe.node_priorities); a row
-- removed by a unique collision is removed everywhere by a transaction of the node that met the
-- collision, whose version ranks above the row's (0.3.0 logged the removal inside the apply
-- transaction, with the incoming row's commit time, and a retired row won against it on nodes
-- whose id sorts higher).
\echo Use "ALTER EXTENSION trompe UPDATE TO '0.4.0'" to load this file. \quit

CREATE TABLE trompe.retirements (
    relid oid NOT NULL,
    key text[] NOT NULL,
    PRIMARY KEY (relid, key)
);
COMMENT ON TABLE trompe.retirements IS 'Rows retired by a unique collision whose removal the worker has still to log as this node''s own change.';

-- Node priorities for tables under conflict rule node_priority (see core/src/conflict.rs).
CREATE TABLE trompe.node_priorities (
    node_id uuid PRIMARY KEY,
    priority int NOT NULL
);
COMMENT ON TABLE trompe.node_priorities IS 'Priority of each node for tables under conflict rule node_priority (0 if not listed); set with trompe.set_node_priority(), the same on every node.';

CREATE FUNCTION trompe.set_node_priority(
	"node" uuid,
	"priority" INT
) RETURNS INT
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'set_node_priority_wrapper';
REVOKE EXECUTE ON FUNCTION trompe.set_node_priority(uuid, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION trompe.set_node_priority(uuid, integer) TO trompe_admin;
