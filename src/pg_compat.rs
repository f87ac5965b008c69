//! Everything that differs between the PostgreSQL major versions trompe builds for, behind
//! small named functions: the rest of the code calls these and never tests a `pg1x` feature.
//!
//! Built and tested: 15, 16 and 18; 17 follows 16 except where noted (checked against pgrx's
//! bindings of 17, not built here). The `pg13`/`pg14` branches are kept where they were.

use pgrx::pg_sys;

/// The major version this library was built for (`PG_VERSION_NUM / 10000`).
pub const MAJOR: u32 = pg_sys::PG_VERSION_NUM / 10000;

/// The attribute `i` (0-based) of a tuple descriptor. PostgreSQL 18 keeps a compact copy of
/// each attribute in front of the full ones, so the full array is no longer a field.
///
/// # Safety
/// `tupdesc` must be a valid tuple descriptor with more than `i` attributes.
#[inline]
pub unsafe fn tuple_desc_attr(tupdesc: pg_sys::TupleDesc, i: usize) -> *mut pg_sys::FormData_pg_attribute {
    #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16", feature = "pg17"))]
    // SAFETY: the caller guarantees tupdesc is valid and i is in range.
    unsafe {
        (*tupdesc).attrs.as_mut_ptr().add(i)
    }
    #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16", feature = "pg17")))]
    // SAFETY: the caller guarantees tupdesc is valid and i is in range (an int, as natts is).
    unsafe {
        pg_sys::TupleDescAttr(tupdesc, i as std::ffi::c_int)
    }
}

/// The oid of the relation's primary key index, or `InvalidOid` if it has none. A deferrable
/// primary key counts as none, as it always did before 18 (18 reports it only on request).
///
/// # Safety
/// `rel` must be an open relation.
#[inline]
pub unsafe fn primary_key_index(rel: pg_sys::Relation) -> pg_sys::Oid {
    #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16", feature = "pg17"))]
    // SAFETY: the caller guarantees rel is open.
    unsafe {
        pg_sys::RelationGetPrimaryKeyIndex(rel)
    }
    #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16", feature = "pg17")))]
    // SAFETY: the caller guarantees rel is open.
    unsafe {
        pg_sys::RelationGetPrimaryKeyIndex(rel, false)
    }
}

/// Makes `rte` the executor state's one range table entry (index 1), as PostgreSQL's logical
/// replication apply does: from 16 on with its permission info (the executor looks it up to
/// describe a failing row, e.g. in a NOT NULL violation), from 18 on also marked unpruned.
///
/// # Safety
/// `estate` must be a fresh executor state and `rte` a relation entry allocated in the
/// current memory context.
pub unsafe fn exec_init_range_table(estate: *mut pg_sys::EState, rte: *mut pg_sys::RangeTblEntry) {
    // SAFETY: the caller guarantees both pointers; the lists are built in the current memory
    // context, which outlives the executor state.
    unsafe {
        let range_table = pg_sys::lappend(std::ptr::null_mut(), rte.cast());
        #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
        pg_sys::ExecInitRangeTable(estate, range_table);
        #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
        {
            let mut perminfos: *mut pg_sys::List = std::ptr::null_mut();
            pg_sys::addRTEPermissionInfo(&mut perminfos, rte);
            #[cfg(any(feature = "pg16", feature = "pg17"))]
            pg_sys::ExecInitRangeTable(estate, range_table, perminfos);
            #[cfg(not(any(feature = "pg16", feature = "pg17")))]
            pg_sys::ExecInitRangeTable(estate, range_table, perminfos, pg_sys::bms_make_singleton(1));
        }
    }
}

