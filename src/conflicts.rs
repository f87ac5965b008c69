//! Conflict resolution during apply, and the conflict log.
//!
//! Apply statements carry a condition `trompe._apply_wins(tgt.xmin, tgt, incoming)`: evaluated
//! on the local row an incoming change meets, it compares that row's version (its xmin's
//! commit time and origin) with the incoming one under the table's rule, records a conflict if
//! the two were written concurrently, and lets the statement change the row only if the
//! incoming version wins. The apply code sets what the condition needs to know about the
//! change (its version, the version it replaced at its origin) before each statement, and
//! writes the recorded conflicts to `trompe.conflicts` after it.

use std::cell::RefCell;

use pgrx::prelude::*;
use pgrx::AnyElement;
use trompe_core::conflict::{is_conflict, ConflictKind, LocalVersion, Ranking, Rule, Version};
use trompe_core::nodeid::NodeId;

use crate::capture::version::version_of;

/// What the conditions of the current apply statement compare against.
#[derive(Clone)]
pub struct Incoming {
    /// The qualified table name, for the log.
    pub table: String,
    /// The incoming change's version.
    pub version: Version,
    /// The version it replaced at its origin (Unknown for inserts).
    pub replaced: LocalVersion,
    /// The kind of conflict a concurrent local row means for this change.
    pub kind: ConflictKind,
    /// The primary key as JSON, when the statement changes one row.
    pub key: Option<String>,
    /// The incoming row as JSON, when the statement changes one row.
    pub row: Option<String>,
    /// How versions rank: the conflict rule of the table the statement writes.
    pub ranking: std::rc::Rc<Ranking>,
    /// How the versions of the table's rows are read, and the primary key (canonical text) of
    /// the one row the statement changes, when it changes one (see `crate::row_versions`).
    pub rows: Option<(std::rc::Rc<crate::row_versions::TableVersions>, Vec<Option<String>>)>,
}

/// One conflict, as written to `trompe.conflicts`.
pub struct Recorded {
    /// Table.
    pub table: String,
    /// Primary key (JSON).
    pub key: Option<String>,
    /// Kind.
    pub kind: ConflictKind,
    /// True if the incoming change won.
    pub remote_won: bool,
    /// The local version met.
    pub local: LocalVersion,
    /// The local row (JSON), if known.
    pub local_row: Option<String>,
    /// The incoming version.
    pub remote: Version,
    /// The incoming row (JSON), if any.
    pub remote_row: Option<String>,
}

