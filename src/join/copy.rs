//! The joining node's side: the worker copies a peer's schema and data in one snapshot of the
//! peer, each row committed with its original version (the replication origin of the node
//! that wrote it and its commit time), then sets every position from that snapshot.
//!
//! A copy runs in several local transactions: the schema first, then the rows grouped by
//! version, then tombstones; the last transaction sets the positions. If it is interrupted, the
//! next attempt first undoes the previous one (drops what its schema created, unlinks the
//! large objects it copied) and starts over from a new snapshot.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pgrx::pg_sys;
use trompe_core::conninfo::ConnInfo;
use trompe_core::copytext::parse_row;
use trompe_core::dump::{OwnObjects, OWN_TRIGGERS};
use trompe_core::nodeid::NodeId;
use trompe_core::pgarray::format_text_array;

use crate::large_objects::{copy_referenced_large_objects, refers_to_large_objects};
use crate::libpq::{connect_wait, copy_out_row, copy_out_start, query_wait, Conn, PgResult, PqError};
use crate::peer_calls::{peer_conninfo, scrub};
use crate::session::InternalOperation;
use crate::sql;
use crate::worker::link::OriginSession;
use crate::worker::txn::in_transaction;

/// How long one statement on the source may take (sorting a large table takes a while).
const QUERY_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
/// Rows written here at a time (grouped by version; the peer streams on meanwhile).
const BATCH_ROWS: usize = 2000;
/// How often the progress shown in `trompe.status` is written.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// A copy this node has to make: from which peer.
pub struct SyncJob {
    /// The peer's name.
    pub name: String,
    /// The peer's node id.
    pub node: NodeId,
    /// Its connection string, as stored.
    pub conninfo: String,
}

/// The copy waiting to be made, if any (one at most: a node joins once).
pub fn pending() -> Result<Option<SyncJob>, String> {
    in_transaction(|| {
        if !crate::join::schema_installed()? {
            return Ok(None);
        }
        let row = sql::row(
            "SELECT p.name, p.node_id, p.conninfo FROM trompe.syncs s JOIN trompe.peers p USING (node_id)
              WHERE s.state <> 'done' ORDER BY s.node_id LIMIT 1",
            &[],
        )?;
        let Some(row) = row else { return Ok(None) };
        let text = |i: usize| row[i].clone().unwrap_or_default();
        let node = text(1).parse::<NodeId>().map_err(|e| e.to_string())?;
        Ok(Some(SyncJob { name: text(0), node, conninfo: text(2) }))
    })
}

/// What the source told about its snapshot.
#[derive(Default)]
struct Source {
    snapshot: String,
    exported: String,
    node: String,
    /// Per peer of the source: node id, done, cur, after.
    positions: Vec<[Option<String>; 4]>,
    /// Replicated tables (qualified names) and their conflict rules.
    tables: Vec<(String, String)>,
    /// Node priorities (node id, priority), from a source at 0.4.0 or later.
    priorities: Vec<(String, String)>,
    schemas: Vec<String>,
    /// How many rows the replicated tables hold, from the source's statistics (`reltuples`).
    rows_estimate: i64,
}

/// A connection to the source, with errors scrubbed of secrets.
struct SourceConn {
    conn: Conn,
    name: String,
    info: ConnInfo,
}

impl SourceConn {
    fn query(&mut self, sql: &str, params: &[Option<&str>]) -> Result<PgResult, String> {
        query_wait(&mut self.conn, sql, params, QUERY_TIMEOUT).map_err(|e| self.failed(e))
    }

    fn failed(&self, e: PqError) -> String {
        format!("peer \"{}\": {}", self.name, scrub(&e.message, &self.info))
    }
}

fn cell(result: &PgResult, row: usize, col: usize) -> Option<String> {
    result.get(row, col).map(str::to_string)
}

