//! Appends entries to the change log: a direct heap insert plus its index entry, like a
//! catalog insert, without SQL (no parse, plan or executor start per change) and without any
//! privilege check, so users who write to replicated tables need no right on the log.

use std::cell::RefCell;

use pgrx::pg_sys;

use crate::error::TrompeError;
use crate::log::LOG_SLOTS;

/// Where entries of one log table go: resolved on first use and kept until PostgreSQL
/// invalidates the table, its index or the id sequence (they belong to the extension and are
/// dropped and recreated with it).
#[derive(Clone, Copy)]
struct Target {
    table: pg_sys::Oid,
    sequence: pg_sys::Oid,
    /// The log table's (txid, id) index and its IndexInfo (in `context`).
    index: pg_sys::Oid,
    index_info: *mut pg_sys::IndexInfo,
    /// Memory owned by this entry, deleted once the entry is dropped as stale.
    context: pg_sys::MemoryContext,
}

#[derive(Default)]
struct Targets {
    slots: [Option<Target>; LOG_SLOTS],
    /// An invalidation concerned a cached entry: rebuild on next use. Entries are not freed in
    /// the invalidation callback itself, which can run while an entry is in use (any lock
    /// acquisition accepts invalidations).
    stale: bool,
    /// An entry is being built: any invalidation meanwhile makes it stale too.
    building: bool,
    callback_registered: bool,
}

thread_local! {
    /// This transaction wrote to the change log: wake pullers when it commits.
    static WROTE_LOG: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static TARGETS: RefCell<Targets> = RefCell::new(Targets::default());
}

extern "C-unwind" {
    /// nextval() without the SQL call or the permission check.
    fn nextval_internal(relid: pg_sys::Oid, check_permissions: bool) -> i64;
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn invalidate(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    TARGETS.with(|t| {
        let mut t = t.borrow_mut();
        let concerned = relid == pg_sys::InvalidOid
            || t.building
            || t.slots.iter().flatten().any(|e| e.table == relid || e.index == relid || e.sequence == relid);
        if concerned {
            t.stale = true;
        }
    });
}

/// Drops every cached entry if an invalidation concerned one of them (called before use).
fn drop_stale_targets() {
    TARGETS.with(|t| {
        let mut t = t.borrow_mut();
        if !t.stale {
            return;
        }
        for entry in t.slots.iter_mut().filter_map(Option::take) {
            // SAFETY: the context was created for this entry by `target` and is referenced by
            // nothing else now that the entry is gone.
            unsafe { pg_sys::MemoryContextDelete(entry.context) };
        }
        t.stale = false;
    });
}

fn lookup(name: &str) -> Result<pg_sys::Oid, TrompeError> {
    let name_c = std::ffi::CString::new(name).map_err(|e| TrompeError::Internal(e.to_string()))?;
    // SAFETY: catalog lookups by name inside a transaction.
    let oid = unsafe {
        let nsp = pg_sys::get_namespace_oid(c"trompe".as_ptr(), true);
        if nsp == pg_sys::InvalidOid {
            pg_sys::InvalidOid
        } else {
            pg_sys::get_relname_relid(name_c.as_ptr(), nsp)
        }
    };
    if oid == pg_sys::InvalidOid {
        return Err(TrompeError::Internal(format!("trompe.{name} does not exist")));
    }
    Ok(oid)
}

fn target(slot: usize) -> Result<Target, TrompeError> {
    drop_stale_targets();
    if let Some(t) = TARGETS.with(|t| t.borrow().slots[slot]) {
        return Ok(t);
    }
    if !TARGETS.with(|t| t.borrow().callback_registered) {
        // SAFETY: registering a relcache callback once per backend, with a valid function.
        unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(invalidate), pg_sys::Datum::from(0)) };
        TARGETS.with(|t| t.borrow_mut().callback_registered = true);
    }
    struct Building;
    impl Drop for Building {
        fn drop(&mut self) {
            TARGETS.with(|t| t.borrow_mut().building = false);
        }
    }
    TARGETS.with(|t| t.borrow_mut().building = true);
    let building = Building;
    let t = build_target(slot)?;
    drop(building);
    TARGETS.with(|cell| cell.borrow_mut().slots[slot] = Some(t));
    Ok(t)
}