thread_local! {
    /// How often `_apply_wins` decided in this process (apply code tells from it whether a
    /// statement met the local row at all).
    static DECISIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    static CURRENT: RefCell<Option<Incoming>> = const { RefCell::new(None) };
    static RECORDED: RefCell<Vec<Recorded>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` (an apply statement) with `incoming` as what its conditions compare against.
pub fn with_incoming<R>(incoming: Incoming, f: impl FnOnce() -> R) -> R {
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            CURRENT.with(|c| *c.borrow_mut() = None);
        }
    }
    CURRENT.with(|c| *c.borrow_mut() = Some(incoming));
    let _clear = Clear;
    f()
}

/// How many times a statement's condition has decided between an incoming change and a local
/// row in this process so far.
pub fn decisions() -> u64 {
    DECISIONS.get()
}

/// Records a conflict found by the apply code itself (not by a statement's condition).
pub fn record(conflict: Recorded) {
    RECORDED.with(|r| r.borrow_mut().push(conflict));
}

/// The transaction that wrote the tombstone of `key` (its values as text, in primary key order)
/// in table `relid`, if the key has one. With `key_share`, the tombstone stays locked FOR KEY
/// SHARE until the transaction ends (a local insert of the key): the worker then leaves it alone
/// when logging a queued retirement of the key (see `worker::apply::retire`), and an insert that
/// comes while the worker holds it waits for it, so that the two never commit out of order.
/// Updates of tombstones (by apply and local deletes) do not conflict with that lock.
pub fn tombstone_writer(
    relid: pg_sys::Oid,
    key: &[Option<&str>],
    key_share: bool,
) -> Result<Option<pg_sys::TransactionId>, String> {
    let sql = if key_share {
        "SELECT xmin FROM trompe.tombstones WHERE relid = $1::oid AND key = $2::text[] FOR KEY SHARE"
    } else {
        "SELECT xmin FROM trompe.tombstones WHERE relid = $1::oid AND key = $2::text[]"
    };
    let xmin = crate::run_as::as_extension_owner(|| {
        crate::sql::value(
            sql,
            &[Some(&relid.to_u32().to_string()), Some(&trompe_core::pgarray::format_text_array(key))],
        )
    })?;
    Ok(xmin.and_then(|x| x.parse::<u32>().ok()).map(pg_sys::TransactionId::from))
}

/// Whether this database's schema has the node priorities (0.4.0 and later).
pub fn node_priorities_exist() -> Result<bool, String> {
    crate::sql::relation_exists("trompe.node_priorities")
}

/// How the row versions of table `relid` rank: its conflict rule and, for `node_priority`, the
/// node priorities (none on a schema older than 0.4.0).
pub fn ranking_of(relid: pg_sys::Oid) -> Result<Ranking, String> {
    crate::run_as::as_extension_owner(|| {
        let rule = crate::sql::value(
            "SELECT conflict_rule FROM trompe.tables WHERE relid = $1::oid",
            &[Some(&relid.to_u32().to_string())],
        )?;
        let rule = rule.as_deref().and_then(|r| Rule::parse(r).ok()).unwrap_or_default();
        let mut priorities = Vec::new();
        if rule == Rule::NodePriority && node_priorities_exist()? {
            for r in crate::sql::rows("SELECT node_id::text, priority::text FROM trompe.node_priorities", &[])? {
                let node = r.first().cloned().flatten().and_then(|n| n.parse::<NodeId>().ok());
                let priority = r.get(1).cloned().flatten().and_then(|p| p.parse::<i32>().ok());
                if let (Some(node), Some(priority)) = (node, priority) {
                    priorities.push((node, priority));
                }
            }
        }
        Ok(Ranking { rule, priorities })
    })
}

/// What table `relid` has of conflict markers: the transaction that wrote its truncation
/// marker, if it was truncated, and whether any of its keys has a tombstone.
pub fn table_markers(relid: pg_sys::Oid) -> Result<(Option<pg_sys::TransactionId>, bool), String> {
    let row = crate::run_as::as_extension_owner(|| {
        crate::sql::row(
            "SELECT (SELECT xmin FROM trompe.truncations WHERE relid = $1::oid),
                    EXISTS (SELECT 1 FROM trompe.tombstones WHERE relid = $1::oid)",
            &[Some(&relid.to_u32().to_string())],
        )
    })?
    .unwrap_or_default();
    let truncated = row.first().cloned().flatten().and_then(|x| x.parse::<u32>().ok()).map(pg_sys::TransactionId::from);
    Ok((truncated, row.get(1).cloned().flatten().as_deref() == Some("t")))
}

/// The version of a local row or tombstone written by transaction `xmin`.
pub fn local_version(xmin: pg_sys::TransactionId) -> LocalVersion {
    version_of(xmin).into()
}

extern "C-unwind" {
    /// PostgreSQL's row_to_json(record): reads the composite datum's own type.
    #[link_name = "row_to_json"]
    fn pg_row_to_json(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum;
}

/// The JSON text of a row value (a composite datum).
fn row_json(row: &AnyElement) -> Option<String> {
    // SAFETY: row_to_json reads the composite datum's own type; the result is a json text.
    unsafe {
        let json = pg_sys::DirectFunctionCall1Coll(Some(pg_row_to_json), pg_sys::InvalidOid, row.datum());
        let text = pg_sys::text_to_cstring(json.cast_mut_ptr());
        Some(std::ffi::CStr::from_ptr(text).to_string_lossy().into_owned())
    }
}

/// The condition of apply statements: true if the incoming change replaces the local row that
/// has xmin `local_xmin` (contents `local_row`); `remote_row` is the incoming row when the
/// statement applies several (NULL otherwise). Records a conflict if the two were concurrent.
#[pg_extern(volatile, parallel_unsafe)]
fn _apply_wins(
    local_xmin: pg_sys::TransactionId,
    local_row: Option<AnyElement>,
    remote_row: Option<AnyElement>,
) -> bool {
    let Some(incoming) = CURRENT.with(|c| c.borrow().clone()) else {
        // Outside apply (someone calling it by hand): never change anything.
        return false;
    };
    decide(&incoming, local_xmin, || local_row.as_ref().and_then(row_json), || remote_row.as_ref().and_then(row_json))
}

/// Decides between `incoming` and the local row written by `local_xmin`: true if the incoming
/// change replaces it. Records a conflict if the two were concurrent, with the local row's and
/// (when `incoming` has none) the incoming row's JSON from `local_row` and `remote_row`.
pub fn decide(
    incoming: &Incoming,
    local_xmin: pg_sys::TransactionId,
    local_row: impl FnOnce() -> Option<String>,
    remote_row: impl FnOnce() -> Option<String>,
) -> bool {
    DECISIONS.set(DECISIONS.get() + 1);
    let local = match &incoming.rows {
        Some((versions, key)) => versions.row_version(local_xmin, || key.clone()).into(),
        None => local_version(local_xmin),
    };
    let wins = incoming.ranking.wins(incoming.version, local);
    if is_conflict(incoming.version, incoming.replaced, local) {
        record(Recorded {
            table: incoming.table.clone(),
            key: incoming.key.clone(),
            kind: incoming.kind,
            remote_won: wins,
            local,
            local_row: local_row(),
            remote: incoming.version,
            remote_row: incoming.row.clone().or_else(remote_row),
        });
    }
    wins
}

/// The JSON text of the row in `slot` (a row of a table, as `row_to_json(tgt)` gives it).
///
/// # Safety
/// `slot` must hold a row of a relation whose descriptor it has.
pub unsafe fn slot_json(slot: *mut pg_sys::TupleTableSlot) -> Option<String> {
    // SAFETY: the caller guarantees the slot; the datum is a composite of the table's row type.
    unsafe {
        let datum = pg_sys::ExecFetchSlotHeapTupleDatum(slot);
        let json = pg_sys::DirectFunctionCall1Coll(Some(pg_row_to_json), pg_sys::InvalidOid, datum);
        let text = pg_sys::text_to_cstring(json.cast_mut_ptr());
        Some(std::ffi::CStr::from_ptr(text).to_string_lossy().into_owned())
    }
}

/// True if the incoming change of the current apply statement ranks above the row of its table
/// with primary key `key` (canonical text) written by transaction `xmin` (for truncations;
/// records nothing).
#[pg_extern(volatile, parallel_unsafe)]
fn _incoming_above_row(xmin: pg_sys::TransactionId, key: Vec<Option<String>>) -> bool {
    CURRENT
        .with(|c| {
            let c = c.borrow();
            let incoming = c.as_ref()?;
            let local = match &incoming.rows {
                Some((versions, _)) => versions.row_version(xmin, || key).into(),
                None => local_version(xmin),
            };
            Some(incoming.ranking.wins(incoming.version, local))
        })
        .unwrap_or(false)
}

/// True if the incoming change of the current apply statement is newer than what transaction
/// `xmin` wrote (for tombstones and truncation markers; records nothing).
#[pg_extern(volatile, parallel_unsafe)]
fn _incoming_newer(xmin: pg_sys::TransactionId) -> bool {
    CURRENT.with(|c| c.borrow().as_ref().map(|i| i.ranking.wins(i.version, local_version(xmin)))).unwrap_or(false)
}

fn timestamp_text(ts: i64) -> String {
    // PostgreSQL TimestampTz is µs since 2000-01-01; to_timestamp takes Unix seconds.
    format!("{}", 946_684_800.0 + ts as f64 / 1_000_000.0)
}

fn node_text(node: NodeId) -> String {
    node.to_string()
}

/// Writes the recorded conflicts to `trompe.conflicts` (inside the apply transaction).
pub fn flush() -> Result<(), String> {
    let recorded: Vec<Recorded> = RECORDED.with(|r| std::mem::take(&mut *r.borrow_mut()));
    for c in recorded {
        let (local_node, local_ts) = match c.local {
            LocalVersion::Known(v) => (Some(node_text(v.node)), Some(timestamp_text(v.ts))),
            _ => (None, None),
        };
        let remote_node = node_text(c.remote.node);
        let remote_ts = timestamp_text(c.remote.ts);
        crate::sql::execute(
            "INSERT INTO trompe.conflicts (table_name, key, kind, winner, local_origin, local_committed_at,
                                           local_row, remote_origin, remote_committed_at, remote_row)
             VALUES ($1, $2::jsonb, $3, $4, $5::uuid, to_timestamp($6::float8), $7::jsonb, $8::uuid,
                     to_timestamp($9::float8), $10::jsonb)",
            &[
                Some(&c.table),
                c.key.as_deref(),
                Some(c.kind.name()),
                Some(if c.remote_won { "remote" } else { "local" }),
                local_node.as_deref(),
                local_ts.as_deref(),
                c.local_row.as_deref(),
                Some(&remote_node),
                Some(&remote_ts),
                c.remote_row.as_deref(),
            ],
        )?;
    }
    Ok(())
}

/// Forgets recorded conflicts (the apply transaction failed).
pub fn discard() {
    RECORDED.with(|r| r.borrow_mut().clear());
}