fn read_source(conn: &mut SourceConn) -> Result<Source, String> {
    let result = conn.query("SELECT kind, name, a, b, c FROM trompe.sync_source()", &[])?;
    let mut source = Source::default();
    for r in 0..result.rows() {
        let v = |c: usize| cell(&result, r, c);
        match result.get(r, 0) {
            Some("snapshot") => {
                source.snapshot = v(2).unwrap_or_default();
                source.exported = v(3).unwrap_or_default();
                source.node = v(4).unwrap_or_default();
            }
            Some("position") => source.positions.push([v(1), v(2), v(3), v(4)]),
            Some("table") => source.tables.push((v(1).unwrap_or_default(), v(2).unwrap_or_default())),
            Some("priority") => source.priorities.push((v(1).unwrap_or_default(), v(2).unwrap_or_default())),
            Some("schema") => source.schemas.push(v(1).unwrap_or_default()),
            _ => {}
        }
    }
    if source.snapshot.is_empty() || source.exported.is_empty() {
        return Err(format!("peer \"{}\" did not describe its snapshot", conn.name));
    }
    let names: Vec<Option<&str>> = source.tables.iter().map(|(t, _)| Some(t.as_str())).collect();
    let estimate = conn.query(
        "SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint::text
           FROM unnest($1::text[]) AS t(name)
           JOIN pg_catalog.pg_class c ON c.oid = pg_catalog.to_regclass(t.name)",
        &[Some(&trompe_core::pgarray::format_text_array(&names))],
    )?;
    source.rows_estimate = cell(&estimate, 0, 0).and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok(source)
}

/// trompe's own objects on the source, in the copy's snapshot: the extension and the capture
/// triggers on its tables, which the schema copy leaves out (this node has trompe, and creates
/// the triggers itself when it replicates the tables).
fn own_objects(conn: &mut SourceConn) -> Result<OwnObjects, String> {
    let result = conn.query(
        "SELECT 'extension', e.oid::text FROM pg_catalog.pg_extension e WHERE e.extname = 'trompe'
         UNION ALL
         SELECT 'trigger', t.oid::text
           FROM pg_catalog.pg_trigger t
           JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_proc'::regclass AND d.objid = t.tgfoid
                                      AND d.refclassid = 'pg_catalog.pg_extension'::regclass AND d.deptype = 'e'
           JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid AND e.extname = 'trompe'
          WHERE t.tgname = ANY ($1::text[])",
        &[Some(&format_text_array(&OWN_TRIGGERS.map(Some)))],
    )?;
    let mut own = OwnObjects::default();
    for r in 0..result.rows() {
        let oid = cell(&result, r, 1)
            .and_then(|v| v.parse::<u32>().ok())
            .ok_or_else(|| format!("peer \"{}\" sent a bad object id of trompe's own", conn.name))?;
        match result.get(r, 0) {
            Some("extension") => own.extension = Some(oid),
            _ => own.triggers.push(oid),
        }
    }
    Ok(own)
}

/// Undoes what an unfinished copy from peer `node` created here (inside the caller's
/// transaction, trompe's own operations not captured): drops its schema objects, unlinks the
/// large objects it copied, forgets its replication configuration, tombstones and start
/// positions. Nothing is done for a copy that is done or that created nothing yet.
pub fn undo_attempt(node: &str) -> Result<(), String> {
    let Some(undo) =
        sql::value("SELECT undo FROM trompe.syncs WHERE node_id = $1::uuid AND state <> 'done'", &[Some(node)])?
    else {
        return Ok(());
    };
    sql::execute(
        "SELECT pg_catalog.lo_unlink(l.local_oid) FROM trompe.large_objects l
          WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_largeobject_metadata m WHERE m.oid = l.local_oid)",
        &[],
    )?;
    crate::join::script::run(&undo)?;
    for table in ["large_objects", "tombstones", "truncations", "tables", "schemas", "start_positions"] {
        sql::execute(&format!("DELETE FROM trompe.{table}"), &[])?;
    }
    sql::execute("UPDATE trompe.syncs SET undo = NULL WHERE node_id = $1::uuid", &[Some(node)])?;
    Ok(())
}

