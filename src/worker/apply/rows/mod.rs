//! Applying row changes under the table's conflict rule (last update wins, first update wins or
//! node priority: `trompe_core::conflict::Ranking`).
//!
//! The common case goes through the executor directly: runs of inserts (see `direct.rs`), and
//! updates and deletes that look the row up by its key, lock it and decide against its version
//! here (see `keyed.rs`). Where that path does not apply, one statement per change: its
//! condition `trompe._apply_wins` lets it change a row only if the incoming version is newer
//! than the row's, and records a conflict when the row was written concurrently. Either way,
//! when no row was met apply looks closer: was it deleted (tombstone) by a newer change?
//! Tables with tombstones, and transactions that ran into a secondary unique constraint, take
//! a careful path that checks before writing.

use pgrx::pg_sys;
use trompe_core::conflict::{ConflictKind, LocalVersion};
use trompe_core::ident::quote_ident;
use trompe_core::logformat::Op;
use trompe_core::pgarray::format_text_array;

mod by_key;
mod unique;

pub use by_key::TxnVersion;
use by_key::{
    check_columns, incoming, incoming_row_unset, key_array, key_condition, key_datums, key_json, nkey_of, row_json,
    run_by_key, tombstone, write_tombstone,
};
pub(super) use by_key::{key_values, row_exists, row_location};

use super::change::Change;
use super::error::ApplyError;
use super::keyed::Met;
use super::owner;
use super::table::{run_plan, ApplyCache, Guards, Table};
use crate::conflicts::{local_version, record, with_incoming, Incoming, Recorded};

/// How many times an update or delete is run again when it found no row although one exists:
/// each run takes a new snapshot, which sees a row committed while the previous one waited.
const MEETING_ATTEMPTS: usize = 5;

/// The condition under which a statement changes the local row `tgt`, for a table whose key
/// parameters start at `$first`: the key comparison is written again inside a CASE, so that
/// whatever plan the statement gets, the conflict function only ever sees the row with that key
/// (a sequential scan may evaluate a qual list in any order).
fn wins_condition(table: &Table, first: usize) -> String {
    format!(
        "CASE WHEN {} THEN trompe._apply_wins(tgt.xmin, tgt, NULL::{}) ELSE false END",
        key_condition(table, first),
        table.qualified
    )
}

/// After inserting rows with `keys`: takes back those whose key has a tombstone newer than
/// the insert. The tombstones may have been checked before, but a local delete of the same key
/// can commit in between; reading them after the insert (with a fresh snapshot) closes that
/// gap, since such a delete has committed before the insert could find its key free.
fn undo_if_deleted_since(
    cache: &mut ApplyCache,
    table: &Table,
    v: TxnVersion,
    keys: &[Vec<Option<&str>>],
) -> Result<(), ApplyError> {
    let literals: Vec<String> = keys.iter().map(|k| key_array(k)).collect();
    let refs: Vec<Option<&str>> = literals.iter().map(|l| Some(l.as_str())).collect();
    let found = crate::sql::rows(
        "SELECT k.n, t.xmin FROM unnest($2::text[]) WITH ORDINALITY AS k(lit, n)
           JOIN trompe.tombstones t ON t.relid = $1::oid AND t.key = k.lit::text[]",
        &[Some(&table.relid.to_u32().to_string()), Some(&format_text_array(&refs))],
    )
    .map_err(ApplyError::Postgres)?;
    for row in found {
        let n = row.first().cloned().flatten().and_then(|n| n.parse::<usize>().ok());
        let xmin = row.get(1).cloned().flatten().and_then(|x| x.parse::<u32>().ok());
        let (Some(n), Some(xmin)) = (n, xmin) else { continue };
        let Some(key) = keys.get(n.wrapping_sub(1)) else { continue };
        let t = local_version(pg_sys::TransactionId::from(xmin));
        if table.ranking.wins(v.0, t) {
            continue;
        }
        run_by_key(cache, table, "U!", key, || {
            format!(
                "DELETE FROM {} AS tgt WHERE {} AND tgt.xmin = pg_catalog.pg_current_xact_id()::xid",
                table.qualified,
                key_condition(table, 1)
            )
        })?;
        record(Recorded {
            table: table.readable.clone(),
            key: Some(key_json(table, key)),
            kind: ConflictKind::UpdateDeleted,
            remote_won: false,
            local: t,
            local_row: None,
            remote: v.0,
            remote_row: None,
        });
    }
    Ok(())
}

