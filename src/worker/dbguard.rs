//! Keeps a database's worker out of the way of commands that need the database to have no
//! connections: DROP DATABASE, ALTER DATABASE ... RENAME / SET TABLESPACE, and CREATE DATABASE
//! using it as the template; and of DROP EXTENSION trompe, which locks trompe's tables one by
//! one in an order of its own (a worker reading them meanwhile would deadlock with it). The
//! worker is stopped first and kept away for a while; the supervisor starts it again afterwards
//! if the database (and the extension) still exists.

use std::sync::atomic::Ordering;

use pgrx::pg_sys;

use crate::shmem::{now_ms, shared, DbState};

/// How long a held worker stays away.
const HOLD_MS: i64 = 10_000;
/// How long to wait for the worker to exit.
const EXIT_WAIT_MS: i64 = 5_000;

/// Called by the ProcessUtility hook before every utility statement.
///
/// # Safety
/// `node` must be a valid parse node or NULL.
pub unsafe fn before_utility(node: *mut pg_sys::Node) {
    if node.is_null() || shared().is_none() {
        return;
    }
    // Only for a user the command will not refuse: anyone else running it would stop the
    // worker for nothing (over and over, in a loop).
    if drops_trompe(node) {
        let extension = pg_sys::get_extension_oid(c"trompe".as_ptr(), true);
        if extension != pg_sys::InvalidOid && crate::pg_compat::owns_extension(extension) {
            hold_worker(pg_sys::MyDatabaseId);
        }
        return;
    }
    let dbname: *const std::ffi::c_char = match (*node).type_ {
        pg_sys::NodeTag::T_DropdbStmt => (*(node as *mut pg_sys::DropdbStmt)).dbname,
        pg_sys::NodeTag::T_RenameStmt => {
            let stmt = node as *mut pg_sys::RenameStmt;
            if (*stmt).renameType == pg_sys::ObjectType::OBJECT_DATABASE {
                (*stmt).subname
            } else {
                std::ptr::null()
            }
        }
        pg_sys::NodeTag::T_AlterDatabaseStmt => (*(node as *mut pg_sys::AlterDatabaseStmt)).dbname,
        pg_sys::NodeTag::T_CreatedbStmt => template_of(node as *mut pg_sys::CreatedbStmt),
        _ => std::ptr::null(),
    };
    if dbname.is_null() {
        return;
    }
    let dboid = pg_sys::get_database_oid(dbname, true);
    if dboid != pg_sys::InvalidOid && may_need_it_alone(node, dboid) {
        hold_worker(dboid);
    }
}

/// Whether the current user may run `node` on database `dboid`, a command that needs it without
/// sessions: as its owner (DROP, RENAME, ALTER), or as a user who may create databases and
/// copy it (CREATE DATABASE ... TEMPLATE: a template database, or one the user owns).
///
/// # Safety
/// `node` must be a valid parse node.
unsafe fn may_need_it_alone(node: *mut pg_sys::Node, dboid: pg_sys::Oid) -> bool {
    let owns = crate::pg_compat::owns_database(dboid);
    if (*node).type_ == pg_sys::NodeTag::T_CreatedbStmt {
        return may_create_database() && (owns || is_template(dboid));
    }
    owns
}

/// Whether the current user has CREATEDB (or is superuser).
fn may_create_database() -> bool {
    // SAFETY: reads the current role's attributes from the syscache.
    unsafe { pg_sys::superuser() || pg_sys::have_createdb_privilege() }
}

/// Whether database `dboid` is marked as a template (any CREATEDB user may copy it).
fn is_template(dboid: pg_sys::Oid) -> bool {
    // SAFETY: a syscache lookup of pg_database by oid; the tuple is released before returning.
    unsafe {
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::DATABASEOID as i32,
            pg_sys::Datum::from(dboid.to_u32()),
        );
        if tuple.is_null() {
            return false;
        }
        let form = pg_sys::GETSTRUCT(tuple) as pg_sys::Form_pg_database;
        let template = (*form).datistemplate;
        pg_sys::ReleaseSysCache(tuple);
        template
    }
}

/// Whether `node` is a `DROP EXTENSION` naming trompe.
///
/// # Safety
/// `node` must be a valid parse node.
unsafe fn drops_trompe(node: *mut pg_sys::Node) -> bool {
    if (*node).type_ != pg_sys::NodeTag::T_DropStmt {
        return false;
    }
    let stmt = node as *mut pg_sys::DropStmt;
    if (*stmt).removeType != pg_sys::ObjectType::OBJECT_EXTENSION {
        return false;
    }
    // The objects of DROP EXTENSION are the extensions' names, as String nodes.
    crate::pg_list::pointers::<pg_sys::String>((*stmt).objects).into_iter().any(|name| {
        !name.is_null()
            && (*name).type_ == pg_sys::NodeTag::T_String
            && !(*name).sval.is_null()
            && std::ffi::CStr::from_ptr((*name).sval).to_bytes() == b"trompe"
    })
}

/// The TEMPLATE option of CREATE DATABASE, or NULL.
unsafe fn template_of(stmt: *mut pg_sys::CreatedbStmt) -> *const std::ffi::c_char {
    let list = (*stmt).options;
    if list.is_null() {
        return std::ptr::null();
    }
    for i in 0..(*list).length as usize {
        let def = (*(*list).elements.add(i)).ptr_value as *mut pg_sys::DefElem;
        if def.is_null() || (*def).defname.is_null() {
            continue;
        }
        if std::ffi::CStr::from_ptr((*def).defname).to_bytes() == b"template" && !(*def).arg.is_null() {
            return pg_sys::defGetString(def);
        }
    }
    std::ptr::null()
}

/// Stops the worker of `dboid`, if any, and keeps it from restarting for a while.
pub fn hold_worker(dboid: pg_sys::Oid) {
    let Some(shared) = shared() else { return };
    let Some(slot) = shared.db_slot(dboid) else {
        return;
    };
    slot.retry_at.store(now_ms() + HOLD_MS, Ordering::Release);
    let state = slot.state();
    if state == DbState::NoExtension || state == DbState::Free {
        return;
    }
    slot.set_state(DbState::Held);
    // Pairs with the worker's start (supervisor::trompe_worker_main): it publishes its pid and
    // then looks for the hold, before it connects.
    std::sync::atomic::fence(Ordering::SeqCst);
    let pid = slot.worker_pid.load(Ordering::SeqCst);
    if pid <= 0 {
        return;
    }
    // SAFETY: kill(2) on the worker's pid, which it publishes while it runs.
    unsafe {
        libc_kill(pid, pg_sys::SIGTERM as i32);
    }
    // The supervisor must not restart it before the hold ends.
    crate::worker::control::signal(shared.supervisor_pid.load(Ordering::Acquire));
    let deadline = now_ms() + EXIT_WAIT_MS;
    while slot.worker_pid.load(Ordering::Acquire) == pid && now_ms() < deadline {
        // SAFETY: sleeping on our own latch with a timeout; interrupts are checked after.
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                10,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        pgrx::check_for_interrupts!();
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