/// Undoes a previous attempt, creates the schema and the replication configuration.
fn create_schema(job: &SyncJob, source: &Source, script: &trompe_core::dump::SchemaScript) -> Result<(), String> {
    let node = job.node.to_string();
    in_transaction(|| {
        let _internal = InternalOperation::begin();
        undo_attempt(&node)?;
        if !script.create.is_empty() {
            crate::join::script::run(&script.create).map_err(|e| format!("creating the peer's schema here: {e}"))?;
        }
        for (table, rule) in &source.tables {
            sql::execute("SELECT trompe.add_table($1::regclass)", &[Some(table)])
                .map_err(|e| format!("replicating {table} here: {e}"))?;
            sql::execute(
                "UPDATE trompe.tables SET conflict_rule = $2 WHERE relid = $1::regclass",
                &[Some(table), Some(rule)],
            )?;
        }
        if !source.priorities.is_empty() && !crate::conflicts::node_priorities_exist()? {
            return Err("the peer has node priorities: run ALTER EXTENSION trompe UPDATE here first".into());
        }
        for (node, priority) in &source.priorities {
            sql::execute(
                "INSERT INTO trompe.node_priorities (node_id, priority) VALUES ($1::uuid, $2::int)
                 ON CONFLICT (node_id) DO UPDATE SET priority = EXCLUDED.priority",
                &[Some(node), Some(priority)],
            )?;
        }
        for schema in &source.schemas {
            sql::execute(
                "INSERT INTO trompe.schemas (schema_name) VALUES ($1) ON CONFLICT DO NOTHING",
                &[Some(schema)],
            )?;
        }
        let total = source.tables.len().to_string();
        sql::execute(
            "UPDATE trompe.syncs SET state = 'copying', attempts = attempts + 1, undo = $2, tables_total = $3::int,
                    tables_copied = 0, rows_copied = 0, started_at = now(), finished_at = NULL
              WHERE node_id = $1::uuid",
            &[Some(&node), Some(&script.undo), Some(&total)],
        )?;
        if estimate_installed()? {
            sql::execute(
                "UPDATE trompe.syncs SET rows_estimate = $2::bigint WHERE node_id = $1::uuid",
                &[Some(&node), Some(&source.rows_estimate.to_string())],
            )?;
        }
        Ok(())
    })?;
    crate::shmem::tombstones_changed();
    Ok(())
}

/// Whether `trompe.syncs` has the rows estimate (trompe 0.5.0 or later).
fn estimate_installed() -> Result<bool, String> {
    sql::flag(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                         WHERE attrelid = 'trompe.syncs'::regclass AND attname = 'rows_estimate' AND NOT attisdropped)",
        &[],
    )
}

/// A row version as the source reports it: the node that wrote it and its commit time.
type VersionKey = (Option<String>, Option<String>);

/// Commits groups of rows with their versions, each through the replication origin of the node
/// that wrote it, and keeps the copy's progress.
struct Committer {
    /// The node id of the peer copied from, as `trompe.syncs` names it.
    source_peer: String,
    source_node: String,
    origins: HashMap<String, pg_sys::RepOriginId>,
    session: OriginSession,
    session_origin: Option<pg_sys::RepOriginId>,
    rows_copied: i64,
    tables_copied: i64,
    progress_written: Instant,
}

impl Committer {
    /// The local replication origin of node `node` (created if missing).
    fn origin(&mut self, node: &str) -> Result<pg_sys::RepOriginId, String> {
        if let Some(origin) = self.origins.get(node) {
            return Ok(*origin);
        }
        node.parse::<NodeId>().map_err(|e| format!("the peer sent a bad node id {node:?}: {e}"))?;
        let (name, id) = in_transaction(|| {
            let name = crate::origins::name(node);
            crate::origins::create(&name).map(|id| (name, id))
        })?;
        let id = id.ok_or_else(|| format!("no replication origin {name}"))?;
        self.origins.insert(node.to_string(), id as pg_sys::RepOriginId);
        Ok(id as pg_sys::RepOriginId)
    }

