-- Upgrade of trompe from 0.4.0 to 0.5.0 (ALTER EXTENSION trompe UPDATE).
\echo Use "ALTER EXTENSION trompe UPDATE TO '0.5.0'" to load this file. \quit

-- Convergence (issue 17) ------------------------------------------------------------------
-- Transactions set aside by trompe.skip(); renames and drops kept for changes in flight; row
-- versions kept across table rewrites and freezing.
-- Peer transactions an admin set aside with trompe.skip() because they could not be applied:
-- kept whole, with the error, so nothing is discarded unseen.
CREATE TABLE trompe.exceptions (
    id bigserial PRIMARY KEY,
    node_id uuid NOT NULL,
    peer text NOT NULL,
    origin_txn bigint NOT NULL,
    committed_at timestamptz,
    error text NOT NULL,
    changes jsonb NOT NULL,
    skipped_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE trompe.exceptions IS 'Peer transactions set aside by trompe.skip(), with their error and every change.';

-- The transaction of a peer an admin asked to set aside (trompe.skip); the worker removes the
-- request when it has done so.
CREATE TABLE trompe.skip_requests (
    node_id uuid PRIMARY KEY REFERENCES trompe.peers (node_id) ON DELETE CASCADE,
    txn bigint NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE trompe.skip_requests IS 'Failing peer transactions trompe.skip() asked the worker to set aside.';

-- Renames and drops of replicated tables and their columns made on this node, kept for the
-- tombstone retention: a peer's change written before the DDL reached it names the old table or
-- column, and apply maps it to what remains (src/ddl_history.rs).
CREATE TABLE trompe.schema_changes (
    id bigserial PRIMARY KEY,
    relid oid NOT NULL,
    kind text NOT NULL CHECK (kind IN ('rename_table', 'drop_table', 'rename_column', 'drop_column')),
    old_nsp name,
    old_rel name,
    old_column name,
    new_column name,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX schema_changes_relid ON trompe.schema_changes (relid);
COMMENT ON TABLE trompe.schema_changes IS 'Renames and drops of replicated tables and columns, for changes of peers still naming them.';

-- Row versions PostgreSQL's records no longer tell (src/row_versions.rs): kept before a table
-- rewrite (under the rewriting transaction) and before vacuum may freeze a row (under the row's
-- own xmin); a row reads its kept version when its xmin is the one kept.
CREATE TABLE trompe.row_versions (
    relid oid NOT NULL,
    key text[] NOT NULL,
    row_xmin xid NOT NULL,
    committed_us bigint,
    node_id uuid,
    PRIMARY KEY (relid, key)
);
COMMENT ON TABLE trompe.row_versions IS 'Versions of rows kept across table rewrites and freezing (commit time in µs since 2000-01-01, node).';

-- Transactions that rewrote a replicated table: their rows have kept versions.
CREATE TABLE trompe.rewrites (
    relid oid NOT NULL,
    xid xid8 NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (relid, xid)
);
COMMENT ON TABLE trompe.rewrites IS 'Transactions that rewrote replicated tables (their rows'' versions are in trompe.row_versions).';

CREATE FUNCTION trompe."skip"(
	"peer" TEXT,
	"txn" bigint DEFAULT NULL
) RETURNS bigint
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'skip_wrapper';
REVOKE EXECUTE ON FUNCTION trompe.skip(text, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION trompe.skip(text, bigint) TO trompe_admin;
GRANT SELECT ON trompe.exceptions TO trompe_admin;

CREATE FUNCTION trompe."_dropped_index_table"(
	"index" oid
) RETURNS oid
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_dropped_index_table_wrapper';

CREATE FUNCTION trompe."_incoming_above_row"(
	"xmin" xid,
	"key" TEXT[]
) RETURNS bool
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_incoming_above_row_wrapper';

CREATE FUNCTION trompe."_note_dropped"() RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_note_dropped_wrapper';

CREATE FUNCTION trompe."_preserve_versions"(
	"relid" oid
) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_preserve_versions_wrapper';

CREATE FUNCTION trompe."_row_version"(
	"relid" oid,
	"xmin" xid,
	"key" TEXT[]
) RETURNS TABLE (
	"committed_us" bigint,
	"node_id" uuid
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_row_version_wrapper';
REVOKE EXECUTE ON FUNCTION trompe._row_version(oid, xid, text[]) FROM PUBLIC;

CREATE OR REPLACE FUNCTION trompe.on_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    dropped_tables oid[];
    replicate boolean;
    object_schema text;
    object_name text;
BEGIN
    IF NOT trompe._capture_skipped()
       AND EXISTS (SELECT 1 FROM pg_event_trigger_dropped_objects() o
                    WHERE o.object_type = 'trigger'
                      AND o.address_names[array_length(o.address_names, 1)] IN ('trompe_capture', 'trompe_truncate')
                      AND o.original AND NOT o.is_temporary) THEN
        RAISE EXCEPTION 'cannot drop trompe''s capture trigger of a replicated table'
              USING ERRCODE = 'dependent_objects_still_exist',
                    HINT = 'Stop replicating the table with trompe.remove_table() instead.';
    END IF;
    SELECT array_agg(o.objid) FILTER (WHERE o.object_type = 'table'),
           bool_or(o.schema_name IN (SELECT schema_name::text FROM trompe.schemas)
                   OR (o.object_type = 'table' AND o.objid IN (SELECT relid::oid FROM trompe.tables))
                   OR (o.object_type = 'index' AND trompe._dropped_index_table(o.objid) IN (SELECT relid::oid FROM trompe.tables))),
           min(o.schema_name), min(o.object_identity)
      INTO dropped_tables, replicate, object_schema, object_name
      FROM pg_event_trigger_dropped_objects() o
     WHERE NOT o.is_temporary;
    PERFORM trompe._note_dropped();
    IF NOT trompe._capture_skipped() AND coalesce(replicate, false) AND tg_tag LIKE 'DROP %' THEN
        PERFORM trompe._log_ddl(tg_tag, coalesce(object_schema, ''), coalesce(object_name, ''));
    END IF;
    IF dropped_tables IS NOT NULL THEN
        PERFORM trompe._forget_dropped(dropped_tables);
    END IF;
END
$$;
ALTER EVENT TRIGGER trompe_sql_drop ENABLE ALWAYS;

CREATE FUNCTION trompe.on_table_rewrite() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM trompe._preserve_versions(pg_event_trigger_table_rewrite_oid());
END
$$;
CREATE EVENT TRIGGER trompe_table_rewrite ON table_rewrite
    EXECUTE FUNCTION trompe.on_table_rewrite();
ALTER EVENT TRIGGER trompe_table_rewrite ENABLE ALWAYS;
