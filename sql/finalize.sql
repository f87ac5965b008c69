-- Created after every function: DDL capture (event triggers), and privileges.

-- DDL capture, after each command: decide whether it touches replicated objects (a replicated
-- table or anything on it, or anything in a replicated schema); if so, log the statement. Then
-- refuse changes that would break replication of a table (primary key dropped, made unlogged,
-- capture triggers disabled) and start replicating new tables of replicated schemas.
CREATE FUNCTION trompe.on_ddl_command_end() RETURNS event_trigger
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

-- DDL capture of DROP commands (their objects are gone by ddl_command_end). It fires for DDL
-- applied for a peer too (ENABLE ALWAYS): dropped tables and columns are recorded and forgotten
-- on every node, whoever ran the DROP; only the logging is for local DDL.
CREATE FUNCTION trompe.on_sql_drop() RETURNS event_trigger
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

-- Before a replicated table is rewritten (also by DDL applied for a peer): keep its rows'
-- versions, which the rewrite would replace by its own (src/row_versions.rs).
CREATE FUNCTION trompe.on_table_rewrite() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM trompe._preserve_versions(pg_event_trigger_table_rewrite_oid());
END
$$;

CREATE EVENT TRIGGER trompe_ddl_command_end ON ddl_command_end
    EXECUTE FUNCTION trompe.on_ddl_command_end();
CREATE EVENT TRIGGER trompe_sql_drop ON sql_drop
    EXECUTE FUNCTION trompe.on_sql_drop();
ALTER EVENT TRIGGER trompe_sql_drop ENABLE ALWAYS;
CREATE EVENT TRIGGER trompe_table_rewrite ON table_rewrite
    EXECUTE FUNCTION trompe.on_table_rewrite();
ALTER EVENT TRIGGER trompe_table_rewrite ENABLE ALWAYS;

-- Everyone may see what is replicated; nobody but the owner may touch trompe's state.
GRANT USAGE ON SCHEMA trompe TO PUBLIC;
GRANT SELECT ON trompe.tables, trompe.schemas TO PUBLIC;
-- Administration, reading the log and serving peers are for superusers (and whoever they grant
-- them to); the functions DDL and row triggers call stay callable by everyone.
REVOKE EXECUTE ON FUNCTION
    trompe.add_peer(text, text, boolean), trompe.remove_peer(text), trompe.pause_peer(text), trompe.resume_peer(text),
    trompe.add_table(regclass), trompe.remove_table(regclass), trompe.add_schema(text), trompe.remove_schema(text),
    trompe.set_conflict_rule(regclass, text), trompe.set_node_priority(uuid, integer), trompe.set_sequence_slot(integer, integer),
    trompe.log_changes(), trompe.register_consumer(uuid, text), trompe.unregister_consumer(uuid),
    trompe.pending_changes(text, text, bigint, text), trompe._pull_plan(uuid, text, text, bigint, integer, integer, bigint, text),
    trompe._on_create(),
    trompe.compare(text, regclass), trompe.repair(text, regclass), trompe.skip(text, bigint),
    trompe._row_digests(regclass, integer, integer[]), trompe.table_digest(regclass, integer),
    trompe.fetch_rows(regclass, text[]), trompe._repair_rows(regclass, text, text[], jsonb),
    trompe.lo_chunk(uuid, oid, bigint, integer),
    trompe.sync_register(uuid, text), trompe.register_consumer_from(uuid, text, uuid),
    trompe.consumer_confirmed(uuid), trompe.sync_source(), trompe.sync_rows_sql(regclass), trompe.sync_removals(),
    trompe._sync_insert_sql(regclass), trompe._version_sql(text), trompe._applied_after(uuid, text, bigint, bigint), trompe._origin_name(uuid),
    trompe._row_version(oid, xid, text[])
FROM PUBLIC;

-- Pulling this node's log (called by peers over libpq). The plan (which transactions) is
-- made first, with a fresh snapshot; the rows are read by a later statement, whose snapshot
-- therefore sees every transaction the plan chose.
CREATE FUNCTION trompe.pull(consumer uuid, done text, cur text, after bigint, max_rows int,
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
REVOKE EXECUTE ON FUNCTION trompe.pull(uuid, text, text, bigint, integer, integer, bigint, text) FROM PUBLIC;

-- The role peers log in with to pull from this node needs no superuser: membership in
-- trompe_puller lets it read the log through these functions, register as a consumer and
-- confirm positions, and nothing else (it cannot read trompe's tables directly).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'trompe_puller') THEN
        CREATE ROLE trompe_puller NOLOGIN;
    END IF;
END
$$;
GRANT EXECUTE ON FUNCTION
    trompe.pull(uuid, text, text, bigint, integer, integer, bigint, text),
    trompe.register_consumer(uuid, text), trompe.unregister_consumer(uuid),
    trompe.pending_changes(text, text, bigint, text),
    -- trompe.compare and trompe.repair on a peer read its replicated tables through these.
    trompe._row_digests(regclass, integer, integer[]), trompe.table_digest(regclass, integer),
    trompe.fetch_rows(regclass, text[]),
    -- Peers copy large objects referenced by replicated rows through this.
    trompe.lo_chunk(uuid, oid, bigint, integer),
    -- A node joining the cluster copies this one through these.
    trompe.sync_register(uuid, text), trompe.register_consumer_from(uuid, text, uuid),
    trompe.consumer_confirmed(uuid), trompe.sync_source(), trompe.sync_rows_sql(regclass), trompe.sync_removals()
TO trompe_puller;

-- Peers' DDL runs as this role when its origin's role does not exist here or is a superuser
-- (trompe.peer_ddl_role): it is no superuser, so a peer's DDL can do no more than it may.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'trompe_peer_ddl') THEN
        CREATE ROLE trompe_peer_ddl NOLOGIN;
    END IF;
END
$$;

-- Members of trompe_admin administer trompe without being superusers: peers, tables, rules,
-- sequence slots, and reading its state and conflict log.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'trompe_admin') THEN
        CREATE ROLE trompe_admin NOLOGIN;
    END IF;
END
$$;
GRANT EXECUTE ON FUNCTION
    trompe.add_peer(text, text, boolean), trompe.remove_peer(text), trompe.pause_peer(text), trompe.resume_peer(text),
    trompe.add_table(regclass), trompe.remove_table(regclass), trompe.add_schema(text), trompe.remove_schema(text),
    trompe.set_conflict_rule(regclass, text), trompe.set_node_priority(uuid, integer),
    trompe.set_sequence_slot(integer, integer), trompe.log_changes(),
    trompe.compare(text, regclass), trompe.repair(text, regclass), trompe.skip(text, bigint)
TO trompe_admin;
GRANT SELECT ON trompe.conflicts, trompe.exceptions, trompe.peers, trompe.consumers, trompe.repairs, trompe.syncs,
    trompe.start_positions TO trompe_admin;

-- A consumer's identity is bound to its login (src/consumers.rs): a node resumes or claims its
-- own registration through the puller functions; administrators change a peer's connection
-- string in place, drop a consumer, or set the logins a consumer pulls with.
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

-- One row per peer: connection state, position, lag, last pull and error, counters.
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

CREATE FUNCTION trompe.wait_sync(timeout interval DEFAULT '1 minute') RETURNS boolean
LANGUAGE sql AS $$ SELECT trompe._wait_sync(extract(epoch FROM timeout)::float8) $$;
COMMENT ON FUNCTION trompe.wait_sync(interval) IS
    'True once every change each peer had committed at the time of the call is applied here; false on timeout.';

SELECT trompe._on_create();