    /// Runs `work` in one local transaction committed with version `version` (a version the
    /// source did not know, from before commit timestamps were kept, counts as the oldest).
    fn commit_as(
        &mut self,
        version: &VersionKey,
        rows: i64,
        work: impl FnOnce() -> Result<(), String>,
    ) -> Result<(), String> {
        let node = version.0.clone().unwrap_or_else(|| self.source_node.clone());
        let ts = version.1.as_deref().and_then(|t| t.parse::<i64>().ok()).unwrap_or(1);
        let origin = self.origin(&node)?;
        if self.session_origin != Some(origin) {
            self.session.reset();
            self.session.setup(origin, ts);
            self.session_origin = Some(origin);
        }
        // SAFETY: the commit time the next commit records for the session's origin.
        unsafe { pg_sys::replorigin_session_origin_timestamp = ts };
        let due = self.progress_written.elapsed() >= PROGRESS_EVERY;
        let copied = (self.rows_copied + rows).to_string();
        let tables = self.tables_copied.to_string();
        in_transaction(|| {
            work()?;
            if due {
                sql::execute(
                    "UPDATE trompe.syncs SET rows_copied = $2::bigint, tables_copied = $3::int WHERE node_id = $1::uuid",
                    &[Some(&self.source_peer), Some(&copied), Some(&tables)],
                )?;
            }
            Ok(())
        })?;
        if due {
            self.progress_written = Instant::now();
        }
        // A copy of hours runs without the worker's waits: autovacuum hears of it as it goes.
        crate::worker::txn::report_statistics();
        self.rows_copied += rows;
        Ok(())
    }

    fn finish(&mut self) {
        self.session.reset();
        self.session_origin = None;
    }
}

/// One copied row: its canonical form, and the commit time and node of its version.
type CopiedRow = [Option<String>; 3];

/// The rows of a batch grouped by version, groups in the order their first row came.
fn group_by_version(batch: &[CopiedRow]) -> Vec<(VersionKey, Vec<&str>)> {
    let mut groups: Vec<(VersionKey, Vec<&str>)> = Vec::new();
    let mut index: HashMap<VersionKey, usize> = HashMap::new();
    for [row, ts, node] in batch {
        let version: VersionKey = (node.clone(), ts.clone());
        let at = *index.entry(version.clone()).or_insert_with(|| {
            groups.push((version, Vec::new()));
            groups.len() - 1
        });
        groups[at].1.push(row.as_deref().unwrap_or("null"));
    }
    groups
}

/// A second connection to the source in the copy's snapshot, for the large objects rows refer
/// to (the first one is busy streaming the rows).
fn snapshot_conn(conn: &SourceConn, exported: &str) -> Result<SourceConn, String> {
    if exported.is_empty() || !exported.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return Err(format!("peer \"{}\" exported a malformed snapshot id {exported:?}", conn.name));
    }
    let raw = connect_wait(&conn.info, Duration::from_secs(60))
        .map_err(|e| format!("could not connect to peer \"{}\": {}", conn.name, scrub(&e.message, &conn.info)))?;
    let mut second = SourceConn { conn: raw, name: conn.name.clone(), info: conn.info.clone() };
    second.query("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY", &[])?;
    second.query(&format!("SET TRANSACTION SNAPSHOT '{exported}'"), &[])?;
    Ok(second)
}

/// Writes one batch of copied rows here, each group of rows of one version in a transaction of
/// its own (copying the large objects they refer to first, over `objects`).
fn write_batch(
    committer: &mut Committer,
    table: &str,
    insert: &str,
    batch: &[CopiedRow],
    mut objects: Option<&mut SourceConn>,
) -> Result<(), String> {
    for (version, rows) in group_by_version(batch) {
        let json = format!("[{}]", rows.join(","));
        committer.commit_as(&version, rows.len() as i64, || {
            if let Some(source) = objects.as_deref_mut() {
                copy_referenced_large_objects(&mut source.conn, &source.name, table, &json)
                    .map_err(|e| e.to_string())?;
            }
            sql::execute(insert, &[Some(&json)]).map_err(|e| format!("copying rows of {table}: {e}"))?;
            Ok(())
        })?;
    }
    Ok(())
}

