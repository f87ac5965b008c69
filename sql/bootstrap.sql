-- trompe's own tables, created before any function. Everything lives in schema trompe.

-- The log carries names and values as the server encodes them, and every node reads them as
-- UTF-8: a database in another encoding could not replicate text that is not plain ASCII.
DO $encoding$
BEGIN
    IF pg_catalog.current_setting('server_encoding') <> 'UTF8' THEN
        RAISE EXCEPTION 'trompe needs a database in encoding UTF8; database "%" is in %',
                pg_catalog.current_database(), pg_catalog.current_setting('server_encoding')
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Replicate a copy made with CREATE DATABASE ... TEMPLATE template0 ENCODING ''UTF8'' (and a UTF-8 locale), loaded from a dump of this one.';
    END IF;
END
$encoding$;

-- This node's identity: one row, a random UUID made when the extension is created. It is
-- never derived from anything two nodes could share (database name, system identifier).
CREATE TABLE trompe.node (
    node_id uuid NOT NULL DEFAULT gen_random_uuid() PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    one_row boolean NOT NULL DEFAULT true UNIQUE CHECK (one_row),
    -- This node's share of replicated sequences (trompe.set_sequence_slot), NULL if none.
    sequence_slot int,
    sequence_slots int,
    -- Known to this node only: when it joins a cluster, the peers of the node it copies keep
    -- their registration of it for whoever presents this secret (trompe.claim_consumer).
    claim_secret text NOT NULL DEFAULT encode(sha256(convert_to(gen_random_uuid()::text || gen_random_uuid()::text, 'UTF8')), 'hex'),
    -- The database this identity was made in: a copy of it (CREATE DATABASE ... TEMPLATE) is
    -- known by another oid, and does not act as this node while the original exists.
    database_oid oid
);
INSERT INTO trompe.node (database_oid)
    SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database();
COMMENT ON TABLE trompe.node IS 'This node''s identity (one row).';

-- Tables replicated from and to this node.
CREATE TABLE trompe.tables (
    relid regclass PRIMARY KEY,
    added_at timestamptz NOT NULL DEFAULT now(),
    conflict_rule text NOT NULL DEFAULT 'last_update_wins'
);
COMMENT ON TABLE trompe.tables IS 'Replicated tables; change with trompe.add_table() and trompe.remove_table().';

-- Node priorities for tables under conflict rule node_priority (see core/src/conflict.rs).
CREATE TABLE trompe.node_priorities (
    node_id uuid PRIMARY KEY,
    priority int NOT NULL
);
COMMENT ON TABLE trompe.node_priorities IS 'Priority of each node for tables under conflict rule node_priority (0 if not listed); set with trompe.set_node_priority(), the same on every node.';

