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

/// Whether table `relid` is listed in `trompe.tables` as of now: read with a fresh snapshot, not
/// the transaction's (a repeatable read transaction that started before `add_table` committed
/// still sees the table's triggers fire, and must capture). One probe of the primary key index.
pub fn listed_now(relid: pg_sys::Oid) -> bool {
    // SAFETY: trompe.tables and its primary key index (relid) are opened with AccessShareLock
    // and closed at the end; the scan key compares oids; the snapshot is registered for the scan
    // and unregistered after it.
    unsafe {
        let nsp = pg_sys::get_namespace_oid(c"trompe".as_ptr(), true);
        let table = pg_sys::get_relname_relid(c"tables".as_ptr(), nsp);
        if table == pg_sys::InvalidOid {
            return false;
        }
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let rel = pg_sys::table_open(table, lock);
        let index = crate::pg_compat::primary_key_index(rel);
        let mut found = false;
        if index != pg_sys::InvalidOid {
            let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
            pg_sys::ScanKeyInit(
                &mut key,
                1,
                pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
                pg_sys::F_OIDEQ.into(),
                pg_sys::Datum::from(relid),
            );
            let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot());
            let scan = pg_sys::systable_beginscan(rel, index, true, snapshot, 1, &mut key);
            found = !pg_sys::systable_getnext(scan).is_null();
            pg_sys::systable_endscan(scan);
            pg_sys::UnregisterSnapshot(snapshot);
        }
        pg_sys::table_close(rel, lock);
        found
    }
}