/// Copies the rows of one table, streamed with `COPY ... TO STDOUT` in no particular order
/// (sorting a large table on the peer would cost more than it saves), written here a batch at
/// a time, each group of rows of one version in a transaction of its own.
fn copy_table(
    conn: &mut SourceConn,
    objects: &mut Option<SourceConn>,
    exported: &str,
    committer: &mut Committer,
    table: &str,
) -> Result<(), String> {
    let (has_large_objects, insert) = in_transaction(|| {
        let lo = refers_to_large_objects(table).map_err(|e| e.to_string())?;
        let insert = sql::value("SELECT trompe._sync_insert_sql($1::regclass)", &[Some(table)])?;
        Ok((lo, insert.unwrap_or_default()))
    })?;
    if has_large_objects && objects.is_none() {
        *objects = Some(snapshot_conn(conn, exported)?);
    }
    let select = conn.query("SELECT trompe.sync_rows_sql($1::regclass)", &[Some(table)])?;
    let select = select.get(0, 0).ok_or_else(|| format!("peer \"{}\" has no query for {table}", conn.name))?;
    copy_out_start(&mut conn.conn, &format!("COPY ({select}) TO STDOUT"), &[], QUERY_TIMEOUT)
        .map_err(|e| conn.failed(e))?;
    let mut batch: Vec<CopiedRow> = Vec::with_capacity(BATCH_ROWS);
    loop {
        let row = copy_out_row(&mut conn.conn, QUERY_TIMEOUT).map_err(|e| conn.failed(e))?;
        let ended = row.is_none();
        if let Some(row) = row {
            let columns = parse_row(&row, 3).map_err(|e| format!("peer \"{}\": {e}", conn.name))?;
            let mut columns = columns.into_iter();
            batch.push(std::array::from_fn(|_| columns.next().flatten()));
        }
        if batch.len() >= BATCH_ROWS || (ended && !batch.is_empty()) {
            let objects = if has_large_objects { objects.as_mut() } else { None };
            write_batch(committer, table, &insert, &batch, objects)?;
            batch.clear();
        }
        if ended {
            break;
        }
    }
    committer.tables_copied += 1;
    Ok(())
}

/// Copies tombstones and truncation markers, each with its version.
fn copy_removals(conn: &mut SourceConn, committer: &mut Committer) -> Result<(), String> {
    let result = conn.query("SELECT table_name, key::text, node, ts FROM trompe.sync_removals()", &[])?;
    let mut start = 0;
    while start < result.rows() {
        let version: VersionKey = (cell(&result, start, 2), cell(&result, start, 3));
        let mut end = start + 1;
        while end < result.rows() && (cell(&result, end, 2), cell(&result, end, 3)) == version {
            end += 1;
        }
        let tables: Vec<Option<&str>> = (start..end).map(|r| result.get(r, 0)).collect();
        let keys: Vec<Option<&str>> = (start..end).map(|r| result.get(r, 1)).collect();
        let (tables, keys) = (format_text_array(&tables), format_text_array(&keys));
        committer.commit_as(&version, 0, || {
            sql::execute(
                "INSERT INTO trompe.tombstones (relid, key)
                 SELECT t::regclass::oid, k::text[] FROM unnest($1::text[], $2::text[]) AS u(t, k)
                  WHERE k IS NOT NULL ON CONFLICT DO NOTHING",
                &[Some(&tables), Some(&keys)],
            )?;
            sql::execute(
                "INSERT INTO trompe.truncations (relid)
                 SELECT t::regclass::oid FROM unnest($1::text[], $2::text[]) AS u(t, k)
                  WHERE k IS NULL ON CONFLICT DO NOTHING",
                &[Some(&tables), Some(&keys)],
            )?;
            Ok(())
        })?;
        start = end;
    }
    crate::shmem::tombstones_changed();
    Ok(())
}

/// Sets this node's positions from the copy's snapshot and marks the copy done.
fn finish(job: &SyncJob, source: &Source, rows_copied: i64) -> Result<(), String> {
    let node = job.node.to_string();
    let rows = rows_copied.to_string();
    in_transaction(|| {
        let me = crate::node::read_node_id()?.map(|n| n.to_string()).unwrap_or_default();
        sql::execute(
            "UPDATE trompe.progress SET done = $2, cur = NULL, after = 0, updated_at = now() WHERE node_id = $1::uuid",
            &[Some(&node), Some(&source.snapshot)],
        )?;
        for [peer, done, cur, after] in &source.positions {
            if peer.as_deref() == Some(me.as_str()) || peer.as_deref() == Some(node.as_str()) {
                continue;
            }
            sql::execute(
                "INSERT INTO trompe.start_positions (node_id, source, done, cur, after)
                 VALUES ($1::uuid, $2::uuid, $3, $4, coalesce($5::bigint, 0))
                 ON CONFLICT (node_id) DO UPDATE SET source = EXCLUDED.source, done = EXCLUDED.done,
                     cur = EXCLUDED.cur, after = EXCLUDED.after, recorded_at = now()",
                &[peer.as_deref(), Some(&node), done.as_deref(), cur.as_deref(), after.as_deref()],
            )?;
        }
        // A sequence slot chosen before the copy continues above the keys copied.
        crate::sequences::adjust_above_keys(true).map_err(|e| e.to_string())?;
        sql::execute(
            "UPDATE trompe.syncs SET state = 'done', finished_at = now(), undo = NULL, rows_copied = $2::bigint,
                    tables_copied = tables_total
              WHERE node_id = $1::uuid",
            &[Some(&node), Some(&rows)],
        )?;
        Ok(())
    })
}

