//! The commit times and origins of the transactions that wrote replicated rows, cached in shared
//! memory (`trompe.commit_time_cache` entries) in front of PostgreSQL's `pg_commit_ts`.
//!
//! Capture and apply look up the version of every row they replace. PostgreSQL 15 keeps only a
//! few pages of commit timestamps in memory: on a large table most of those lookups would read
//! `pg_commit_ts` from disk while holding the lock every commit takes. Transactions that
//! capture changes or apply a peer's record their commit here as they finish (the structure and
//! its guarantees are in `trompe_core::committime`); a lookup that misses asks PostgreSQL.

use pgrx::pg_sys;
use trompe_core::committime::{widen, CommitTimes, Entry};

static mut ENTRIES: *const Entry = std::ptr::null();
static mut LEN: usize = 0;

/// Shared memory the cache needs with the configured number of entries.
pub fn shmem_size() -> usize {
    entries_configured() * std::mem::size_of::<Entry>()
}

fn entries_configured() -> usize {
    crate::guc::COMMIT_TIME_CACHE.get().max(0) as usize
}

/// Attaches to (and on first use zeroes) the cache's shared memory; called from the shared
/// memory startup hook, holding AddinShmemInitLock.
///
/// # Safety
/// Must run in the shared memory startup hook, with AddinShmemInitLock held.
pub unsafe fn attach() {
    let len = entries_configured();
    if len == 0 {
        return;
    }
    let bytes = len * std::mem::size_of::<Entry>();
    let mut found = false;
    // SAFETY: the caller holds AddinShmemInitLock in the startup hook, and the space was
    // requested; a fresh segment is zeroed before anyone reads it.
    let ptr = pg_sys::ShmemInitStruct(c"trompe commit times".as_ptr(), bytes, &mut found) as *mut Entry;
    if !found {
        // All-zero entries are empty.
        std::ptr::write_bytes(ptr as *mut u8, 0, bytes);
    }
    ENTRIES = ptr;
    LEN = len;
}

fn cache() -> Option<CommitTimes<'static>> {
    // SAFETY: ENTRIES and LEN are set once by the startup hook (inherited by every backend) and
    // the memory lives as long as the server; entries are only accessed through atomics.
    unsafe { (!ENTRIES.is_null()).then(|| CommitTimes::new(std::slice::from_raw_parts(ENTRIES, LEN))) }
}

/// Records the commit of the current transaction and its committed subtransactions. Called at
/// XACT_EVENT_COMMIT: PostgreSQL has just recorded `replorigin_session_origin_timestamp` (set
/// to the commit's own time when no origin timestamp was given) and `replorigin_session_origin`
/// as the commit's timestamp data, for the top transaction and every committed child.
pub fn record_current_commit() {
    let Some(cache) = cache() else { return };
    // SAFETY: backend-local transaction state, still set while commit callbacks run; the
    // children array belongs to the top transaction state and is only read.
    unsafe {
        let top = pg_sys::GetTopFullTransactionIdIfAny();
        if top.value == 0 {
            return;
        }
        let time = pg_sys::replorigin_session_origin_timestamp;
        let origin = pg_sys::replorigin_session_origin;
        cache.record(top.value, time, origin);
        let mut children: *mut pg_sys::TransactionId = std::ptr::null_mut();
        let n = pg_sys::xactGetCommittedChildren(&mut children);
        if n > 0 && !children.is_null() {
            for &child in std::slice::from_raw_parts(children, n as usize) {
                cache.record(widen(child.into_inner(), top.value), time, origin);
            }
        }
    }
}

/// The cached commit time and origin of `xid`, if it is a normal transaction id found here.
pub fn lookup(xid: pg_sys::TransactionId) -> Option<(pg_sys::TimestampTz, pg_sys::RepOriginId)> {
    // Ids below the first normal one are invalid, bootstrap or frozen.
    if xid.into_inner() < pg_sys::TransactionId::FIRST_NORMAL.into_inner() {
        return None;
    }
    let cache = cache()?;
    // SAFETY: backend-local transaction state, or a shared read of the next transaction id.
    let reference = unsafe {
        let top = pg_sys::GetTopFullTransactionIdIfAny();
        if top.value != 0 {
            top.value
        } else {
            pg_sys::ReadNextFullTransactionId().value
        }
    };
    cache.lookup(widen(xid.into_inner(), reference))
}
