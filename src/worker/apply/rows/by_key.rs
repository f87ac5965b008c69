//! What every way of applying a row change needs: the change's key and row, the local row
//! looked up by its key, its version, and the key's tombstone.

use pgrx::pg_sys;
use trompe_core::changeset::OldVersion;
use trompe_core::conflict::{ConflictKind, LocalVersion, Version};
use trompe_core::ident::quote_ident;
use trompe_core::json;
use trompe_core::pgarray::format_text_array;

use crate::capture::row::log_delete;
use crate::conflicts::{local_version, Incoming};
use crate::worker::apply::change::Change;
use crate::worker::apply::error::ApplyError;
use crate::worker::apply::owner;
use crate::worker::apply::table::{run_plan, ApplyCache, Table};

/// The version of the origin transaction being applied.
#[derive(Clone, Copy)]
pub struct TxnVersion(pub Version);

/// Values of the change's columns by name: the new row (`vals`) or the old key (`oldkey`,
/// which matches the first columns).
pub(super) fn value_of<'c>(change: &'c Change, col: &str, old: bool) -> Option<&'c str> {
    let i = change.cols.iter().position(|c| c == col)?;
    let list = if old { change.oldkey.as_ref()? } else { change.vals.as_ref()? };
    list.get(i).and_then(|v| v.as_deref())
}

/// The local primary key's values, taken from the new row or the old key.
pub(crate) fn key_values<'c>(table: &Table, change: &'c Change, old: bool) -> Vec<Option<&'c str>> {
    table.key.iter().map(|k| value_of(change, k, old)).collect()
}

pub(super) fn key_json(table: &Table, values: &[Option<&str>]) -> String {
    json::object(table.key.iter().map(String::as_str).zip(values.iter().copied()))
}

pub(super) fn row_json(change: &Change) -> Option<String> {
    let vals = change.vals.as_ref()?;
    Some(json::object(change.cols.iter().map(String::as_str).zip(vals.iter().map(|v| v.as_deref()))))
}

/// Checks that the change's columns exist here and its key is this table's key.
pub(super) fn check_columns(table: &Table, change: &Change, nkey: usize) -> Result<(), ApplyError> {
    if !table.replicated {
        return Err(ApplyError::NotReplicated(table.qualified.clone()));
    }
    if let Some(c) = change.cols.iter().find(|c| !table.attrs.contains_key(c.as_str())) {
        return Err(ApplyError::NoSuchColumn { table: table.readable.clone(), column: c.clone() });
    }
    if nkey > change.cols.len() {
        return Err(ApplyError::Malformed { id: change.id(), reason: "key longer than the column list".into() });
    }
    let mut theirs: Vec<&str> = change.cols[..nkey].iter().map(String::as_str).collect();
    let mut ours: Vec<&str> = table.key.iter().map(String::as_str).collect();
    theirs.sort_unstable();
    ours.sort_unstable();
    if theirs != ours {
        return Err(ApplyError::KeyMismatch(table.qualified.clone()));
    }
    Ok(())
}

pub(super) fn nkey_of(change: &Change) -> Result<usize, ApplyError> {
    change
        .oldkey
        .as_ref()
        .map(|k| k.len())
        .ok_or(ApplyError::Malformed { id: change.id(), reason: "missing old key".into() })
}

/// `WHERE` over the local key with parameters starting at `$first`.
pub(super) fn key_condition(table: &Table, first: usize) -> String {
    let parts: Vec<String> =
        table.key.iter().enumerate().map(|(i, k)| format!("tgt.{} = ${}", quote_ident(k), first + i)).collect();
    parts.join(" AND ")
}

pub(super) fn key_datums(table: &Table, keys: &[Option<&str>], values: &mut Vec<pg_sys::Datum>, nulls: &mut Vec<bool>) {
    for (k, v) in table.key.iter().zip(keys) {
        let (d, n) = table.attrs[k].datum(*v);
        values.push(d);
        nulls.push(n);
    }
}

pub(super) fn incoming(
    table: &Table,
    v: TxnVersion,
    change: &Change,
    kind: ConflictKind,
    keys: &[Option<&str>],
) -> Incoming {
    Incoming { row: row_json(change), ..incoming_row_unset(table, v, change, kind, keys) }
}

/// [`incoming`] without the incoming row's JSON (to be set where it is needed).
pub(super) fn incoming_row_unset(
    table: &Table,
    v: TxnVersion,
    change: &Change,
    kind: ConflictKind,
    keys: &[Option<&str>],
) -> Incoming {
    Incoming {
        table: table.readable.clone(),
        version: v.0,
        replaced: change.old.into(),
        kind,
        key: Some(key_json(table, keys)),
        row: None,
        ranking: table.ranking.clone(),
        rows: Some((table.versions.clone(), keys.iter().map(|k| k.map(str::to_string)).collect())),
    }
}