-- Schemas whose tables, present and future, are replicated.
CREATE TABLE trompe.schemas (
    schema_name name PRIMARY KEY,
    added_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE trompe.schemas IS 'Replicated schemas; change with trompe.add_schema() and trompe.remove_schema().';

-- The change log. The changes a transaction makes to replicated tables are buffered and
-- written as one row when it commits (large transactions in several chunks), in the same
-- transaction. Ids come from a sequence without cache, taken at commit, so they follow the
-- order in which transactions committed; txid is the writing transaction, which peers read by
-- snapshot so that a transaction committing late is never skipped.
CREATE SEQUENCE trompe.log_id_seq AS bigint;

CREATE TABLE trompe.log (
    id bigint NOT NULL,
    txid xid8 NOT NULL,
    nchanges int NOT NULL,
    changes bytea NOT NULL
);
COMMENT ON TABLE trompe.log IS 'Captured changes: one row per transaction (or chunk of a large one); see trompe.log_changes. Rows are in the rotating children log_0, log_1, log_2.';
COMMENT ON COLUMN trompe.log.id IS 'Taken when the row is written (at commit): orders transactions as they committed';
COMMENT ON COLUMN trompe.log.changes IS 'The changes, in trompe''s binary chunk format';

-- The log is three tables used in turn: writers append to the current one; the others are
-- truncated (never deleted from) once every peer has confirmed everything in them.
CREATE TABLE trompe.log_0 () INHERITS (trompe.log);
CREATE TABLE trompe.log_1 () INHERITS (trompe.log);
CREATE TABLE trompe.log_2 () INHERITS (trompe.log);
CREATE INDEX log_0_txid ON trompe.log_0 (txid, id);
CREATE INDEX log_1_txid ON trompe.log_1 (txid, id);
CREATE INDEX log_2_txid ON trompe.log_2 (txid, id);
-- Rows live in the children only (peers' pulls read them there): the parent refuses any.
ALTER TABLE ONLY trompe.log ADD CONSTRAINT log_rows_in_children CHECK (false) NO INHERIT;
-- A queue: appended to and truncated, never updated or deleted from. Vacuums triggered by the
-- number of rows inserted alone would read a whole child (gigabytes after a long outage) while
-- the peers catch up, for nothing the log needs; dead rows of aborted transactions still get
-- them, and so does freezing before wraparound.
ALTER TABLE trompe.log_0 SET (autovacuum_vacuum_insert_threshold = -1);
ALTER TABLE trompe.log_1 SET (autovacuum_vacuum_insert_threshold = -1);
ALTER TABLE trompe.log_2 SET (autovacuum_vacuum_insert_threshold = -1);

CREATE TABLE trompe.log_rotation (
    slot int PRIMARY KEY CHECK (slot BETWEEN 0 AND 2),
    is_current boolean NOT NULL,
    -- For a table that is not current: every transaction that wrote to it has a smaller id.
    retired_below xid8,
    switched_at timestamptz NOT NULL DEFAULT now(),
    -- The newest transaction whose changes were truncated from this table: a node resuming
    -- from a position that does not see it may have missed changes.
    truncated_through xid8
);
INSERT INTO trompe.log_rotation (slot, is_current) VALUES (0, true), (1, false), (2, false);
COMMENT ON TABLE trompe.log_rotation IS 'Which log table writers append to, and when the others were retired.';

-- Peers this node pulls from.
CREATE TABLE trompe.peers (
    name text PRIMARY KEY CHECK (name <> '' AND length(name) <= 63),
    node_id uuid NOT NULL UNIQUE,
    conninfo text NOT NULL,
    paused boolean NOT NULL DEFAULT false,
    added_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE trompe.peers IS 'Peers this node pulls changes from; change with trompe.add_peer() and friends.';

-- How far each peer's log has been applied here. Updated in the same transaction as the
-- changes it covers: the position is exactly what is applied, after any crash. Kept when the
-- peer is removed: adding it again resumes from there.
CREATE TABLE trompe.progress (
    node_id uuid PRIMARY KEY,
    done text NOT NULL,
    cur text,
    after bigint NOT NULL DEFAULT 0,
    applied_txns bigint NOT NULL DEFAULT 0,
    applied_changes bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    -- Inside a step, `after` is kept in the peer's replication origin as after + after_offset
    -- (committed with each applied transaction); this row is written when a step starts or ends.
    after_offset bigint NOT NULL DEFAULT 0
);
COMMENT ON TABLE trompe.progress IS 'Per peer: the peer snapshot whose changes are all applied here (done), and the step in progress (see trompe._applied_after).';

-- The replication origin through which this database applies the changes of peer `node`
-- (core/src/nodeid.rs, origin_name): origins belong to the whole cluster, so the name holds the
-- database's oid.
CREATE FUNCTION trompe._origin_name(node uuid) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT 'trompe_' || node || '_' || d.oid FROM pg_catalog.pg_database d WHERE d.datname = pg_catalog.current_database()
$$;

-- The `after` of a peer's step in progress: the greater of the stored value and what the peer's
-- replication origin records under after_offset (core/src/position.rs, in_origin).
CREATE FUNCTION trompe._applied_after(node uuid, cur text, after bigint, after_offset bigint) RETURNS bigint
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN cur IS NULL THEN after
                ELSE greatest(after, coalesce((SELECT (pg_replication_origin_progress(o.roname, false) - '0/0'::pg_lsn)::bigint
                                                 FROM pg_replication_origin o WHERE o.roname = trompe._origin_name(node))
                                              - after_offset, after)) END
$$;

-- Nodes that pull from this node, and the position each has confirmed as applied: the log is
-- kept until every one of them has confirmed it.
CREATE TABLE trompe.consumers (
    node_id uuid PRIMARY KEY,
    name text NOT NULL,
    confirmed text NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now(),
    confirmed_at timestamptz NOT NULL DEFAULT now(),
    -- The login roles that may act for this node (pull, confirm, register, unregister); NULL:
    -- the next login that pulls or registers as it (see src/consumers.rs).
    logins text[],
    -- For a registration made for a joining node by the node it copies: the SHA-256 of the
    -- joining node's secret, which binds the registration to the login that presents it.
    claim text,
    -- Set when it fell behind past trompe.max_log_size: its log is no longer kept, its pulls
    -- are refused until it registers anew (joins again).
    lost_at timestamptz,
    lost_reason text
);
COMMENT ON TABLE trompe.consumers IS 'Nodes pulling from this node, the position they confirmed (holds back log truncation) and the logins they pull with.';

-- Conflict resolution. A row's version is the commit time and node of the transaction that
-- wrote it (its xmin's commit timestamp and replication origin); a deleted row's version is
-- kept as a tombstone (the version of the tombstone row itself), a truncated table's as a
-- table tombstone, so that an older change arriving late never brings the row back.
CREATE TABLE trompe.tombstones (
    relid oid NOT NULL,
    key text[] NOT NULL,
    PRIMARY KEY (relid, key)
);
COMMENT ON TABLE trompe.tombstones IS 'Primary keys of deleted rows (version = the row''s own xmin); pruned after trompe.tombstone_retention.';

CREATE TABLE trompe.truncations (
    relid oid PRIMARY KEY
);
COMMENT ON TABLE trompe.truncations IS 'Last truncation of each replicated table (version = the row''s own xmin).';

-- Rows of peers this node retired because they lost a unique collision to a newer local row:
-- the apply transaction queues them (with the tombstone it writes, same xmin), and the worker
-- then deletes them as a transaction of this node, whose version is newer than the retired
-- row's, so that the removal wins on every node (see src/worker/apply/retire.rs).
CREATE TABLE trompe.retirements (
    relid oid NOT NULL,
    key text[] NOT NULL,
    PRIMARY KEY (relid, key)
);
COMMENT ON TABLE trompe.retirements IS 'Rows retired by a unique collision whose removal the worker has still to log as this node''s own change.';

-- Every conflict resolved, with both versions and which won.
CREATE TABLE trompe.conflicts (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    table_name text NOT NULL,
    key jsonb,
    kind text NOT NULL,
    winner text NOT NULL CHECK (winner IN ('local', 'remote')),
    local_origin uuid,
    local_committed_at timestamptz,
    local_row jsonb,
    remote_origin uuid,
    remote_committed_at timestamptz,
    remote_row jsonb
);
CREATE INDEX conflicts_at ON trompe.conflicts (at);
COMMENT ON TABLE trompe.conflicts IS 'Conflicts resolved on this node; pruned after trompe.conflict_retention.';

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
