//! Applying a peer's changes in-process, through SPI with saved plans and typed parameters
//! (values are converted with each column's input function, never spliced into SQL; names
//! are always quoted). Only tables replicated on this node are written. Concurrent changes
//! are resolved by the table's conflict rule (see [`rows`] and `trompe_core::conflict`).

mod change;
mod direct;
mod error;
mod keyed;
mod large_objects;
mod owner;
mod resolve;
pub mod retire;
mod retire_queue;
mod rows;
mod table;

use std::cell::Cell;

use pgrx::pg_sys;

use trompe_core::conflict::{ConflictKind, LocalVersion, Version};
use trompe_core::logformat::Op;
use trompe_core::nodeid::NodeId;

pub use change::Change;
pub use error::ApplyError;
pub use table::{register_invalidation, ApplyCache};

use crate::conflicts::{record, with_incoming, Incoming, Recorded};
use rows::TxnVersion;

thread_local! {
    /// The position (in its transaction) of the change being applied, for error reports.
    static CURRENT_CHANGE: Cell<usize> = const { Cell::new(0) };
}

/// The position, in the transaction last given to [`apply_segment`], of the change it was
/// applying when it stopped (the change that failed, if it failed).
pub fn current_change() -> usize {
    CURRENT_CHANGE.get()
}

/// Where applying one origin transaction is, across the segments it is given in.
pub struct TxnProgress {
    /// How many of its changes came before the current segment.
    base: usize,
    /// Whether a DDL change came already (the changes after it name what it made).
    after_ddl: bool,
}

impl TxnProgress {
    /// Before the transaction's first change.
    pub fn start() -> Self {
        CURRENT_CHANGE.set(0);
        TxnProgress { base: 0, after_ddl: false }
    }

    /// Whether the transaction had DDL (so far).
    pub fn had_ddl(&self) -> bool {
        self.after_ddl
    }
}

/// Applies the changes of one origin transaction (committed at `commit_us` by node `origin`)
/// inside the current transaction (SPI connected), in order, given as consecutive segments
/// (a large transaction is never held whole): call it for each, then [`finish_transaction`].
/// `careful` checks secondary unique constraints before writing (used when the fast attempt
/// ran into one).
pub fn apply_segment(
    cache: &mut ApplyCache,
    txn: &[Change],
    origin: NodeId,
    careful: bool,
    progress: &mut TxnProgress,
) -> Result<(), ApplyError> {
    let Some(first) = txn.first() else { return Ok(()) };
    let v = TxnVersion(Version { ts: first.commit_us, node: origin });
    let base = progress.base;
    progress.base += txn.len();
    // Changes after the transaction's first DDL name what that DDL made: taken as they are.
    let txn = if progress.after_ddl { std::borrow::Cow::Borrowed(txn) } else { resolve::resolve(cache, txn)? };
    let txn = &txn[..];
    let mut i = 0;
    while i < txn.len() {
        let change = &txn[i];
        CURRENT_CHANGE.set(base + i);
        let end = if change.op == Op::Insert { rows::insert_run_end(cache, txn, i)? } else { i + 1 };
        let rewritten =
            if crate::row_versions::any_rewritten_here() && matches!(change.op, Op::Insert | Op::Update | Op::Delete) {
                Some(rows_of_rewritten_tables(cache, &txn[i..end])?)
            } else {
                None
            };
        match change.op {
            Op::Truncate => {
                let mut group = vec![change];
                while i + 1 < txn.len() && txn[i + 1].op == Op::Truncate && txn[i + 1].vals == change.vals {
                    i += 1;
                    group.push(&txn[i]);
                }
                apply_truncate(cache, v, &group)?;
                i += 1;
            }
            Op::Ddl => {
                progress.after_ddl = true;
                apply_ddl(cache, change)?;
                i += 1;
            }
            Op::Insert => {
                let local = large_objects::localized(cache, &txn[i..end])?;
                rows::insert_run(cache, v, local.as_deref().unwrap_or(&txn[i..end]), careful)?;
                i = end;
            }
            Op::Update => {
                let local = large_objects::localized(cache, std::slice::from_ref(change))?;
                rows::update(cache, v, local.as_ref().map_or(change, |l| &l[0]), careful)?;
                i += 1;
            }
            Op::Delete => {
                rows::delete(cache, v, change)?;
                i += 1;
            }
        }
        if let Some(rows) = rewritten {
            written_after_rewrite(cache, rows)?;
        }
    }
    Ok(())
}

/// Ends applying a transaction given to [`apply_segment`]: records its conflicts.
pub fn finish_transaction() -> Result<(), ApplyError> {
    crate::conflicts::flush().map_err(ApplyError::Postgres)
}

/// A row of a table this transaction rewrote, which a change is about to write: where it was
/// before the change (`None`: no row with that key).
struct RewrittenRow {
    table: std::rc::Rc<table::Table>,
    key: Vec<Option<String>>,
    before: Option<String>,
}