/// True if the change is older than the table's last truncation (then it is dropped).
fn truncated_after(guards: &Guards, table: &Table, v: TxnVersion, change: &Change) -> bool {
    match guards.truncated {
        Some(t) if !table.ranking.wins(v.0, t) => {
            record(Recorded {
                table: table.readable.clone(),
                key: None,
                kind: ConflictKind::Truncated,
                remote_won: false,
                local: t,
                local_row: None,
                remote: v.0,
                remote_row: row_json(change),
            });
            true
        }
        _ => false,
    }
}

/// Inserts one row, or updates the existing row with its key if the incoming version wins.
fn upsert_one(cache: &mut ApplyCache, table: &Table, change: &Change) -> Result<(), ApplyError> {
    let cols: Vec<&str> = change.cols.iter().map(String::as_str).collect();
    let cache_key = format!("I\0{}\0{}", table.relid.to_u32(), cols.join("\0"));
    let plan = cache.plan(
        &cache_key,
        table.relid,
        || cols.iter().map(|c| table.attrs[*c].typid).collect(),
        || {
            let col_list: Vec<String> = cols.iter().map(|c| quote_ident(c)).collect();
            let placeholders: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
            format!(
                "INSERT INTO {} AS tgt ({}) OVERRIDING SYSTEM VALUE VALUES ({}) {}",
                table.qualified,
                col_list.join(", "),
                placeholders.join(", "),
                on_conflict(table, &cols)
            )
        },
    )?;
    let mut values = Vec::with_capacity(cols.len());
    let mut nulls = Vec::with_capacity(cols.len());
    for (i, c) in cols.iter().enumerate() {
        let (d, n) = table.attrs[*c].datum(change.vals.as_ref().and_then(|v| v.get(i)).and_then(|v| v.as_deref()));
        values.push(d);
        nulls.push(n);
    }
    owner::as_table_owner(table.relid, || run_plan(plan, &mut values, &nulls))?;
    Ok(())
}

/// `col = DEFAULT` for every local column the change does not carry (sorted). A change lacks a
/// column when its origin did not have it yet (DDL still on its way): the write replaces the
/// whole row, so those columns take the default they got on the origin when the column came.
fn missing_defaults(table: &Table, cols: &[&str]) -> Vec<String> {
    let mut missing: Vec<&String> = table.attrs.keys().filter(|c| !cols.contains(&c.as_str())).collect();
    missing.sort();
    missing.into_iter().map(|c| format!("{} = DEFAULT", quote_ident(c))).collect()
}

/// A SET item that changes no value but gives the row a new version (a column set to
/// itself), for tables whose change sets nothing else; None if every column is an identity
/// GENERATED ALWAYS, which an UPDATE cannot name.
fn touch(table: &Table) -> Option<String> {
    let mut others: Vec<&String> = table.attrs.keys().filter(|c| !table.key.contains(c)).collect();
    others.sort();
    table
        .key
        .iter()
        .chain(others)
        .find(|c| !table.attrs.get(*c).is_some_and(|a| a.always_identity))
        .map(|c| format!("{0} = tgt.{0}", quote_ident(c)))
}

/// The ON CONFLICT clause of an insert: the existing row is replaced only if the incoming
/// version wins. Key columns are set too: a key equal to the existing one may still be written
/// differently (`numeric` `1.0` and `1`), and the winner's must be the row's on every node (an
/// identity column `GENERATED ALWAYS` cannot be set, and keeps its value).
fn on_conflict(table: &Table, cols: &[&str]) -> String {
    let key_list: Vec<String> = table.key.iter().map(|c| quote_ident(c)).collect();
    let mut updates: Vec<String> = cols
        .iter()
        .filter(|c| !table.attrs.get(**c).is_some_and(|a| a.always_identity))
        .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(c)))
        .collect();
    updates.extend(missing_defaults(table, cols));
    if updates.is_empty() {
        // Only key columns: the row still takes the incoming version.
        match touch(table) {
            Some(set) => updates.push(set),
            None => return format!("ON CONFLICT ({}) DO NOTHING", key_list.join(", ")),
        }
    }
    format!(
        "ON CONFLICT ({}) DO UPDATE SET {} WHERE trompe._apply_wins(tgt.xmin, tgt, EXCLUDED)",
        key_list.join(", "),
        updates.join(", ")
    )
}