/// The version of the local row with primary key `keys` written by `xmin`.
pub(super) fn row_version(table: &Table, xmin: u32, keys: &[Option<&str>]) -> LocalVersion {
    let xmin = pg_sys::TransactionId::from(xmin);
    table.versions.row_version(xmin, || keys.iter().map(|k| k.map(str::to_string)).collect()).into()
}

/// Runs the kept statement `tag` of `table` (built by `sql` the first time) whose parameters
/// `$1..` are the primary key values `keys`; returns the rows processed and the first row.
pub(super) fn run_by_key(
    cache: &mut ApplyCache,
    table: &Table,
    tag: &str,
    keys: &[Option<&str>],
    sql: impl FnOnce() -> String,
) -> Result<(u64, Vec<Option<String>>), ApplyError> {
    let plan = cache.plan(
        &format!("{tag}\0{}", table.relid.to_u32()),
        table.relid,
        || table.key.iter().map(|k| table.attrs[k].typid).collect(),
        sql,
    )?;
    let mut values = Vec::new();
    let mut nulls = Vec::new();
    key_datums(table, keys, &mut values, &mut nulls);
    owner::as_table_owner(table.relid, || run_plan(plan, &mut values, &nulls))
}

/// True if the row with this key exists locally.
pub(crate) fn row_exists(cache: &mut ApplyCache, table: &Table, keys: &[Option<&str>]) -> Result<bool, ApplyError> {
    let found = run_by_key(cache, table, "X", keys, || {
        format!("SELECT 1 FROM {} AS tgt WHERE {}", table.qualified, key_condition(table, 1))
    })?;
    Ok(found.0 > 0)
}

/// Where the local row with this key is (its partition or table, and `ctid`), `None` if there
/// is none: a write moves it.
pub(crate) fn row_location(
    cache: &mut ApplyCache,
    table: &Table,
    keys: &[Option<&str>],
) -> Result<Option<String>, ApplyError> {
    let (found, row) = run_by_key(cache, table, "C", keys, || {
        format!(
            "SELECT tgt.tableoid::text || ':' || tgt.ctid::text FROM {} AS tgt WHERE {}",
            table.qualified,
            key_condition(table, 1)
        )
    })?;
    Ok(if found > 0 { row.into_iter().next().flatten() } else { None })
}

/// Deletes the local row with this key, whatever its version (a unique collision removed it).
pub(super) fn delete_by_key(cache: &mut ApplyCache, table: &Table, keys: &[Option<&str>]) -> Result<(), ApplyError> {
    run_by_key(cache, table, "DU", keys, || {
        format!("DELETE FROM {} AS tgt WHERE {}", table.qualified, key_condition(table, 1))
    })?;
    Ok(())
}

/// Logs the removal of the row with `keys` (replacing version `old`) as a change of this
/// transaction, so that every node removes it.
pub(super) fn log_removal(
    change: &Change,
    table: &Table,
    keys: &[Option<&str>],
    old: OldVersion,
) -> Result<(), ApplyError> {
    log_delete(&change.nsp, &change.rel, &table.key, keys, old).map_err(|e| ApplyError::Postgres(e.to_string()))
}

pub(super) fn key_array(keys: &[Option<&str>]) -> String {
    format_text_array(keys)
}

/// The version of the tombstone of this key, if the row was deleted.
pub(super) fn tombstone(table: &Table, keys: &[Option<&str>]) -> Result<Option<LocalVersion>, ApplyError> {
    let xmin = crate::conflicts::tombstone_writer(table.relid, keys, false).map_err(ApplyError::Postgres)?;
    Ok(xmin.map(local_version))
}

/// Writes (or moves forward) the tombstone of a deleted key, inside the current statement
/// context so it only moves to a newer version.
pub(super) fn write_tombstone(table: &Table, keys: &[Option<&str>]) -> Result<(), ApplyError> {
    crate::sql::execute(
        "INSERT INTO trompe.tombstones (relid, key) VALUES ($1::oid, $2::text[])
         ON CONFLICT (relid, key) DO UPDATE SET key = EXCLUDED.key WHERE trompe._incoming_newer(tombstones.xmin)",
        &[Some(&table.relid.to_u32().to_string()), Some(&key_array(keys))],
    )
    .map_err(ApplyError::Postgres)?;
    crate::marker_writes::note_tombstones_written();
    Ok(())
}
