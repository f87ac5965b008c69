-- Upgrade of trompe from 0.4.0 to 0.5.0 (ALTER EXTENSION trompe UPDATE).
\echo Use "ALTER EXTENSION trompe UPDATE TO '0.5.0'" to load this file. \quit

-- The update changes tables that sessions (capture, the worker, peers' pulls) read while it
-- runs. Taking their locks one by one, as its statements go, can deadlock with such a session
-- reading them in another order, and either side may then be the one cancelled. So it takes
-- them all first, in one statement: should that still meet a session holding one of them and
-- waiting for another, the update (waiting first) is the one cancelled, lets go of all of them
-- and tries again.
DO $lock$
BEGIN
    FOR attempt IN 1..100 LOOP
        BEGIN
            LOCK TABLE trompe.peers, trompe.node, trompe.consumers, trompe.progress, trompe.log_rotation,
                trompe.syncs IN ACCESS EXCLUSIVE MODE;
            RETURN;
        EXCEPTION WHEN deadlock_detected THEN
            PERFORM pg_catalog.pg_sleep(0.05);
        END;
    END LOOP;
    RAISE EXCEPTION 'trompe: the update kept deadlocking with sessions using trompe''s tables'
        USING ERRCODE = 'deadlock_detected', HINT = 'Run ALTER EXTENSION trompe UPDATE again.';
END
$lock$;

-- A database not in UTF-8 cannot replicate text that is not plain ASCII: 0.5.0 refuses to be
-- created in one; an existing node is warned.
DO $encoding$
BEGIN
    IF pg_catalog.current_setting('server_encoding') <> 'UTF8' THEN
        RAISE WARNING 'trompe needs a database in encoding UTF8; database "%" is in %: any value or name that is not plain ASCII stops replication of its transaction',
                pg_catalog.current_database(), pg_catalog.current_setting('server_encoding')
            USING HINT = 'Move the node to a copy made with CREATE DATABASE ... TEMPLATE template0 ENCODING ''UTF8'', loaded from a dump of this one.';
    END IF;
END
$encoding$;

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
    -- Probes compare this, not the key array, down the index (src/row_versions/table_versions.rs).
    key_hash bigint NOT NULL GENERATED ALWAYS AS (pg_catalog.hash_array_extended(key, 0)) STORED,
    PRIMARY KEY (relid, key_hash, key)
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

-- How far the worker has kept the versions of aging rows, per table (src/row_versions/sweep.rs):
-- rows whose xmin precedes kept_below were looked at once and need not be again.
CREATE TABLE trompe.version_sweeps (
    relid oid PRIMARY KEY,
    kept_below xid8 NOT NULL
);
COMMENT ON TABLE trompe.version_sweeps IS 'Per replicated table, the transaction before which the versions of aging rows have been kept.';

-- Statements that freeze rows after keeping their versions (src/row_versions/freeze_window.rs):
-- a row committed in between is frozen without a kept version and reads its commit timestamp
-- until the statement has ended and its version is kept.
CREATE TABLE trompe.freeze_windows (
    relid oid NOT NULL,
    since xid8 NOT NULL,
    pid int NOT NULL,
    backend_start timestamptz NOT NULL,
    query_start timestamptz NOT NULL,
    PRIMARY KEY (relid, pid, backend_start, query_start)
);
COMMENT ON TABLE trompe.freeze_windows IS 'Freezing statements whose rows committed after their versions were kept may lack a kept version.';

-- Snapshots of this node recorded now and then while the log grows (src/log/marks.rs): a
-- consumer far behind catches up in steps that end at them.
CREATE TABLE trompe.snapshot_marks (
    id bigserial PRIMARY KEY,
    snap pg_snapshot NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE trompe.snapshot_marks IS 'Snapshots of this node at which a far-behind consumer''s catch-up steps end.';

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
                      AND o.original AND NOT o.is_temporary
                      -- (a dump restored into another database brings the triggers without
                      -- the table being replicated there: they may go)
                      AND EXISTS (SELECT 1 FROM trompe.tables t JOIN pg_class c ON c.oid = t.relid
                                    JOIN pg_namespace n ON n.oid = c.relnamespace
                                   WHERE n.nspname = o.address_names[1] AND c.relname = o.address_names[2])) THEN
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

-- ===== Trust between nodes (issue 19: items 1, 2, 5) ==========================================
-- A consumer's identity is bound to its login (src/consumers.rs): trompe.consumers records the
-- logins each node pulls with, and the claim a joining node presents; only those logins (or
-- superusers and trompe_admin) act for the node. Removing a peer keeps this node's position
-- there (trompe.progress no longer follows trompe.peers), so that adding it again resumes, if
-- the peer still has its log from there (trompe.log_rotation.truncated_through tells).
-- trompe.alter_peer changes a connection string in place; trompe.drop_consumer and
-- trompe.set_consumer_logins are for administrators. The functions peers read replicated data
-- through serve the logins of registered nodes only.

ALTER TABLE trompe.node
    ADD COLUMN claim_secret text NOT NULL DEFAULT encode(sha256(convert_to(gen_random_uuid()::text || gen_random_uuid()::text, 'UTF8')), 'hex');
-- A copy of this database (CREATE DATABASE ... TEMPLATE) has the same node id: the oid of the
-- database the identity belongs to tells them apart (see src/node.rs).
ALTER TABLE trompe.node ADD COLUMN database_oid oid;
UPDATE trompe.node SET database_oid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database());
ALTER TABLE trompe.consumers ADD COLUMN logins text[], ADD COLUMN claim text;
COMMENT ON TABLE trompe.consumers IS 'Nodes pulling from this node, the position they confirmed (holds back log truncation) and the logins they pull with.';
ALTER TABLE trompe.progress DROP CONSTRAINT progress_node_id_fkey;
-- Which transactions were truncated before is not known: a node resuming from a position
-- older than this update is refused, unless it is still registered.
ALTER TABLE trompe.log_rotation ADD COLUMN truncated_through xid8;
UPDATE trompe.log_rotation SET truncated_through = pg_snapshot_xmin(pg_current_snapshot());