/// Inserts a run of rows (same table and columns, distinct keys). Without tombstones on the
/// table, and unless the transaction is being applied carefully, the rows are inserted
/// without any conflict check: a row that exists already raises a unique violation and the
/// caller applies the transaction again carefully, row by row.
pub fn insert_run(cache: &mut ApplyCache, v: TxnVersion, run: &[Change], careful: bool) -> Result<(), ApplyError> {
    let first = &run[0];
    let table = cache.table(&first.nsp, &first.rel)?;
    check_columns(&table, first, table.key.len())?;
    let guards = cache.guards(table.relid)?;
    if !careful && !guards.tombstones {
        if truncated_after(&guards, &table, v, first) {
            return Ok(());
        }
        let arrays = first.cols.iter().all(|c| table.attrs[c].array_type != pg_sys::InvalidOid);
        let inserted = super::direct::insert_rows(&table, run)?
            || (run.len() > 1 && arrays && insert_statement(cache, &table, run).map(|()| true)?);
        if inserted {
            if !guards.recheck_needed() {
                return Ok(());
            }
            let keys: Vec<Vec<Option<&str>>> = run.iter().map(|c| key_values(&table, c, false)).collect();
            return undo_if_deleted_since(cache, &table, v, &keys);
        }
    }
    for change in run {
        insert_one(cache, &table, v, change, careful)?;
    }
    Ok(())
}

/// Inserts `run` with one `INSERT ... SELECT FROM unnest(...)` statement (columns left out
/// of the changes take their defaults).
fn insert_statement(cache: &mut ApplyCache, table: &Table, run: &[Change]) -> Result<(), ApplyError> {
    let first = &run[0];
    let cols: Vec<&str> = first.cols.iter().map(String::as_str).collect();
    let cache_key = format!("P\0{}\0{}", table.relid.to_u32(), cols.join("\0"));
    let plan = cache.plan(
        &cache_key,
        table.relid,
        || cols.iter().map(|c| table.attrs[*c].array_type).collect(),
        || {
            let col_list: Vec<String> = cols.iter().map(|c| quote_ident(c)).collect();
            let arrays: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
            // No ON CONFLICT: a row that exists already (a conflict) raises a unique violation,
            // and the transaction is applied again carefully, row by row with ON CONFLICT. The
            // common case saves the speculative-insertion check of every row.
            format!(
                "INSERT INTO {} AS tgt ({}) OVERRIDING SYSTEM VALUE SELECT * FROM unnest({})",
                table.qualified,
                col_list.join(", "),
                arrays.join(", "),
            )
        },
    )?;
    let mut values = Vec::with_capacity(cols.len());
    for (j, col) in cols.iter().enumerate() {
        let texts: Vec<Option<&str>> =
            run.iter().map(|c| c.vals.as_ref().and_then(|v| v.get(j)).and_then(|v| v.as_deref())).collect();
        values.push(table.attrs[*col].array(&texts));
    }
    let nulls = vec![false; values.len()];
    owner::as_table_owner(table.relid, || run_plan(plan, &mut values, &nulls))?;
    Ok(())
}

/// Inserts one row unless a newer tombstone or truncation says it was deleted since.
fn insert_one(
    cache: &mut ApplyCache,
    table: &Table,
    v: TxnVersion,
    change: &Change,
    careful: bool,
) -> Result<(), ApplyError> {
    let guards = cache.guards(table.relid)?;
    if truncated_after(&guards, table, v, change) {
        return Ok(());
    }
    let keys = key_values(table, change, false);
    let ctx = incoming(table, v, change, ConflictKind::InsertExists, &keys);
    if guards.tombstones {
        if let Some(t) = tombstone(table, &keys)? {
            if !table.ranking.wins(v.0, t) && !row_exists(cache, table, &keys)? {
                record(Recorded {
                    table: table.readable.clone(),
                    key: ctx.key.clone(),
                    kind: ConflictKind::UpdateDeleted,
                    remote_won: false,
                    local: t,
                    local_row: None,
                    remote: v.0,
                    remote_row: ctx.row.clone(),
                });
                return Ok(());
            }
        }
    }
    if careful && !unique::resolve_unique(cache, table, v, change, &keys)? {
        return Ok(());
    }
    with_incoming(ctx, || upsert_one(cache, table, change))?;
    if !guards.recheck_needed() {
        return Ok(());
    }
    undo_if_deleted_since(cache, table, v, &[keys])
}