/// The rows `changes` are about to write in tables this transaction rewrote earlier, each with
/// where it is now.
fn rows_of_rewritten_tables(cache: &mut ApplyCache, changes: &[Change]) -> Result<Vec<RewrittenRow>, ApplyError> {
    let mut rows = Vec::new();
    for change in changes {
        let table = cache.table(&change.nsp, &change.rel)?;
        if !crate::row_versions::rewritten_here(table.relid) {
            continue;
        }
        for old in [false, true] {
            if (old && change.oldkey.is_none()) || (!old && change.vals.is_none()) {
                continue;
            }
            let keys = rows::key_values(&table, change, old);
            let before = rows::row_location(cache, &table, &keys)?;
            let key = keys.into_iter().map(|k| k.map(str::to_string)).collect();
            rows.push(RewrittenRow { table: table.clone(), key, before });
        }
    }
    Ok(rows)
}

/// Changes were applied after their table was rewritten by this transaction: a row they wrote
/// (it moved, appeared or went away) has this transaction's version, not the one kept from
/// before the rewrite. A row a change lost against stays where it was and keeps its version.
fn written_after_rewrite(cache: &mut ApplyCache, rows: Vec<RewrittenRow>) -> Result<(), ApplyError> {
    for row in rows {
        let keys: Vec<Option<&str>> = row.key.iter().map(|k| k.as_deref()).collect();
        if rows::row_location(cache, &row.table, &keys)? != row.before {
            crate::row_versions::written_after_rewrite(row.table.relid, &row.key).map_err(ApplyError::Postgres)?;
        }
    }
    Ok(())
}

/// Truncates the tables of consecutive TRUNCATE changes. A truncation is a version like any
/// write: it removes the rows ranking below it under the table's rule (a row written
/// concurrently on another node that ranks higher survives on every node) and leaves a marker
/// that drops lower-ranked changes arriving later. Without higher-ranked rows the tables are
/// truncated together in one statement, as at the origin (foreign keys between them allow
/// nothing else).
fn apply_truncate(cache: &mut ApplyCache, v: TxnVersion, changes: &[&Change]) -> Result<(), ApplyError> {
    let restart = changes[0].vals.as_ref().and_then(|v| v.first()).and_then(|v| v.as_deref()) == Some("restart");
    let mut tables = Vec::with_capacity(changes.len());
    for c in changes {
        let table = cache.table_locked(&c.nsp, &c.rel, pg_sys::AccessExclusiveLock)?;
        if !table.replicated {
            return Err(ApplyError::NotReplicated(table.qualified.clone()));
        }
        tables.push(table);
    }
    let sql = |q: &str, args: &[Option<&str>]| crate::sql::execute(q, args).map_err(ApplyError::Postgres);
    // Lock first: a local transaction still writing to a table would otherwise commit after
    // the count below and before the TRUNCATE, which would remove its newer rows here only.
    let names: Vec<&str> = tables.iter().map(|t| t.qualified.as_str()).collect();
    sql(&format!("LOCK TABLE ONLY {} IN ACCESS EXCLUSIVE MODE", names.join(", ")), &[])?;
    // Each table's rows rank against the truncation under the table's own rule.
    let _canonical = crate::session::CanonicalOutput::enter();
    let mut newer_rows = Vec::with_capacity(tables.len());
    for table in &tables {
        newer_rows.push(with_incoming(truncation(v, table), || {
            crate::sql::int(
                &format!("SELECT count(*) FROM {} AS tgt WHERE NOT {}", table.qualified, above_row(table)),
                &[],
            )
            .map_err(ApplyError::Postgres)
        })?);
    }
    // One TRUNCATE runs as one role, and its TRUNCATE triggers with that role's rights: the
    // tables' common owner, or this worker when a superuser owns each of them. Tables of
    // several owners, one of them no superuser, are emptied below table by table as each
    // owner instead, so that no trigger of one runs with another's (or the worker's) rights.
    let relids = || tables.iter().map(|t| t.relid);
    let whole = newer_rows.iter().all(|&n| n == 0);
    let truncate = || sql(&format!("TRUNCATE ONLY {}", names.join(", ")), &[]);
    if let (true, Some(relid)) = (whole, owner::common_owner(relids())) {
        owner::as_table_owner(relid, truncate)?;
    } else if whole && owner::all_superuser_owned(relids()) {
        truncate()?;
    } else {
        // Some rows survive, or the owners differ: delete the older rows of every table of the
        // statement, each as its owner (a TRUNCATE of only some of them could fail on a
        // foreign key between them; replica mode checks none while deleting).
        for (table, &newer) in tables.iter().zip(&newer_rows) {
            with_incoming(truncation(v, table), || {
                owner::as_table_owner(table.relid, || {
                    sql(&format!("DELETE FROM ONLY {} AS tgt WHERE {}", table.qualified, above_row(table)), &[])
                })
            })?;
            if newer > 0 {
                record(Recorded {
                    table: table.readable.clone(),
                    key: None,
                    kind: ConflictKind::Truncated,
                    remote_won: false,
                    local: LocalVersion::Unknown,
                    local_row: Some(format!("{{\"rows kept\": {newer}}}")),
                    remote: v.0,
                    remote_row: None,
                });
            }
        }
    }
    for table in &tables {
        let relid = table.relid.to_u32().to_string();
        with_incoming(truncation(v, table), || -> Result<(), ApplyError> {
            sql(
                "INSERT INTO trompe.truncations (relid) VALUES ($1::oid)
                 ON CONFLICT (relid) DO UPDATE SET relid = EXCLUDED.relid WHERE trompe._incoming_newer(truncations.xmin)",
                &[Some(&relid)],
            )?;
            sql(
                "DELETE FROM trompe.tombstones WHERE relid = $1::oid AND trompe._incoming_newer(xmin)",
                &[Some(&relid)],
            )?;
            Ok(())
        })?;
        if restart {
            sql(
                "SELECT pg_catalog.setval(d.objid::regclass, s.seqstart, false)
                   FROM pg_depend d JOIN pg_sequence s ON s.seqrelid = d.objid
                  WHERE d.refobjid = $1::oid AND d.classid = 'pg_class'::regclass
                    AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')",
                &[Some(&relid)],
            )?;
        }
    }
    if restart {
        // Restarted at their start: back into this node's slot.
        crate::sequences::adjust().map_err(|e| ApplyError::Postgres(e.to_string()))?;
    }
    crate::marker_writes::note_tombstones_written();
    Ok(())
}

