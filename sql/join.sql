-- A node joining a running cluster: trompe.add_peer(name, conninfo, sync => true) on a new,
-- empty node makes its worker copy the schema (pg_dump), the rows, the tombstones and the large
-- objects of every replicated table from that peer, all read in one snapshot of the peer.
-- Each copied row keeps its version (the commit time and node of the transaction that wrote
-- it at the peer), so that changes still on their way resolve the same way on the new node as
-- everywhere else. The new node then pulls the peer from that snapshot, and every other node
-- from where the peer had applied its changes in that snapshot.

-- The copy from a peer, while it runs and after (one row per sync).
CREATE TABLE trompe.syncs (
    node_id uuid PRIMARY KEY REFERENCES trompe.peers (node_id) ON DELETE CASCADE,
    state text NOT NULL DEFAULT 'waiting' CHECK (state IN ('waiting', 'copying', 'done')),
    attempts int NOT NULL DEFAULT 0,
    tables_total int,
    tables_copied int NOT NULL DEFAULT 0,
    rows_copied bigint NOT NULL DEFAULT 0,
    started_at timestamptz,
    finished_at timestamptz,
    -- What the current attempt created (pg_dump's DROP ... IF EXISTS statements): run before
    -- the copy is attempted again, so that every attempt starts from an empty node.
    undo text,
    -- How many rows the source's replicated tables hold, from its statistics (reltuples).
    rows_estimate bigint
);
COMMENT ON TABLE trompe.syncs IS 'Copies of a peer''s schema and data made by add_peer(..., sync => true), with their progress.';

-- Where this node starts pulling the nodes its sync source replicated from: the position the
-- source had applied in the snapshot the copy came from. add_peer uses (and removes) it.
CREATE TABLE trompe.start_positions (
    node_id uuid PRIMARY KEY,
    source uuid NOT NULL,
    done text NOT NULL,
    cur text,
    after bigint NOT NULL DEFAULT 0,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE trompe.start_positions IS 'Positions at which add_peer starts pulling nodes this node has copied from another (sync).';

-- The version of what transaction `xmin_expr` wrote, as SQL: its commit time (µs since
-- 2000-01-01, NULL if not known) and node (this node for local commits, the peer whose
-- replication origin applied it otherwise), with the nodes spelled out (a peer running the SQL
-- may not read trompe.node or pg_replication_origin).
CREATE FUNCTION trompe._version_sql(xmin_expr text) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN format(
        '(SELECT ((extract(epoch FROM c.timestamp) - 946684800) * 1000000)::bigint AS ts,
                 CASE c.roident WHEN 0 THEN %L::uuid %s END AS node
            FROM pg_catalog.pg_xact_commit_timestamp_origin(%s) c)',
        (SELECT node_id FROM trompe.node),
        (SELECT string_agg(format('WHEN %s THEN %L::uuid', o.roident, substr(o.roname, 8, 36)), ' ')
           FROM pg_catalog.pg_replication_origin o WHERE o.roname ~ '^trompe_[0-9a-f-]{36}(_[0-9]+)?$'),
        xmin_expr);
END
$$;

-- The query that reads every row of a replicated table in canonical form (as fetch_rows
-- returns rows) with the version that wrote it, in no particular order. For a node copying
-- this one, which runs it in its snapshot (and so needs to be able to read the table).
CREATE FUNCTION trompe.sync_rows_sql(rel regclass) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s record;
BEGIN
    PERFORM trompe._require_peer_login();
    s := trompe._table_sql(rel);
    RETURN format('SELECT (%s)::text, v.ts, v.node FROM %s t CROSS JOIN LATERAL %s v',
                  s.row_json, rel, trompe._version_sql('t.xmin'));
END
$$;

-- The tombstones (deleted keys) and table truncations of replicated tables, with their
-- versions, ordered by version (key is NULL for a truncation). For a node copying this one.
CREATE FUNCTION trompe.sync_removals()
RETURNS TABLE (table_name text, key text[], ts bigint, node uuid)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM trompe._require_peer_login();
    RETURN QUERY EXECUTE format(
        'SELECT r.relid::regclass::text, r.key, v.ts, v.node
           FROM (SELECT relid, key, xmin FROM trompe.tombstones
                 UNION ALL SELECT relid, NULL, xmin FROM trompe.truncations) r
           JOIN trompe.tables t ON t.relid = r.relid
          CROSS JOIN LATERAL %s v
          ORDER BY v.node, v.ts', trompe._version_sql('r.xmin'));
END
$$;

-- What a node copying this one needs to know, read in the copy's snapshot (so it must run in
-- a REPEATABLE READ transaction, which then holds the data to copy, begun while the caller holds
-- the apply lock, pg_advisory_lock(128034844536933), so that the positions it reads from the
-- replication origins match the snapshot exactly): that snapshot, exported
-- for pg_dump, and this node's id; the position this node has applied from each of its peers;
-- the replicated tables with their conflict rules; the node priorities; the replicated schemas.
-- Positions kept for removed peers are not listed: the copy does not pull them.
CREATE FUNCTION trompe.sync_source()
RETURNS TABLE (kind text, name text, a text, b text, c text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM trompe._require_peer_login();
    IF current_setting('transaction_isolation') <> 'repeatable read' THEN
        RAISE EXCEPTION 'trompe.sync_source() must run in a REPEATABLE READ transaction'
            USING ERRCODE = 'invalid_transaction_state';
    END IF;
    RETURN QUERY SELECT 'snapshot', NULL::text, pg_current_snapshot()::text, pg_export_snapshot(),
                        (SELECT node_id::text FROM trompe.node);
    RETURN QUERY SELECT 'position', p.node_id::text, p.done, p.cur,
                        trompe._applied_after(p.node_id, p.cur, p.after, p.after_offset)::text
                   FROM trompe.progress p WHERE EXISTS (SELECT 1 FROM trompe.peers x WHERE x.node_id = p.node_id);
    RETURN QUERY SELECT 'table', format('%I.%I', n.nspname, r.relname), t.conflict_rule, NULL::text, NULL::text
                   FROM trompe.tables t JOIN pg_class r ON r.oid = t.relid JOIN pg_namespace n ON n.oid = r.relnamespace;
    RETURN QUERY SELECT 'priority', p.node_id::text, p.priority::text, NULL::text, NULL::text
                   FROM trompe.node_priorities p;
    RETURN QUERY SELECT 'schema', s.schema_name::text, NULL::text, NULL::text, NULL::text FROM trompe.schemas s;
END
$$;

-- The statement that inserts copied rows ($1: a jsonb array of canonical rows whose large
-- objects are here already) into a replicated table of this node.
CREATE FUNCTION trompe._sync_insert_sql(rel regclass) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s record;
BEGIN
    s := trompe._table_sql(rel);
    RETURN format(
        'WITH a AS (SELECT * FROM jsonb_populate_recordset(NULL::%s, %s))
         INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM a',
        rel,
        -- Rows that may refer to large objects get this node's oids; others are taken as sent.
        CASE WHEN s.row_local = 'r' THEN '$1::jsonb'
             ELSE format('(SELECT jsonb_agg(%s) FROM jsonb_array_elements($1::jsonb) r)', s.row_local) END,
        rel, s.columns, s.columns);
END
$$;
