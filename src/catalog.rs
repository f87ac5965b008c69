//! Catalog lookups shared by capture, apply and the administration functions: a table's
//! primary key, whether a table is replicated.

use pgrx::pg_sys;

/// The primary key columns of an open relation as 0-based tuple descriptor positions, in key
/// order; `None` if it has no primary key.
///
/// # Safety
/// `rel` must be an open relation.
pub unsafe fn primary_key_columns(rel: pg_sys::Relation) -> Option<Vec<usize>> {
    // SAFETY: rel is open; the primary key index is opened and closed here with a lock that the
    // caller's lock on the table already implies.
    unsafe {
        let pk = crate::pg_compat::primary_key_index(rel);
        if pk == pg_sys::InvalidOid {
            return None;
        }
        let index = pg_sys::index_open(pk, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let form = (*index).rd_index;
        let nkeys = (*form).indnkeyatts as usize;
        let attnums = (*form).indkey.values.as_slice(nkeys);
        let cols = attnums.iter().map(|&a| (a as usize).saturating_sub(1)).collect();
        pg_sys::index_close(index, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        Some(cols)
    }
}

/// Whether table `relid` is replicated (listed in `trompe.tables`).
pub fn is_replicated(relid: pg_sys::Oid) -> Result<bool, String> {
    crate::run_as::as_extension_owner(|| {
        crate::sql::flag(
            "SELECT EXISTS (SELECT 1 FROM trompe.tables WHERE relid = $1::oid)",
            &[Some(&relid.to_u32().to_string())],
        )
    })
}
