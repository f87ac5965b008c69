//! Appends entries to the change log: a direct heap insert plus its index entry, like a
//! catalog insert, without SQL (no parse, plan or executor start per change) and without any
//! privilege check, so users who write to replicated tables need no right on the log.

use std::cell::RefCell;

use pgrx::pg_sys;

use crate::error::TrompeError;
use crate::log::LOG_SLOTS;

/// Where this transaction's entries go: resolved once per transaction (the objects belong to
/// the extension and could be dropped and recreated between transactions).
#[derive(Clone, Copy)]
struct Target {
    slot: usize,
    table: pg_sys::Oid,
    sequence: pg_sys::Oid,
    /// The log table's (txid, id) index and its IndexInfo (in TopTransactionContext).
    index: pg_sys::Oid,
    index_info: *mut pg_sys::IndexInfo,
}

thread_local! {
    static TARGET: RefCell<Option<Target>> = const { RefCell::new(None) };
}

extern "C-unwind" {
    /// nextval() without the SQL call or the permission check.
    fn nextval_internal(relid: pg_sys::Oid, check_permissions: bool) -> i64;
}

/// Forgets the cached target (at the end of every transaction).
pub fn reset_target() {
    TARGET.with(|t| *t.borrow_mut() = None);
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
    if let Some(t) = TARGET.with(|t| *t.borrow()).filter(|t| t.slot == slot) {
        return Ok(t);
    }
    let index = lookup(&format!("log_{slot}_txid"))?;
    // SAFETY: the index is opened and closed (lock kept to the end of the transaction); the
    // IndexInfo is built in TopTransactionContext, which lives exactly as long as the cache.
    let index_info = unsafe {
        let rel = pg_sys::index_open(index, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        let form = (*rel).rd_index;
        let keys = (*form).indkey.values.as_slice((*form).indnatts as usize);
        let expected = (*form).indnatts == 2 && keys == [2, 1];
        let old = pg_sys::MemoryContextSwitchTo(pg_sys::TopTransactionContext);
        let info = pg_sys::BuildIndexInfo(rel);
        pg_sys::MemoryContextSwitchTo(old);
        pg_sys::index_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        if !expected {
            return Err(TrompeError::Internal(format!("index trompe.log_{slot}_txid is not on (txid, id)")));
        }
        info
    };
    let table = lookup(&format!("log_{slot}"))?;
    // SAFETY: the table is opened to read its index list (relcache) and closed, lock kept.
    let index_count = unsafe {
        let rel = pg_sys::table_open(table, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        let list = pg_sys::RelationGetIndexList(rel);
        let n = if list.is_null() { 0 } else { (*list).length };
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        n
    };
    if index_count != 1 {
        return Err(TrompeError::Internal(format!("trompe.log_{slot} must have exactly one index")));
    }
    let t = Target { slot, table, sequence: lookup("log_id_seq")?, index, index_info };
    TARGET.with(|cell| *cell.borrow_mut() = Some(t));
    Ok(t)
}

/// Runs `f` as the bootstrap superuser (restored afterwards, also on error), like a SECURITY
/// DEFINER function would.
pub fn as_extension_owner<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(pg_sys::Oid, i32);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: restores the user id and security context saved below.
            unsafe { pg_sys::SetUserIdAndSecContext(self.0, self.1) };
        }
    }
    let mut user = pg_sys::InvalidOid;
    let mut context = 0;
    // SAFETY: saving and switching the current user id, as SECURITY DEFINER functions do.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID),
            context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
    }
    let _restore = Restore(user, context);
    f()
}

/// Appends one chunk of `count` encoded changes to the log table `slot` in the current
/// (sub)transaction.
pub fn append_chunk(slot: usize, count: u64, changes: &[u8]) -> Result<(), TrompeError> {
    if slot >= LOG_SLOTS {
        return Err(TrompeError::Internal(format!("no log table {slot}")));
    }
    let t = target(slot)?;
    let bytes = trompe_core::changeset::chunk(count, changes);
    // SAFETY: the log table and its index are opened with RowExclusiveLock (kept to commit, as
    // an INSERT would); the tuple matches the table's descriptor (id, txid, nchanges, changes)
    // and the index entry the index's columns (txid, id), checked when the target was resolved.
    // The bytea is built in the current memory context.
    unsafe {
        let id = pg_sys::ffi::pg_guard_ffi_boundary(|| nextval_internal(t.sequence, false));
        let txid = pg_sys::GetTopFullTransactionId().value;
        let varlena = pg_sys::palloc(bytes.len() + pg_sys::VARHDRSZ) as *mut pg_sys::varlena;
        pgrx::set_varsize_4b(varlena, (bytes.len() + pg_sys::VARHDRSZ) as i32);
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), pgrx::vardata_any(varlena) as *mut u8, bytes.len());
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
    crate::capture::note_log_write();
    Ok(())
}