/// A wait event set for `nevents` events, to be freed with `FreeWaitEventSet`. Up to 16 it
/// lives in the current memory context; from 17 on in TopMemoryContext, tracked by the current
/// resource owner if there is one (as `WaitLatchOrSocket` does), so an error between creating
/// and freeing it does not leak its epoll descriptor.
///
/// # Safety
/// Must be called in a backend or background worker; the set must be freed by the caller.
pub unsafe fn create_wait_event_set(nevents: i32) -> *mut pg_sys::WaitEventSet {
    #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16"))]
    // SAFETY: the caller guarantees a backend context.
    unsafe {
        pg_sys::CreateWaitEventSet(pg_sys::CurrentMemoryContext, nevents)
    }
    #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16")))]
    // SAFETY: the caller guarantees a backend context; a NULL resource owner is allowed.
    unsafe {
        pg_sys::CreateWaitEventSet(pg_sys::CurrentResourceOwner, nevents)
    }
}

/// Makes `origin` this session's replication origin, acquired for this process.
///
/// # Safety
/// No other origin may be set up in this session.
pub unsafe fn replorigin_session_setup(origin: pg_sys::RepOriginId) {
    #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
    // SAFETY: the caller guarantees no origin is set up.
    unsafe {
        pg_sys::replorigin_session_setup(origin)
    }
    #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
    // SAFETY: the caller guarantees no origin is set up; 0 acquires it for this process.
    unsafe {
        pg_sys::replorigin_session_setup(origin, 0)
    }
}

/// Installs a signal handler the backend way (`pqsignal`, called `pqsignal_be` from 18 on).
///
/// # Safety
/// `handler` must be async-signal-safe, as PostgreSQL's own handlers are.
pub unsafe fn install_signal_handler(signal: u32, handler: unsafe extern "C-unwind" fn(std::ffi::c_int)) {
    #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16", feature = "pg17"))]
    // SAFETY: the caller guarantees the handler is fit for a signal.
    unsafe {
        pg_sys::pqsignal(signal as i32, Some(handler));
    }
    #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16", feature = "pg17")))]
    // SAFETY: the caller guarantees the handler is fit for a signal.
    unsafe {
        pg_sys::pqsignal_be(signal as i32, Some(handler));
    }
}

/// Runs a started portal to completion (`PortalRun`; up to 17 with `run_once`, which 18
/// dropped: a portal run only once, as every caller here does).
///
/// # Safety
/// `portal` must be a started portal; `dest` and `altdest` valid receivers; `qc` null or a
/// command completion to fill in.
pub unsafe fn portal_run(
    portal: pg_sys::Portal,
    count: std::ffi::c_long,
    is_top_level: bool,
    dest: *mut pg_sys::DestReceiver,
    altdest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) -> bool {
    #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16", feature = "pg17"))]
    // SAFETY: the caller guarantees the portal and receivers.
    unsafe {
        pg_sys::PortalRun(portal, count, is_top_level, true, dest, altdest, qc)
    }
    #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16", feature = "pg17")))]
    // SAFETY: the caller guarantees the portal and receivers.
    unsafe {
        pg_sys::PortalRun(portal, count, is_top_level, dest, altdest, qc)
    }
}

/// Ends this process cleanly with `code` (`proc_exit`, which never returns; pgrx's bindings of
/// 18 no longer say so).
///
/// # Safety
/// Must be called where a backend may exit: no Rust value that needs dropping for
/// correctness is alive on the stack above (exit callbacks run, destructors do not).
pub unsafe fn proc_exit(code: i32) -> ! {
    // SAFETY: the caller guarantees the process may exit here.
    unsafe { pg_sys::proc_exit(code) };
    #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16", feature = "pg17")))]
    unreachable!("proc_exit returned")
}

/// `AddinShmemInitLock`, which serialises extensions' shared memory set-up: entry 21 of the
/// main LWLock array from 13 to 18 (`lwlocknames.h`; a macro, so not in pgrx's bindings).
///
/// # Safety
/// Must be called after shared memory is attached (in `shmem_startup_hook` or later).
pub unsafe fn addin_shmem_init_lock() -> *mut pg_sys::LWLock {
    // SAFETY: the main LWLock array is allocated before shmem_startup_hook runs, with more
    // than 21 fixed entries.
    unsafe { &raw mut (*pg_sys::MainLWLockArray.add(21)).lock }
}