/// Updates one row (or, when its key changed, deletes the old key and inserts the new one).
pub fn update(cache: &mut ApplyCache, v: TxnVersion, change: &Change, careful: bool) -> Result<(), ApplyError> {
    let nkey = nkey_of(change)?;
    let table = cache.table(&change.nsp, &change.rel)?;
    check_columns(&table, change, nkey)?;
    let old_keys = key_values(&table, change, true);
    let new_keys = key_values(&table, change, false);
    if old_keys != new_keys {
        delete_key(cache, &table, v, change, &old_keys)?;
        return insert_one(cache, &table, v, change, careful);
    }
    let guards = cache.guards(table.relid)?;
    if truncated_after(&guards, &table, v, change) {
        return Ok(());
    }
    if careful && !unique::resolve_unique(cache, &table, v, change, &new_keys)? {
        return Ok(());
    }
    // The incoming row's JSON is only needed for a conflict: the executor path builds it then.
    let mut ctx = incoming_row_unset(&table, v, change, ConflictKind::UpdateUpdate, &old_keys);
    let met = match super::keyed::update_row(&table, change, &ctx, &old_keys, || row_json(change))? {
        Some(met) => met,
        None => {
            ctx.row = row_json(change);
            update_statement(cache, &table, change, &ctx, &old_keys)?
        }
    };
    if met != Met::Missing {
        return Ok(());
    }
    if ctx.row.is_none() {
        ctx.row = row_json(change);
    }
    // The row is missing here: deleted by a newer change, or never seen (then the update,
    // which carries the whole row, creates it).
    // Either way it is a conflict: the update's origin still had the row.
    let (kind, local, remote_won) = match tombstone(&table, &old_keys)? {
        Some(t) => (ConflictKind::UpdateDeleted, t, table.ranking.wins(v.0, t)),
        None => (ConflictKind::UpdateMissing, LocalVersion::Unknown, true),
    };
    record(Recorded {
        table: table.readable.clone(),
        key: ctx.key.clone(),
        kind,
        remote_won,
        local,
        local_row: None,
        remote: v.0,
        remote_row: ctx.row.clone(),
    });
    if !remote_won {
        return Ok(());
    }
    with_incoming(ctx, || upsert_one(cache, &table, change))?;
    if !guards.recheck_needed() {
        return Ok(());
    }
    undo_if_deleted_since(cache, &table, v, &[new_keys])
}

/// Updates the row with key `old_keys` (unchanged by the change) with an `UPDATE` statement
/// whose condition decides against the local row: for tables the executor path leaves alone.
fn update_statement(
    cache: &mut ApplyCache,
    table: &Table,
    change: &Change,
    ctx: &Incoming,
    old_keys: &[Option<&str>],
) -> Result<Met, ApplyError> {
    let cols: Vec<&str> = change.cols.iter().map(String::as_str).collect();
    let cache_key = format!("U\0{}\0{}", table.relid.to_u32(), cols.join("\0"));
    let plan = cache.plan(
        &cache_key,
        table.relid,
        || {
            let mut t: Vec<pg_sys::Oid> = cols.iter().map(|c| table.attrs[*c].typid).collect();
            t.extend(table.key.iter().map(|k| table.attrs[k].typid));
            t
        },
        || {
            // The key is unchanged here; identity GENERATED ALWAYS columns (key columns, see
            // tables.rs) cannot be named in an UPDATE.
            let mut sets: Vec<String> = cols
                .iter()
                .enumerate()
                .filter(|(_, c)| !table.attrs[**c].always_identity)
                .map(|(i, c)| format!("{} = ${}", quote_ident(c), i + 1))
                .collect();
            sets.extend(missing_defaults(table, &cols));
            if sets.is_empty() {
                sets.extend(touch(table));
            }
            format!(
                "UPDATE {0} AS tgt SET {1} WHERE {2} AND {3}",
                table.qualified,
                sets.join(", "),
                key_condition(table, cols.len() + 1),
                wins_condition(table, cols.len() + 1)
            )
        },
    )?;
    let mut values = Vec::new();
    let mut nulls = Vec::new();
    for (i, c) in cols.iter().enumerate() {
        let (d, n) = table.attrs[*c].datum(change.vals.as_ref().and_then(|v| v.get(i)).and_then(|v| v.as_deref()));
        values.push(d);
        nulls.push(n);
    }
    key_datums(table, old_keys, &mut values, &mut nulls);
    for _ in 0..MEETING_ATTEMPTS {
        let decided = crate::conflicts::decisions();
        let (updated, _) =
            with_incoming(ctx.clone(), || owner::as_table_owner(table.relid, || run_plan(plan, &mut values, &nulls)))?;
        if updated > 0 {
            return Ok(Met::Written);
        }
        if !row_exists(cache, table, old_keys)? {
            break;
        }
        if crate::conflicts::decisions() != decided {
            // The local row is newer: it stays (the condition recorded the conflict).
            return Ok(Met::LocalWon);
        }
        // A row the statement did not see (committed after it started): decide against it.
    }
    Ok(Met::Missing)
}

