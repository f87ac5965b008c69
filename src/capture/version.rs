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

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn forget_origins(_arg: pg_sys::Datum, _cacheid: std::ffi::c_int, _hash: u32) {
    ORIGINS.with(|o| o.borrow_mut().clear());
}

/// Registers the callbacks that keep the caches above true (once per backend).
fn ensure_callbacks() {
    if !CALLBACK_REGISTERED.get() {
        // SAFETY: registering cache callbacks once per backend, with valid functions: a
        // replication origin created or dropped (its number can be reused) empties the map.
        unsafe {
            pg_sys::CacheRegisterRelcacheCallback(Some(invalidate), pg_sys::Datum::from(0));
            pg_sys::CacheRegisterSyscacheCallback(
                pg_sys::SysCacheIdentifier::REPLORIGIDENT as std::ffi::c_int,
                Some(forget_origins),
                pg_sys::Datum::from(0),
            );
        }
        CALLBACK_REGISTERED.set(true);
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
    ensure_callbacks();
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
    let id = crate::node::read_node_id().ok().flatten()?;
    LOCAL.with(|l| *l.borrow_mut() = Some((ext, id)));
    CHECKED.set(true);
    Some(id)
}

/// The peer a replication origin stands for (`trompe_<node id>`), if it is one of trompe's.
pub fn origin_node(origin: pg_sys::RepOriginId) -> Option<NodeId> {
    ensure_callbacks();
    if let Some(known) = ORIGINS.with(|o| o.borrow().get(&origin).copied()) {
        return known;
    }
    let mut name: *mut std::ffi::c_char = std::ptr::null_mut();
    // SAFETY: looks up the origin's name (palloc'd, or NULL if it is gone).
    let found = unsafe { pg_sys::replorigin_by_oid(origin, true, &mut name) };
    let node = if found && !name.is_null() {
        // SAFETY: name is a NUL-terminated string from the catalog.
        let text = unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy().into_owned();
        trompe_core::nodeid::node_of_origin(&text)
    } else {
        None
    };
    ORIGINS.with(|o| o.borrow_mut().insert(origin, node));
    node
}

/// The version written by transaction `xmin` (from trompe's commit time cache, else from
/// PostgreSQL's commit timestamps).
pub fn version_of(xmin: pg_sys::TransactionId) -> OldVersion {
    // SAFETY: plain lookups in this backend's transaction state and the commit timestamp SLRU.
    unsafe {
        if pg_sys::TransactionIdIsCurrentTransactionId(xmin) {
            return OldVersion::SameTransaction;
        }
        let (ts, origin) = match crate::commit_time_cache::lookup(xmin) {
            Some(cached) => cached,
            None => {
                let mut ts: pg_sys::TimestampTz = 0;
                let mut origin: pg_sys::RepOriginId = 0;
                if !pg_sys::TransactionIdGetCommitTsData(xmin, &mut ts, &mut origin) {
                    return OldVersion::Unknown;
                }
                (ts, origin)
            }
        };
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
