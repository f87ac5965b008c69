//! Which version of a row a change replaces: the commit time and node of the transaction that
//! wrote the old row, as recorded by PostgreSQL's commit timestamps and replication origins
//! (for rows applied from a peer, trompe commits with the peer's origin and commit time).

use std::cell::RefCell;
use std::collections::HashMap;

use pgrx::pg_sys;
use trompe_core::changeset::OldVersion;
use trompe_core::nodeid::NodeId;

thread_local! {
    /// This node's id, with the oid of the `trompe.node` table it was read from (a new table
    /// means the extension was created again, with a new id), and whether that is still known
    /// to hold (until PostgreSQL invalidates that table).
    static LOCAL: RefCell<Option<(pg_sys::Oid, NodeId)>> = const { RefCell::new(None) };
    static CHECKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static CALLBACK_REGISTERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Replication origins mapped to the peers they stand for.
    static ORIGINS: RefCell<HashMap<pg_sys::RepOriginId, Option<NodeId>>> = RefCell::new(HashMap::new());
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn invalidate(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let cached = LOCAL.with(|l| l.borrow().map(|(oid, _)| oid));
    if relid == pg_sys::InvalidOid || cached.is_none_or(|oid| oid == relid) {
        CHECKED.set(false);
    }
}

/// This node's id (read once per backend, looked up again when PostgreSQL invalidates the
/// `trompe.node` table, read again if the extension was created again).
pub fn local_node() -> Option<NodeId> {
    if CHECKED.get() {
        if let Some((_, id)) = LOCAL.with(|l| *l.borrow()) {
            return Some(id);
        }
    }
    if !CALLBACK_REGISTERED.get() {
        // SAFETY: registering a relcache callback once per backend, with a valid function.
        unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(invalidate), pg_sys::Datum::from(0)) };
        CALLBACK_REGISTERED.set(true);
    }
    // SAFETY: syscache lookups inside a transaction.
    let ext = unsafe {
        let nsp = pg_sys::get_namespace_oid(c"trompe".as_ptr(), true);
        if nsp == pg_sys::InvalidOid {
            return None;
        }
        pg_sys::get_relname_relid(c"node".as_ptr(), nsp)
    };
    if ext == pg_sys::InvalidOid {
        return None;
    }
    if let Some((oid, id)) = LOCAL.with(|l| *l.borrow()) {
        if oid == ext {
            CHECKED.set(true);
            return Some(id);
        }
    }
    let text = crate::log::writer::as_extension_owner(|| crate::sql::value("SELECT node_id FROM trompe.node", &[]))
        .ok()
        .flatten()?;
    let id = text.parse::<NodeId>().ok()?;
    LOCAL.with(|l| *l.borrow_mut() = Some((ext, id)));
    CHECKED.set(true);
    Some(id)
}

/// The peer a replication origin stands for (`trompe_<node id>`), if it is one of trompe's.
pub fn origin_node(origin: pg_sys::RepOriginId) -> Option<NodeId> {
    if let Some(known) = ORIGINS.with(|o| o.borrow().get(&origin).copied()) {
        return known;
    }
    let mut name: *mut std::ffi::c_char = std::ptr::null_mut();
    // SAFETY: looks up the origin's name (palloc'd, or NULL if it is gone).
    let found = unsafe { pg_sys::replorigin_by_oid(origin, true, &mut name) };
    let node = if found && !name.is_null() {
        // SAFETY: name is a NUL-terminated string from the catalog.
        let text = unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy().into_owned();
        text.strip_prefix("trompe_").and_then(|id| id.parse::<NodeId>().ok())
    } else {
        None
    };
    ORIGINS.with(|o| o.borrow_mut().insert(origin, node));
    node
}

/// The version written by transaction `xmin`.
pub fn version_of(xmin: pg_sys::TransactionId) -> OldVersion {
    // SAFETY: plain lookups in this backend's transaction state and the commit timestamp SLRU.
    unsafe {
        if pg_sys::TransactionIdIsCurrentTransactionId(xmin) {
            return OldVersion::SameTransaction;
        }
        let Some((ts, origin)) = commit_ts_data(xmin) else { return OldVersion::Unknown };
        let node = if origin == pg_sys::InvalidRepOriginId as pg_sys::RepOriginId {
            local_node()
        } else {
            origin_node(origin)
        };
        match node {
            Some(node) => OldVersion::Committed { ts, node },
            None => OldVersion::Unknown,
        }
    }
}

/// Entries of the commit timestamp cache (direct-mapped by transaction id).
const COMMIT_TS_CACHE: usize = 256;

/// A cached commit timestamp: (xid, commit time, origin, this backend's transaction id when it
/// was stored).
type CommitTsEntry = (pg_sys::TransactionId, pg_sys::TimestampTz, pg_sys::RepOriginId, pg_sys::TransactionId);

thread_local! {
    static COMMIT_TS: RefCell<Vec<Option<CommitTsEntry>>> = const { RefCell::new(Vec::new()) };
}

/// An entry stored when this backend's transaction id was `stored_at` is trusted while fewer
/// than 2^30 transaction ids have been used since: an xid is only reused after 2^32.
const COMMIT_TS_TRUSTED: u32 = 1 << 30;

/// The commit time and origin of committed transaction `xid`, if recorded. A transaction's
/// commit timestamp never changes, so lookups (an SLRU read under two shared locks, one of them
/// taken exclusively by every commit) are cached, which helps most with rows loaded or last
/// updated together (many rows share one xmin).
fn commit_ts_data(xid: pg_sys::TransactionId) -> Option<(pg_sys::TimestampTz, pg_sys::RepOriginId)> {
    // SAFETY: reads this backend's top transaction id (no lock).
    let now = unsafe { pg_sys::GetTopTransactionIdIfAny() };
    let cacheable = now != pg_sys::InvalidTransactionId;
    let slot = xid.into_inner() as usize % COMMIT_TS_CACHE;
    if cacheable {
        let hit = COMMIT_TS.with(|c| {
            c.borrow().get(slot).copied().flatten().filter(|&(x, _, _, stored_at)| {
                x == xid && now.into_inner().wrapping_sub(stored_at.into_inner()) < COMMIT_TS_TRUSTED
            })
        });
        if let Some((_, ts, origin, _)) = hit {
            return Some((ts, origin));
        }
    }
    let mut ts: pg_sys::TimestampTz = 0;
    let mut origin: pg_sys::RepOriginId = 0;
    // SAFETY: looks up the commit timestamp SLRU for a transaction id read from a tuple.
    if !unsafe { pg_sys::TransactionIdGetCommitTsData(xid, &mut ts, &mut origin) } {
        return None;
    }
    if cacheable {
        COMMIT_TS.with(|c| {
            let mut c = c.borrow_mut();
            if c.len() < COMMIT_TS_CACHE {
                c.resize(COMMIT_TS_CACHE, None);
            }
            c[slot] = Some((xid, ts, origin, now));
        });
    }
    Some((ts, origin))
}
