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

-- A node joining with add_peer(..., sync => true) copies the node priorities too.
CREATE OR REPLACE FUNCTION trompe.sync_source()
RETURNS TABLE (kind text, name text, a text, b text, c text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF current_setting('transaction_isolation') <> 'repeatable read' THEN
        RAISE EXCEPTION 'trompe.sync_source() must run in a REPEATABLE READ transaction'
            USING ERRCODE = 'invalid_transaction_state';
    END IF;
    RETURN QUERY SELECT 'snapshot', NULL::text, pg_current_snapshot()::text, pg_export_snapshot(),
                        (SELECT node_id::text FROM trompe.node);
    RETURN QUERY SELECT 'position', p.node_id::text, p.done, p.cur,
                        trompe._applied_after(p.node_id, p.cur, p.after, p.after_offset)::text
                   FROM trompe.progress p;
    RETURN QUERY SELECT 'table', format('%I.%I', n.nspname, r.relname), t.conflict_rule, NULL::text, NULL::text
                   FROM trompe.tables t JOIN pg_class r ON r.oid = t.relid JOIN pg_namespace n ON n.oid = r.relnamespace;
    RETURN QUERY SELECT 'priority', p.node_id::text, p.priority::text, NULL::text, NULL::text
                   FROM trompe.node_priorities p;
    RETURN QUERY SELECT 'schema', s.schema_name::text, NULL::text, NULL::text, NULL::text FROM trompe.schemas s;
END
$$;
