//! Catalog lookups shared by capture, apply and the administration functions: a table's
//! primary key, whether a table is replicated, and probes of trompe's own tables by primary
//! key under the latest snapshot.

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

extern "C-unwind" {
    /// catalog/pg_inherits.h: the relation and every relation that inherits from it (or is
    /// its partition), locked with `lockmode`, as a list of oids.
    fn find_all_inheritors(
        parent: pg_sys::Oid,
        lockmode: pg_sys::LOCKMODE,
        numparents: *mut *mut pg_sys::List,
    ) -> *mut pg_sys::List;
}

/// Table `relid` and every table that inherits from it or is its partition (at any depth),
/// each locked with `lockmode` (`NoLock`: none).
pub fn with_inheritors(relid: pg_sys::Oid, lockmode: pg_sys::LOCKMODE) -> Vec<pg_sys::Oid> {
    // SAFETY: find_all_inheritors returns a list of oids (at least `relid`) in the current
    // memory context; an error it raises (a lock wait cancelled) crosses into Rust guarded.
    unsafe {
        let list = pg_sys::ffi::pg_guard_ffi_boundary(|| find_all_inheritors(relid, lockmode, std::ptr::null_mut()));
        (0..(*list).length as usize).map(|i| (*(*list).elements.add(i)).oid_value).collect()
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
    // SAFETY: one scan key on the index's only column (relid); nothing is read from the row.
    unsafe { first_by_primary_key(c"tables", |_| vec![oid_key(1, relid)], |row| row.is_some()) }.unwrap_or(false)
}

/// A scan key comparing column `attno` (1-based) with the oid `value`.
pub fn oid_key(attno: pg_sys::AttrNumber, value: pg_sys::Oid) -> pg_sys::ScanKeyData {
    // SAFETY: ScanKeyData is plain data, initialised by ScanKeyInit with the oid equality
    // function and a by-value datum.
    unsafe {
        let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
        pg_sys::ScanKeyInit(
            &mut key,
            attno,
            pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
            pg_sys::F_OIDEQ.into(),
            pg_sys::Datum::from(value),
        );
        key
    }
}

/// Looks trompe's table `table` up through its primary key index with the scan keys
/// `make_keys` builds (on the table's column numbers, which the scan maps to the index's; given
/// the open index, for its collations), under the latest snapshot
/// (what is committed now, whatever the transaction's snapshot), and hands the first row found,
/// if any, to `read` with the table's descriptor. `None` if the table or its index is missing.
///
/// # Safety
/// Inside a transaction; the scan keys must match the index's columns and operators.
pub unsafe fn first_by_primary_key<T>(
    table: &std::ffi::CStr,
    make_keys: impl FnOnce(pg_sys::Relation) -> Vec<pg_sys::ScanKeyData>,
    read: impl FnOnce(Option<(pg_sys::HeapTuple, pg_sys::TupleDesc)>) -> T,
) -> Option<T> {
    // SAFETY: the table and its primary key index are opened with AccessShareLock and closed at
    // the end; the snapshot is registered for the scan and unregistered after it; the tuple
    // handed to `read` is valid until the scan ends, which is after `read` returns.
    unsafe {
        let nsp = pg_sys::get_namespace_oid(c"trompe".as_ptr(), true);
        let table = pg_sys::get_relname_relid(table.as_ptr(), nsp);
        if table == pg_sys::InvalidOid {
            return None;
        }
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let rel = pg_sys::table_open(table, lock);
        let index = crate::pg_compat::primary_key_index(rel);
        if index == pg_sys::InvalidOid {
            pg_sys::table_close(rel, lock);
            return None;
        }
        let index_rel = pg_sys::index_open(index, lock);
        let mut keys = make_keys(index_rel);
        pg_sys::index_close(index_rel, lock);
        let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot());
        let scan = pg_sys::systable_beginscan(rel, index, true, snapshot, keys.len() as i32, keys.as_mut_ptr());
        let tuple = pg_sys::systable_getnext(scan);
        let found = read((!tuple.is_null()).then(|| (tuple, (*rel).rd_att)));
        pg_sys::systable_endscan(scan);
        pg_sys::UnregisterSnapshot(snapshot);
        pg_sys::table_close(rel, lock);
        Some(found)
    }
}