/// The condition that a truncation ranks above the row `tgt` of `table` (its primary key is
/// printed as capture prints keys: run it under `CanonicalOutput`).
fn above_row(table: &table::Table) -> String {
    let key: Vec<String> = table
        .key
        .iter()
        .map(|k| format!("pg_catalog.format('%s', tgt.{})", trompe_core::ident::quote_ident(k)))
        .collect();
    format!("trompe._incoming_above_row(tgt.xmin, ARRAY[{}]::text[])", key.join(", "))
}

/// What the conditions of a truncation's statements on `table` compare against (they record
/// nothing, so no table name is needed): the truncation ranks under the table's rule.
fn truncation(v: TxnVersion, table: &table::Table) -> Incoming {
    Incoming {
        table: String::new(),
        version: v.0,
        replaced: LocalVersion::Unknown,
        kind: ConflictKind::Truncated,
        key: None,
        row: None,
        ranking: table.ranking.clone(),
        rows: Some((table.versions.clone(), Vec::new())),
    }
}

/// Replays a DDL statement with the search_path and session settings it ran with at the
/// origin, once admitted, as the role [`crate::peer_ddl::run_as`] picks, then starts
/// replicating tables it created in replicated schemas.
fn apply_ddl(cache: &mut ApplyCache, change: &Change) -> Result<(), ApplyError> {
    let vals = change
        .vals
        .as_ref()
        .ok_or(ApplyError::Malformed { id: change.id(), reason: "DDL without statement".into() })?;
    let part = |i: usize| vals.get(i).and_then(|v| v.as_deref()).unwrap_or_default().to_string();
    let (statement, search_path, role) = (part(0), part(1), part(2));
    if statement.trim().is_empty() {
        return Err(ApplyError::Malformed { id: change.id(), reason: "empty DDL statement".into() });
    }
    // The settings come first: standard_conforming_strings decides how the statement parses.
    let settings = crate::ddl_settings::set_for_statement(&trompe_core::ddlsettings::decode(vals));
    // A peer runs only allowed DDL on what is replicated here, and as no superuser unless
    // trompe.peer_ddl_role says so (src/peer_ddl.rs). It is checked as the role it runs as, so
    // that names resolve alike (a search_path with "$user").
    let run_as = crate::peer_ddl::run_as(&role).map_err(ApplyError::Refused)?;
    crate::sql::execute(
        "SELECT set_config('search_path', $1, true), set_config('role', $2, true)",
        &[Some(&search_path), Some(&run_as)],
    )
    .map_err(ApplyError::Postgres)?;
    crate::peer_ddl::admit(&statement).map_err(ApplyError::Refused)?;
    crate::sql::execute(&statement, &[]).map_err(ApplyError::Postgres)?;
    settings.end();
    crate::sql::execute("SELECT set_config('role', 'none', true), set_config('search_path', '', true)", &[])
        .map_err(ApplyError::Postgres)?;
    cache.clear();
    crate::tables::sync_schema_tables().map_err(|e| ApplyError::Postgres(e.to_string()))?;
    crate::sequences::adjust().map_err(|e| ApplyError::Postgres(e.to_string()))?;
    Ok(())
}