/// Asks for shared memory and locks while preloading: through `shmem_request_hook` from 15
/// on (`request` runs when the postmaster sizes shared memory, after the hooks installed
/// before it), directly before 15.
///
/// # Safety
/// Must be called from `_PG_init` while `shared_preload_libraries` is processed, once.
pub unsafe fn request_shared_memory(request: unsafe fn()) {
    #[cfg(any(feature = "pg13", feature = "pg14"))]
    // SAFETY: the caller guarantees we are preloading, when requests are allowed.
    unsafe {
        request()
    }
    #[cfg(not(any(feature = "pg13", feature = "pg14")))]
    // SAFETY: hook installation from _PG_init, single-threaded, in the postmaster.
    unsafe {
        REQUEST = Some(request);
        PREV_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(shmem_request);
    }
}

#[cfg(not(any(feature = "pg13", feature = "pg14")))]
static mut PREV_REQUEST: pg_sys::shmem_request_hook_type = None;
#[cfg(not(any(feature = "pg13", feature = "pg14")))]
static mut REQUEST: Option<unsafe fn()> = None;

#[cfg(not(any(feature = "pg13", feature = "pg14")))]
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    // SAFETY: runs once in the postmaster, single-threaded, after request_shared_memory set
    // both statics.
    unsafe {
        if let Some(prev) = PREV_REQUEST {
            prev();
        }
        if let Some(request) = REQUEST {
            request();
        }
    }
}

/// Sets up `epqstate` for the single-row update and delete of logical replication apply (no
/// plan, no row marks), as PostgreSQL's own apply does; from 16 on with no result relations.
///
/// # Safety
/// `epqstate` must point to writable memory for an `EPQState`, `estate` to a live executor
/// state; `EvalPlanQualEnd` must be called before the executor state is freed.
pub unsafe fn eval_plan_qual_init(epqstate: *mut pg_sys::EPQState, estate: *mut pg_sys::EState) {
    #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
    // SAFETY: the caller guarantees both pointers.
    unsafe {
        pg_sys::EvalPlanQualInit(epqstate, estate, std::ptr::null_mut(), std::ptr::null_mut(), -1)
    }
    #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
    // SAFETY: the caller guarantees both pointers.
    unsafe {
        pg_sys::EvalPlanQualInit(epqstate, estate, std::ptr::null_mut(), std::ptr::null_mut(), -1, std::ptr::null_mut())
    }
}

/// Whether the current user owns database `dboid` (or is a member of its owner, or superuser):
/// may drop, rename or move it.
pub fn owns_database(dboid: pg_sys::Oid) -> bool {
    // SAFETY: a catalog lookup inside the current transaction; GetUserId is backend state.
    unsafe {
        #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
        {
            pg_sys::pg_database_ownercheck(dboid, pg_sys::GetUserId())
        }
        #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
        {
            pg_sys::object_ownercheck(pg_sys::DatabaseRelationId, dboid, pg_sys::GetUserId())
        }
    }
}

/// Whether the current user owns extension `extoid` (or is a member of its owner, or
/// superuser): may drop it.
pub fn owns_extension(extoid: pg_sys::Oid) -> bool {
    // SAFETY: a catalog lookup inside the current transaction; GetUserId is backend state.
    unsafe {
        #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
        {
            pg_sys::pg_extension_ownercheck(extoid, pg_sys::GetUserId())
        }
        #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
        {
            pg_sys::object_ownercheck(pg_sys::ExtensionRelationId, extoid, pg_sys::GetUserId())
        }
    }
}

/// This backend's local transaction id: numbers its transactions (also those without a
/// transaction id) in order. PostgreSQL 17 moved it into the proc's virtual transaction id.
pub fn local_transaction_id() -> u32 {
    // SAFETY: MyProc is this backend's own proc entry, set up before any SQL runs.
    unsafe {
        #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16"))]
        {
            (*pg_sys::MyProc).lxid
        }
        #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16")))]
        {
            (*pg_sys::MyProc).vxid.lxid
        }
    }
}