/// Deletes one row.
pub fn delete(cache: &mut ApplyCache, v: TxnVersion, change: &Change) -> Result<(), ApplyError> {
    let nkey = nkey_of(change)?;
    let table = cache.table(&change.nsp, &change.rel)?;
    check_columns(&table, change, nkey)?;
    let keys = key_values(&table, change, true);
    delete_key(cache, &table, v, change, &keys)
}

/// Deletes the row with `keys` if the incoming version wins, and keeps a tombstone.
fn delete_key(
    cache: &mut ApplyCache,
    table: &Table,
    v: TxnVersion,
    change: &Change,
    keys: &[Option<&str>],
) -> Result<(), ApplyError> {
    let mut ctx = incoming(table, v, change, ConflictKind::DeleteUpdate, keys);
    ctx.row = None;
    // Announced before the row is looked for: a local transaction inserting this key that is
    // not yet visible to the lookup either sees the announcement at commit (and commits after
    // this version, see capture::local_writes::pre_commit) or has committed before the lookup.
    crate::marker_writes::note_tombstones_written();
    match super::keyed::delete_row(table, &ctx, keys)? {
        Some(Met::LocalWon) => return Ok(()),
        Some(Met::Written | Met::Missing) => return with_incoming(ctx, || write_tombstone(table, keys)),
        None => {}
    }
    for _ in 0..MEETING_ATTEMPTS {
        let decided = crate::conflicts::decisions();
        let (deleted, _) = with_incoming(ctx.clone(), || {
            run_by_key(cache, table, "D", keys, || {
                format!(
                    "DELETE FROM {0} AS tgt WHERE {1} AND {2}",
                    table.qualified,
                    key_condition(table, 1),
                    wins_condition(table, 1)
                )
            })
        })?;
        if deleted > 0 || !row_exists(cache, table, keys)? {
            break;
        }
        if crate::conflicts::decisions() != decided {
            // The local row is newer: it stays (the condition recorded the conflict).
            return Ok(());
        }
        // A row the statement did not see (committed after it started, e.g. deleted and
        // inserted again by a local transaction it waited for): decide against that one.
    }
    with_incoming(ctx, || write_tombstone(table, keys))
}

/// The end of the run of inserts starting at `start`: same table, same columns, distinct
/// keys (one statement cannot touch a row twice).
pub fn insert_run_end(cache: &mut ApplyCache, txn: &[Change], start: usize) -> Result<usize, ApplyError> {
    let first = &txn[start];
    let same = |c: &Change| c.op == Op::Insert && c.nsp == first.nsp && c.rel == first.rel && c.cols == first.cols;
    // A run of one (every small transaction's) has no keys to compare.
    if !txn.get(start + 1).is_some_and(same) {
        return Ok(start + 1);
    }
    let table = cache.table(&first.nsp, &first.rel)?;
    let mut keys = std::collections::HashSet::new();
    keys.insert(key_values(&table, first, false).into_iter().map(|k| k.map(str::to_string)).collect::<Vec<_>>());
    let mut end = start + 1;
    while end < txn.len() {
        let c = &txn[end];
        if !same(c) || !keys.insert(key_values(&table, c, false).into_iter().map(|k| k.map(str::to_string)).collect()) {
            break;
        }
        end += 1;
    }
    Ok(end)
}