fn build_target(slot: usize) -> Result<Target, TrompeError> {
    let index = lookup(&format!("log_{slot}_txid"))?;
    let table = lookup(&format!("log_{slot}"))?;
    let sequence = lookup("log_id_seq")?;
    // SAFETY: the index is opened and closed (lock kept to the end of the transaction); the
    // IndexInfo is built in a context of its own under CacheMemoryContext, deleted when the
    // entry is dropped.
    let (index_info, context) = unsafe {
        let rel = pg_sys::index_open(index, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        let form = (*rel).rd_index;
        let keys = (*form).indkey.values.as_slice((*form).indnatts as usize);
        let expected = (*form).indnatts == 2 && keys == [2, 1];
        if !expected {
            pg_sys::index_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
            return Err(TrompeError::Internal(format!("index trompe.log_{slot}_txid is not on (txid, id)")));
        }
        let context = pg_sys::AllocSetContextCreateInternal(
            pg_sys::CacheMemoryContext,
            c"trompe log target".as_ptr(),
            pg_sys::ALLOCSET_SMALL_MINSIZE as usize,
            pg_sys::ALLOCSET_SMALL_INITSIZE as usize,
            pg_sys::ALLOCSET_SMALL_MAXSIZE as usize,
        );
        let old = pg_sys::MemoryContextSwitchTo(context);
        let info = pg_sys::BuildIndexInfo(rel);
        pg_sys::MemoryContextSwitchTo(old);
        pg_sys::index_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        (info, context)
    };
    // SAFETY: the table is opened to read its index list (relcache) and closed, lock kept.
    let index_count = unsafe {
        let rel = pg_sys::table_open(table, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        let list = pg_sys::RelationGetIndexList(rel);
        let n = if list.is_null() { 0 } else { (*list).length };
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        n
    };
    if index_count != 1 {
        // SAFETY: the context was just created and nothing refers to it.
        unsafe { pg_sys::MemoryContextDelete(context) };
        return Err(TrompeError::Internal(format!("trompe.log_{slot} must have exactly one index")));
    }
    Ok(Target { table, sequence, index, index_info, context })
}

/// Whether this transaction wrote to the change log.
pub fn wrote_log() -> bool {
    WROTE_LOG.get()
}

/// Forgets that this transaction wrote to the change log (it ended).
pub fn forget_log_write() {
    WROTE_LOG.set(false);
}

/// Appends one chunk of `count` encoded changes to the log table `slot` in the current
/// (sub)transaction.
pub fn append_chunk(slot: usize, count: u64, changes: &[u8]) -> Result<(), TrompeError> {
    if slot >= LOG_SLOTS {
        return Err(TrompeError::Internal(format!("no log table {slot}")));
    }
    let t = target(slot)?;
    let header = trompe_core::changeset::chunk_header(count);
    let len = header.len() + changes.len();
    // SAFETY: the log table and its index are opened with RowExclusiveLock (kept to commit, as
    // an INSERT would); the tuple matches the table's descriptor (id, txid, nchanges, changes)
    // and the index entry the index's columns (txid, id), checked when the target was resolved.
    // The bytea, the tuple and what inserting it allocates (its toasted copy) live in a context
    // of their own, deleted once the row is in: a chunk written just before a subtransaction
    // commits would otherwise stay in that subtransaction's memory until the whole transaction
    // ends (4 MB and more per chunk, for each of thousands of savepoints). An error leaves the
    // context to its parent, freed with it.
    unsafe {
        let context = pg_sys::AllocSetContextCreateInternal(
            pg_sys::CurrentMemoryContext,
            c"trompe log chunk".as_ptr(),
            pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        );
        let old = pg_sys::MemoryContextSwitchTo(context);
        let done = insert_chunk(&t, count, &header, changes, len);
        pg_sys::MemoryContextSwitchTo(old);
        pg_sys::MemoryContextDelete(context);
        done?;
    }
    WROTE_LOG.set(true);
    Ok(())
}

/// Inserts one log row (see `append_chunk`) in the current memory context.
///
/// # Safety
/// Called inside a transaction, with `t` resolved for the log table in use.
unsafe fn insert_chunk(t: &Target, count: u64, header: &[u8], changes: &[u8], len: usize) -> Result<(), TrompeError> {
    // SAFETY: see `append_chunk`; everything allocated here is in the caller's context.
    unsafe {
        let id = pg_sys::ffi::pg_guard_ffi_boundary(|| nextval_internal(t.sequence, false));
        let txid = pg_sys::GetTopFullTransactionId().value;
        let varlena = pg_sys::palloc(len + pg_sys::VARHDRSZ) as *mut pg_sys::varlena;
        pgrx::set_varsize_4b(varlena, (len + pg_sys::VARHDRSZ) as i32);
        let data = pgrx::vardata_any(varlena) as *mut u8;
        std::ptr::copy_nonoverlapping(header.as_ptr(), data, header.len());
        std::ptr::copy_nonoverlapping(changes.as_ptr(), data.add(header.len()), changes.len());
        let mut values = [
            pg_sys::Datum::from(id),
            pg_sys::Datum::from(txid as i64),
            pg_sys::Datum::from(count.min(i32::MAX as u64) as i32),
            pg_sys::Datum::from(varlena),
        ];
        let mut nulls = [false; 4];
        let lock = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
        let rel = pg_sys::table_open(t.table, lock);
        let desc = (*rel).rd_att;
        if (*desc).natts as usize != values.len() {
            pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
            return Err(TrompeError::Internal("trompe.log does not have the expected columns".into()));
        }
        let tuple = pg_sys::heap_form_tuple(desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::simple_heap_insert(rel, tuple);
        // The one index of a log table is on (txid, id).
        let index = pg_sys::index_open(t.index, lock);
        let mut ivalues = [values[1], values[0]];
        let mut inulls = [false, false];
        pg_sys::index_insert(
            index,
            ivalues.as_mut_ptr(),
            inulls.as_mut_ptr(),
            &mut (*tuple).t_self,
            rel,
            pg_sys::IndexUniqueCheck::UNIQUE_CHECK_NO,
            false,
            t.index_info,
        );
        pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
        // Locks are kept until the transaction ends, as for any insert.
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
    Ok(())
}
