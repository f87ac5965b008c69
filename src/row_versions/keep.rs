//! Keeping row versions in `trompe.row_versions`: for the rows of a table a condition selects,
//! each row's version as it reads now, under the transaction id it should be found by.

use pgrx::prelude::*;

use crate::run_as::as_extension_owner;

/// The SQL expressions of table `relid`'s primary key values as canonical text (output
/// functions, as capture prints them), for rows aliased `t`.
fn key_expressions(relid: pg_sys::Oid) -> Result<(String, String), String> {
    // SAFETY: opens the relation to read its primary key and name; closed before returning.
    let (cols, table) = unsafe {
        let rel = pg_sys::try_relation_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        if rel.is_null() {
            return Err(format!("relation {} does not exist", relid.to_u32()));
        }
        let key = crate::catalog::primary_key_columns(rel).unwrap_or_default();
        let tupdesc = (*rel).rd_att;
        let cols: Vec<String> = key
            .iter()
            .map(|&i| {
                let att = &*crate::pg_compat::tuple_desc_attr(tupdesc, i);
                std::ffi::CStr::from_ptr(att.attname.data.as_ptr()).to_string_lossy().into_owned()
            })
            .collect();
        let nsp = pg_sys::get_namespace_name((*(*rel).rd_rel).relnamespace);
        let name = std::ffi::CStr::from_ptr((*(*rel).rd_rel).relname.data.as_ptr()).to_string_lossy();
        let nsp =
            if nsp.is_null() { String::new() } else { std::ffi::CStr::from_ptr(nsp).to_string_lossy().into_owned() };
        let table = trompe_core::ident::quote_qualified(&nsp, &name);
        pg_sys::relation_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        (cols, table)
    };
    if cols.is_empty() {
        return Err(format!("table {table} has no primary key"));
    }
    let parts: Vec<String> =
        cols.iter().map(|c| format!("pg_catalog.format('%s', t.{})", trompe_core::ident::quote_ident(c))).collect();
    Ok((format!("ARRAY[{}]::text[]", parts.join(", ")), table))
}

/// Keeps the versions of the rows of replicated table `relid` that `condition` (over rows
/// aliased `t`) selects, under the transaction id `xmin_expr` gives for each, unless that
/// version is kept already. With `recent_only`, only versions younger than the tombstone
/// retention are kept (an older or unknown one reads as unknown without). Returns how many
/// were kept.
pub(super) fn keep(relid: pg_sys::Oid, xmin_expr: &str, condition: &str, recent_only: bool) -> Result<u64, String> {
    let (key, table) = key_expressions(relid)?;
    let _canonical = crate::session::CanonicalOutput::enter();
    let kept = as_extension_owner(|| {
        crate::sql::execute(
            &format!(
                "INSERT INTO trompe.row_versions (relid, key, row_xmin, committed_us, node_id)
                 SELECT $1::oid, k.key, {xmin_expr}, v.committed_us, v.node_id
                   FROM {table} t
                  CROSS JOIN LATERAL (SELECT {key} AS key) k
                  CROSS JOIN LATERAL trompe._row_version($1::oid, t.xmin, k.key) v
                  WHERE ({condition})
                    AND (NOT $3::bool OR v.committed_us > $2::bigint)
                 ON CONFLICT (relid, key_hash, key) DO UPDATE
                    SET row_xmin = EXCLUDED.row_xmin, committed_us = EXCLUDED.committed_us, node_id = EXCLUDED.node_id
                  WHERE (row_versions.row_xmin, row_versions.committed_us, row_versions.node_id)
                        IS DISTINCT FROM (EXCLUDED.row_xmin, EXCLUDED.committed_us, EXCLUDED.node_id)"
            ),
            &[
                Some(&relid.to_u32().to_string()),
                Some(&retention_horizon().to_string()),
                Some(&recent_only.to_string()),
            ],
        )
    })?;
    if kept > 0 {
        reread_table_facts(relid);
    }
    Ok(kept)
}

/// Makes every session read again whether table `relid` has kept versions (they skip looking
/// up rows of a table that had none): invalidates its relcache entry, which capture's and the
/// applier's facts about the table follow, when this transaction commits (and, in it, at its
/// next command).
pub(super) fn reread_table_facts(relid: pg_sys::Oid) {
    // SAFETY: registers an invalidation message inside the current transaction.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(relid) };
}

/// The commit time (PostgreSQL TimestampTz) before which versions are older than the tombstone
/// retention.
pub(super) fn retention_horizon() -> i64 {
    // SAFETY: reads the clock as PostgreSQL timestamps it.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    now - i64::from(crate::guc::TOMBSTONE_RETENTION_S.get()) * 1_000_000
}