/// Makes the copy `job` describes, from the start. On an error the copy is left for the next
/// attempt, which undoes this one first.
pub fn run(job: &SyncJob) -> Result<(), String> {
    let info = peer_conninfo(&job.conninfo).map_err(|e| e.to_string())?;
    let conn = connect_wait(&info, Duration::from_secs(60))
        .map_err(|e| format!("could not connect to peer \"{}\": {}", job.name, scrub(&e.message, &info)))?;
    let mut conn = SourceConn { conn, name: job.name.clone(), info };
    let (me, database, claim) = in_transaction(|| {
        let me = crate::node::read_node_id()?.map(|n| n.to_string()).unwrap_or_default();
        // The source's peers keep their registration of this node for whoever presents this
        // node's secret (see consumers::claim_consumer); they get its SHA-256.
        let claim = if crate::consumers::logins_installed() {
            sql::value("SELECT encode(sha256(convert_to(claim_secret, 'UTF8')), 'hex') FROM trompe.node", &[])?
        } else {
            None
        };
        Ok((me, sql::value("SELECT current_database()", &[])?.unwrap_or_default(), claim))
    })?;
    // The copy keeps one transaction open on the source for as long as it takes.
    conn.query("SET statement_timeout = 0", &[])?;
    conn.query("SET idle_in_transaction_session_timeout = 0", &[])?;
    conn.query("SET default_transaction_read_only = off", &[])?;
    let claims = conn.query("SELECT to_regprocedure('trompe.sync_register(uuid,text,text)') IS NOT NULL", &[])?;
    match claim.filter(|_| claims.get(0, 0) == Some("t")) {
        Some(claim) => {
            conn.query("SELECT trompe.sync_register($1::uuid, $2, $3)", &[Some(&me), Some(&database), Some(&claim)])?
        }
        None => conn.query("SELECT trompe.sync_register($1::uuid, $2)", &[Some(&me), Some(&database)])?,
    };
    // The source applies its peers' changes meanwhile: with its apply lock held, none commits
    // between the snapshot and the positions read from its replication origins.
    let lock = crate::worker::progress::APPLY_LOCK_KEY.to_string();
    conn.query("SELECT pg_advisory_lock($1::bigint)", &[Some(&lock)])?;
    conn.query("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY", &[])?;
    let source = read_source(&mut conn)?;
    conn.query("SELECT pg_advisory_unlock($1::bigint)", &[Some(&lock)])?;
    // This node's position on the source will be the snapshot: every transaction it counts as
    // ended must be on the source's disk first (see log::serve::flush_ended_transactions).
    conn.query("SELECT trompe.current_snapshot()", &[])?;
    let own = own_objects(&mut conn)?;
    let script = crate::join::schema::dump(&conn.info, &source.exported, conn.conn.server_version(), &own)?;
    create_schema(job, &source, &script)?;
    let mut committer = Committer {
        source_peer: job.node.to_string(),
        source_node: source.node.clone(),
        origins: HashMap::new(),
        session: OriginSession::none(),
        session_origin: None,
        rows_copied: 0,
        tables_copied: 0,
        progress_written: Instant::now(),
    };
    let mut objects = None;
    let copied = source
        .tables
        .iter()
        .try_for_each(|(table, _)| copy_table(&mut conn, &mut objects, &source.exported, &mut committer, table))
        .and_then(|()| copy_removals(&mut conn, &mut committer));
    drop(objects);
    committer.finish();
    copied?;
    conn.query("COMMIT", &[])?;
    finish(job, &source, committer.rows_copied)
}
