//! Collisions on a table's unique constraints other than the primary key, resolved by the
//! table's conflict rule before a row is written (the careful path).

use pgrx::pg_sys;
use trompe_core::changeset::OldVersion;
use trompe_core::conflict::{ConflictKind, LocalVersion};
use trompe_core::ident::quote_ident;

use super::by_key::{
    delete_by_key, incoming, key_condition, key_json, log_removal, row_json, row_version, run_by_key, value_of,
    write_tombstone, TxnVersion,
};
use crate::conflicts::{record, with_incoming, Incoming, Recorded};
use crate::worker::apply::change::Change;
use crate::worker::apply::error::ApplyError;
use crate::worker::apply::table::{ApplyCache, Table};

/// Before writing a row: resolves collisions on the table's other unique constraints. Local
/// rows holding the same values lose to a newer incoming row (they are deleted); if one of
/// them is newer, the incoming change loses (returns false) and is not applied.
pub(super) fn resolve_unique(
    cache: &mut ApplyCache,
    table: &Table,
    v: TxnVersion,
    change: &Change,
    keys: &[Option<&str>],
) -> Result<bool, ApplyError> {
    for unique in &table.uniques {
        let values: Vec<Option<&str>> = unique.iter().map(|c| value_of(change, c, false)).collect();
        if values.iter().any(Option::is_none) || unique.iter().any(|c| !change.cols.contains(c)) {
            continue;
        }
        let mut sql = format!(
            "SELECT tgt.xmin, row_to_json(tgt)::text, ARRAY[{}]::text[] FROM {} AS tgt WHERE ",
            table.key.iter().map(|k| format!("tgt.{}::text", quote_ident(k))).collect::<Vec<_>>().join(", "),
            table.qualified
        );
        let mut params: Vec<Option<&str>> = Vec::new();
        let mut conds = Vec::new();
        for (c, val) in unique.iter().zip(&values) {
            params.push(*val);
            conds.push(format!("tgt.{} = ${}::{}", quote_ident(c), params.len(), type_name(table.attrs[c].typid)));
        }
        let key_list: Vec<String> = table.key.iter().map(|k| format!("tgt.{}", quote_ident(k))).collect();
        let key_params: Vec<String> = table
            .key
            .iter()
            .zip(keys)
            .map(|(k, val)| {
                params.push(*val);
                format!("${}::{}", params.len(), type_name(table.attrs[k].typid))
            })
            .collect();
        sql += &conds.join(" AND ");
        sql += &format!(" AND ({}) IS DISTINCT FROM ({}) FOR UPDATE", key_list.join(", "), key_params.join(", "));
        // Key texts in the canonical format, as a logged delete must carry them.
        let rows = {
            let _canonical = crate::session::CanonicalOutput::enter();
            crate::sql::rows(&sql, &params).map_err(ApplyError::Postgres)?
        };
        let mut losers = Vec::new();
        for r in &rows {
            let xmin = r[0].as_deref().and_then(|x| x.parse::<u32>().ok()).unwrap_or(0);
            let their_key = r[2].as_deref().map(trompe_core::pgarray::parse_text_array).transpose();
            let their_key = their_key.map_err(|e| ApplyError::Postgres(e.to_string()))?.unwrap_or_default();
            let their_refs: Vec<Option<&str>> = their_key.iter().map(|k| k.as_deref()).collect();
            let local = row_version(table, xmin, &their_refs);
            let conflict = Recorded {
                table: table.readable.clone(),
                key: Some(key_json(table, keys)),
                kind: ConflictKind::UniqueViolation,
                remote_won: table.ranking.wins(v.0, local),
                local,
                local_row: r[1].clone(),
                remote: v.0,
                remote_row: row_json(change),
            };
            if !conflict.remote_won {
                record(conflict);
                retire_incoming(cache, table, v, change, keys)?;
                return Ok(false);
            }
            record(conflict);
            losers.push((r[2].clone().unwrap_or_default(), local));
        }
        for (loser, loser_version) in losers {
            let loser_keys =
                trompe_core::pgarray::parse_text_array(&loser).map_err(|e| ApplyError::Postgres(e.to_string()))?;
            let loser_refs: Vec<Option<&str>> = loser_keys.iter().map(|k| k.as_deref()).collect();
            delete_by_key(cache, table, &loser_refs)?;
            let ctx = Incoming {
                table: table.readable.clone(),
                version: v.0,
                replaced: LocalVersion::Unknown,
                kind: ConflictKind::UniqueViolation,
                key: None,
                row: None,
                ranking: table.ranking.clone(),
                rows: None,
            };
            with_incoming(ctx, || write_tombstone(table, &loser_refs))?;
            // Logged after the apply, like a retired incoming row (see retire.rs): inside the
            // apply transaction the delete would carry the incoming row's commit time with this
            // node's id, which need not rank above the loser's version under every rule.
            if crate::worker::apply::retire_queue::queue(table, &loser_refs)? {
                continue;
            }
            let old = match loser_version {
                LocalVersion::Known(v) => OldVersion::Committed { ts: v.ts, node: v.node },
                _ => OldVersion::Unknown,
            };
            log_removal(change, table, &loser_refs, old)?;
        }
    }
    Ok(true)
}

/// An incoming row version lost a unique collision against a newer local row: it counts as
/// written and at once removed. The local row with its key (an older version) goes, the key
/// gets a tombstone, and the removal is queued, to be logged after the apply (see
/// [`crate::worker::apply::retire`]) so that nodes which applied the version without meeting
/// the collision (the winner had moved on there) remove it too. Nothing happens if the local
/// row with this key is newer than the incoming version anyway.
fn retire_incoming(
    cache: &mut ApplyCache,
    table: &Table,
    v: TxnVersion,
    change: &Change,
    keys: &[Option<&str>],
) -> Result<(), ApplyError> {
    let (found, first) = run_by_key(cache, table, "XV", keys, || {
        format!("SELECT tgt.xmin FROM {} AS tgt WHERE {} FOR UPDATE", table.qualified, key_condition(table, 1))
    })?;
    if found > 0 {
        let xmin = first.first().cloned().flatten().and_then(|x| x.parse::<u32>().ok()).unwrap_or(0);
        if !table.ranking.wins(v.0, row_version(table, xmin, keys)) {
            return Ok(());
        }
        delete_by_key(cache, table, keys)?;
    }
    with_incoming(incoming(table, v, change, ConflictKind::UniqueViolation, keys), || write_tombstone(table, keys))?;
    if crate::worker::apply::retire_queue::queue(table, keys)? {
        return Ok(());
    }
    // A schema older than 0.4.0: logged here, with the row's own version (see retire.rs).
    let old = OldVersion::Committed { ts: v.0.ts, node: v.0.node };
    log_removal(change, table, keys, old)
}

/// The SQL name of a type (for casts in dynamic SQL).
fn type_name(typid: pg_sys::Oid) -> String {
    // SAFETY: format_type_be returns a palloc'd, properly quoted type name.
    unsafe { std::ffi::CStr::from_ptr(pg_sys::format_type_be(typid)).to_string_lossy().into_owned() }
}