CREATE FUNCTION trompe."_require_peer_login"() RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_require_peer_login_wrapper';

CREATE FUNCTION trompe."resume_consumer"(
	"consumer" uuid,
	"consumer_name" TEXT,
	"position" TEXT
) RETURNS TABLE (
	"node_id" uuid,
	"commit_timestamps" bool
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'resume_consumer_wrapper';

CREATE FUNCTION trompe."claim_consumer"(
	"consumer" uuid,
	"secret" TEXT
) RETURNS TEXT
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'claim_consumer_wrapper';

CREATE FUNCTION trompe."sync_register"(
	"consumer" uuid,
	"consumer_name" TEXT,
	"claim" TEXT
) RETURNS INT
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'sync_register_claimed_wrapper';

CREATE FUNCTION trompe."register_consumer_from"(
	"consumer" uuid,
	"consumer_name" TEXT,
	"template" uuid,
	"claim" TEXT
) RETURNS TEXT
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'register_consumer_from_claimed_wrapper';

CREATE FUNCTION trompe."alter_peer"(
	"name" TEXT,
	"conninfo" TEXT
) RETURNS uuid
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'alter_peer_wrapper';

CREATE FUNCTION trompe."drop_consumer"(
	"node" uuid
) RETURNS bool
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'drop_consumer_wrapper';

CREATE FUNCTION trompe."set_consumer_logins"(
	"node" uuid,
	"logins" TEXT[]
) RETURNS bool
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'set_consumer_logins_wrapper';

REVOKE EXECUTE ON FUNCTION
    trompe.resume_consumer(uuid, text, text), trompe.claim_consumer(uuid, text),
    trompe.sync_register(uuid, text, text), trompe.register_consumer_from(uuid, text, uuid, text),
    trompe.alter_peer(text, text), trompe.drop_consumer(uuid), trompe.set_consumer_logins(uuid, text[])
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    trompe.resume_consumer(uuid, text, text), trompe.claim_consumer(uuid, text),
    trompe.sync_register(uuid, text, text), trompe.register_consumer_from(uuid, text, uuid, text)
TO trompe_puller;
GRANT EXECUTE ON FUNCTION
    trompe.alter_peer(text, text), trompe.drop_consumer(uuid), trompe.set_consumer_logins(uuid, text[])
TO trompe_admin;

-- The functions peers read replicated data through check the login first; sync_source lists
-- the positions of current peers only.
CREATE OR REPLACE FUNCTION trompe._row_digests(rel regclass, buckets int, wanted int[] DEFAULT NULL)
RETURNS TABLE (bucket int, key text, h1 bigint, h2 bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' SET datestyle = 'ISO, YMD'
SET intervalstyle = 'postgres' SET extra_float_digits = 3 SET bytea_output = 'hex' AS $$
BEGIN
    PERFORM trompe._require_peer_login();
    RETURN QUERY EXECUTE trompe._rows_sql(rel, buckets) USING buckets, wanted;
END
$$;

CREATE OR REPLACE FUNCTION trompe.table_digest(rel regclass, buckets int)
RETURNS TABLE (bucket int, row_count bigint, digest text)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' SET datestyle = 'ISO, YMD'
SET intervalstyle = 'postgres' SET extra_float_digits = 3 SET bytea_output = 'hex' AS $$
BEGIN
    PERFORM trompe._require_peer_login();
    RETURN QUERY EXECUTE format(
        'SELECT d.bucket, count(*), sum(d.h1)::text || '':'' || sum(d.h2)::text FROM (%s) d GROUP BY d.bucket',
        trompe._rows_sql(rel, buckets))
        USING buckets, NULL::int[];
END
$$;

CREATE OR REPLACE FUNCTION trompe.fetch_rows(rel regclass, keys text[])
RETURNS TABLE (key text, row_data jsonb)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' SET datestyle = 'ISO, YMD'
SET intervalstyle = 'postgres' SET extra_float_digits = 3 SET bytea_output = 'hex' AS $$
DECLARE
    s record;
BEGIN
    PERFORM trompe._require_peer_login();
    s := trompe._table_sql(rel);
    RETURN QUERY EXECUTE format(
        'SELECT (%s)::text, %s
           FROM jsonb_populate_recordset(NULL::%s, (SELECT jsonb_agg(k::jsonb) FROM unnest($1::text[]) k)) a
           JOIN %s t ON %s', s.key_object, s.row_json, rel, rel, trompe._key_match(s.key_columns, 'a', 't'))
        USING keys;
END
$$;

CREATE OR REPLACE FUNCTION trompe.lo_chunk(origin uuid, origin_oid oid, "offset" bigint, length int) RETURNS bytea
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    here oid;
BEGIN
    PERFORM trompe._require_peer_login();
    IF length < 1 OR length > 16777216 OR "offset" < 0 THEN
        RAISE EXCEPTION 'invalid large object piece: offset %, length %', "offset", length
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    here := trompe._lo_local(origin, origin_oid);
    RETURN CASE WHEN here IS NULL THEN NULL ELSE lo_get(here, "offset", length) END;
END
$$;

CREATE OR REPLACE FUNCTION trompe.sync_rows_sql(rel regclass) RETURNS text
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

CREATE OR REPLACE FUNCTION trompe.sync_removals()
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

CREATE OR REPLACE FUNCTION trompe.sync_source()
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
-- ===== end of trust between nodes ==========================================================

-- GRANT, REVOKE and ALTER DEFAULT PRIVILEGES on replicated schemas and tables, and the
-- replicated schema itself, replicate (src/capture/privileges.rs).
CREATE FUNCTION trompe."_privilege_targets_replicated"() RETURNS bool
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_privilege_targets_replicated_wrapper';
CREATE OR REPLACE FUNCTION trompe.on_ddl_command_end() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cmd record;
    rel oid;
    touched oid[] := '{}';
    replicate boolean := false;
    object_schema text := '';
    object_name text := '';
    nsp text;
BEGIN
    IF trompe._capture_skipped() THEN
        RETURN;
    END IF;
    FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
        CONTINUE WHEN cmd.in_extension;
        rel := NULL;
        IF cmd.classid = 'pg_catalog.pg_class'::regclass THEN
            SELECT coalesce(i.indrelid, d.refobjid, c.oid) INTO rel
              FROM pg_class c
              LEFT JOIN pg_index i ON i.indexrelid = c.oid
              LEFT JOIN pg_depend d ON c.relkind = 'S' AND d.classid = 'pg_catalog.pg_class'::regclass
                   AND d.objid = c.oid AND d.refclassid = 'pg_catalog.pg_class'::regclass AND d.deptype IN ('a', 'i')
             WHERE c.oid = cmd.objid;
        ELSIF cmd.classid = 'pg_catalog.pg_trigger'::regclass THEN
            SELECT tgrelid INTO rel FROM pg_trigger WHERE oid = cmd.objid;
        ELSIF cmd.classid = 'pg_catalog.pg_constraint'::regclass THEN
            SELECT nullif(conrelid, 0) INTO rel FROM pg_constraint WHERE oid = cmd.objid;
        ELSIF cmd.classid = 'pg_catalog.pg_rewrite'::regclass THEN
            SELECT ev_class INTO rel FROM pg_rewrite WHERE oid = cmd.objid;
        ELSIF cmd.classid = 'pg_catalog.pg_policy'::regclass THEN
            SELECT polrelid INTO rel FROM pg_policy WHERE oid = cmd.objid;
        END IF;
        IF rel IS NOT NULL THEN
            touched := touched || rel;
        END IF;
        -- A replicated schema itself (its owner, comment, name) counts as in it.
        nsp := coalesce(cmd.schema_name,
                        CASE WHEN cmd.classid = 'pg_catalog.pg_namespace'::regclass
                             THEN (SELECT nspname::text FROM pg_namespace WHERE oid = cmd.objid) END);
        IF nsp IN (SELECT schema_name::text FROM trompe.schemas)
           OR (rel IS NOT NULL AND EXISTS (SELECT 1 FROM trompe.tables WHERE relid::oid = rel)) THEN
            replicate := true;
            object_schema := coalesce(nsp, '');
            object_name := coalesce(cmd.object_identity, '');
        END IF;
    END LOOP;
    -- GRANT, REVOKE and ALTER DEFAULT PRIVILEGES name no object here: the statement's targets
    -- were noted before it ran (src/capture/privileges.rs).
    IF NOT replicate AND tg_tag IN ('GRANT', 'REVOKE', 'ALTER DEFAULT PRIVILEGES') THEN
        replicate := trompe._privilege_targets_replicated();
    END IF;
    IF replicate THEN
        PERFORM trompe._log_ddl(tg_tag, object_schema, object_name);
    END IF;
    PERFORM trompe._after_ddl(touched);
END
$$;

-- setval on a sequence a replicated table draws from continues above the value on every node,
-- each in its own slot (src/setval.rs).
CREATE FUNCTION trompe."_setval"(
	"seq" oid,
	"value" bigint
) RETURNS bigint
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_setval2_wrapper';

CREATE FUNCTION trompe."_setval"(
	"seq" oid,
	"value" bigint,
	"called" bool
) RETURNS bigint
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_setval3_wrapper';

-- Peers' DDL runs as this role when its origin's role does not exist here or is a superuser
-- (trompe.peer_ddl_role): it is no superuser, so a peer's DDL can do no more than it may.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'trompe_peer_ddl') THEN
        CREATE ROLE trompe_peer_ddl NOLOGIN;
    END IF;
END
$$;

-- ===== size limits (issue 20) ===============================================================
-- A consumer that fell behind past trompe.max_log_size is marked lost (src/log/rotation.rs).
ALTER TABLE trompe.consumers ADD COLUMN lost_at timestamptz, ADD COLUMN lost_reason text;
-- What this node's log retains for each consumer (a node pulling from it): the log rows of
-- transactions it has not confirmed as applied (as last saved, within seconds), their size,
-- and the age of the oldest of them. Rows shared by several consumers count for each.
CREATE VIEW trompe.consumer_log AS
SELECT c.name,
       c.node_id,
       c.confirmed_at,
       count(DISTINCT l.txid) AS retained_transactions,
       coalesce(sum(l.nchanges), 0)::bigint AS retained_changes,
       coalesce(sum(pg_catalog.pg_column_size(l.changes)), 0)::bigint AS retained_bytes,
       CASE WHEN pg_catalog.current_setting('track_commit_timestamp')::boolean THEN
           pg_catalog.now() - min(pg_catalog.pg_xact_commit_timestamp(
               ((l.txid::text::bigint) & 4294967295)::text::xid))
       END AS oldest_unconfirmed_age,
       -- Past trompe.max_log_size: when and why it was marked lost (it holds nothing back then).
       c.lost_at,
       c.lost_reason
  FROM trompe.consumers c
  LEFT JOIN trompe.log l ON c.lost_at IS NULL
       AND NOT pg_catalog.pg_visible_in_snapshot(l.txid, c.confirmed::pg_snapshot)
 GROUP BY c.node_id, c.name, c.confirmed_at, c.lost_at, c.lost_reason;
COMMENT ON VIEW trompe.consumer_log IS 'Per consumer of this node: the log it holds back (unconfirmed transactions, changes, bytes, age of the oldest).';
GRANT SELECT ON trompe.consumer_log TO trompe_admin;

-- What this node's log retains for consumer `consumer` (its row of trompe.consumer_log): the
-- consumer asks now and then and shows it in its trompe.status.
CREATE FUNCTION trompe.retained_log(consumer uuid, OUT transactions bigint, OUT bytes bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT retained_transactions, retained_bytes FROM trompe.consumer_log WHERE node_id = consumer
$$;
REVOKE EXECUTE ON FUNCTION trompe.retained_log(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION trompe.retained_log(uuid) TO trompe_puller;

-- trompe.status shows what each peer's log retains for this node (src/status.rs).
DROP VIEW trompe.status;
-- How many rows a join expects to copy (from the source's statistics), shown in trompe.status.
ALTER TABLE trompe.syncs ADD COLUMN rows_estimate bigint;
DROP FUNCTION trompe._status();
CREATE FUNCTION trompe."_status"() RETURNS TABLE (
	"name" TEXT,  /* String */
	"node_id" TEXT,  /* String */
	"state" TEXT,  /* String */
	"position" TEXT,  /* String */
	"behind_changes" bigint,  /* Option < i64 > */
	"behind_ms" bigint,  /* Option < i64 > */
	"last_pull_ms" bigint,  /* Option < i64 > */
	"last_error" TEXT,  /* Option < String > */
	"last_error_ms" bigint,  /* Option < i64 > */
	"applied_txns" bigint,  /* i64 */
	"applied_changes" bigint,  /* i64 */
	"peer_log_transactions" bigint,  /* Option < i64 > */
	"peer_log_bytes" bigint  /* Option < i64 > */
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_status_wrapper';
CREATE VIEW trompe.status AS
SELECT s.name,
       s.node_id::uuid AS node_id,
       CASE WHEN y.state IN ('waiting', 'copying') THEN 'syncing' ELSE s.state END AS state,
       s.position AS applied_position,
       s.behind_changes,
       -- A peer that is not being pulled is at least as far behind as its last pull.
       CASE WHEN s.state = 'connected' OR s.last_pull_ms = 0 THEN (s.behind_ms / 1000.0)::float8
            ELSE greatest(s.behind_ms / 1000.0, extract(epoch FROM now()) - s.last_pull_ms / 1000.0)::float8
       END AS behind_seconds,
       to_timestamp(s.last_pull_ms / 1000.0) AS last_pull,
       s.last_error,
       to_timestamp(s.last_error_ms / 1000.0) AS last_error_at,
       s.applied_txns,
       s.applied_changes,
       -- The copy made when this node joined through this peer (add_peer(..., sync => true)).
       y.state AS sync_state,
       y.tables_copied AS sync_tables_copied,
       y.tables_total AS sync_tables_total,
       y.rows_copied AS sync_rows_copied,
       y.rows_estimate AS sync_rows_estimate,
       -- What the peer's log retains for this node (its trompe.consumer_log row), as the peer
       -- last said (asked every 10 seconds or so while connected); NULL if unknown.
       s.peer_log_transactions AS retained_transactions,
       s.peer_log_bytes AS retained_bytes
  FROM trompe._status() s LEFT JOIN trompe.syncs y ON y.node_id = s.node_id::uuid;
COMMENT ON VIEW trompe.status IS 'One row per peer: is it connected, how far behind, what went wrong last.';
GRANT SELECT ON trompe.status TO trompe_admin;

-- Replication origins named per database (trompe_<peer>_<database oid>): two databases of one
-- cluster pulling from the same peer shared trompe_<peer>, and one's position moved the other's.
-- The worker moves each peer's position over to the new origin (src/worker/origins.rs).
-- The replication origin through which this database applies the changes of peer `node`
-- (core/src/nodeid.rs, origin_name): origins belong to the whole cluster, so the name holds the
-- database's oid.
CREATE FUNCTION trompe._origin_name(node uuid) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT 'trompe_' || node || '_' || d.oid FROM pg_catalog.pg_database d WHERE d.datname = pg_catalog.current_database()
$$;

-- The `after` of a peer's step in progress: the greater of the stored value and what the peer's
-- replication origin records under after_offset (core/src/position.rs, in_origin).
CREATE OR REPLACE FUNCTION trompe._applied_after(node uuid, cur text, after bigint, after_offset bigint) RETURNS bigint
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN cur IS NULL THEN after
                ELSE greatest(after, coalesce((SELECT (pg_replication_origin_progress(o.roname, false) - '0/0'::pg_lsn)::bigint
                                                 FROM pg_replication_origin o WHERE o.roname = trompe._origin_name(node))
                                              - after_offset, after)) END
$$;

-- The version of what transaction `xmin_expr` wrote, as SQL: its commit time (µs since
-- 2000-01-01, NULL if not known) and node (this node for local commits, the peer whose
-- replication origin applied it otherwise), with the nodes spelled out (a peer running the SQL
-- may not read trompe.node or pg_replication_origin).
CREATE OR REPLACE FUNCTION trompe._version_sql(xmin_expr text) RETURNS text
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
REVOKE ALL ON FUNCTION trompe._origin_name(uuid) FROM PUBLIC;

-- Peers' pulls look the log's rows up through each child's index by plain index scans, never by a
-- sequential scan (a plan kept by the serving session after a rotation emptied a child scanned that
-- child whole for every transaction as it filled again) nor by a bitmap scan or a scan of the
-- empty parent (each asked the kernel for the table's size at every transaction).
CREATE OR REPLACE FUNCTION trompe.pull(consumer uuid, done text, cur text, after bigint, max_rows int,
                            wait_ms int, seen bigint, confirmed text)
RETURNS TABLE (kind "char", step_cur text, complete boolean, commits bigint, pending bigint, oldest_us bigint,
               txn_last bigint, commit_us bigint, id bigint, changes bytea)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
-- The rows are looked up by txid through each child's index, by plain index scans: the plan is
-- kept for the session, and one made just after a rotation emptied a child scanned that child
-- whole for every transaction as it filled again; a bitmap scan (or a scan of the empty parent)
-- asks the kernel for the table's size at every transaction.
SET enable_seqscan = off SET enable_bitmapscan = off AS $$
#variable_conflict use_column
DECLARE
    p record;
BEGIN
    SELECT * INTO p FROM trompe._pull_plan(consumer, done, cur, after, max_rows, wait_ms, seen, confirmed);
    RETURN QUERY SELECT 'H'::"char", p.cur, p.complete, p.commits, p.pending, p.oldest_commit_us,
                        NULL::bigint, NULL::bigint, NULL::bigint, NULL::bytea;
    RETURN QUERY
        SELECT 'C'::"char", NULL::text, NULL::boolean, NULL::bigint, NULL::bigint, NULL::bigint,
               t.last_id, t.commit_us, l.id, l.changes
          FROM unnest(p.txids::xid8[], p.last_ids, p.commit_us) WITH ORDINALITY AS t(txid, last_id, commit_us, ord)
         -- The three children by name (rows are only ever written there, never into trompe.log
         -- itself); OFFSET 0 keeps this an index lookup per transaction, whatever plan is cached.
         CROSS JOIN LATERAL (SELECT x.id, x.changes FROM trompe.log_0 x WHERE x.txid = t.txid
                             UNION ALL SELECT x.id, x.changes FROM trompe.log_1 x WHERE x.txid = t.txid
                             UNION ALL SELECT x.id, x.changes FROM trompe.log_2 x WHERE x.txid = t.txid
                             OFFSET 0) l
         ORDER BY t.ord, l.id;
END
$$;

-- Rows live in the log's children only (peers' pulls now read them there): the parent refuses
-- any.
ALTER TABLE ONLY trompe.log ADD CONSTRAINT log_rows_in_children CHECK (false) NO INHERIT;

-- The log's children are a queue (appended to and truncated): no vacuums triggered by inserts
-- alone, which read a whole child while the peers catch up after an outage.
ALTER TABLE trompe.log_0 SET (autovacuum_vacuum_insert_threshold = -1);
ALTER TABLE trompe.log_1 SET (autovacuum_vacuum_insert_threshold = -1);
ALTER TABLE trompe.log_2 SET (autovacuum_vacuum_insert_threshold = -1);
