//! How SQL functions reach the workers: requests made in a transaction take effect when it
//! commits (a worker must not see a peer that was never committed, nor miss one that was).

use std::cell::Cell;
use std::sync::atomic::Ordering;

use pgrx::pg_sys;

use crate::shmem::{shared, DbState};

thread_local! {
    static WAKE_ON_COMMIT: Cell<bool> = const { Cell::new(false) };
    static LAUNCH_ON_COMMIT: Cell<bool> = const { Cell::new(false) };
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

fn ensure_callback() {
    if !CALLBACK_REGISTERED.get() {
        // SAFETY: registering a transaction callback once per backend.
        unsafe { pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut()) };
        CALLBACK_REGISTERED.set(true);
    }
}

/// Makes this database's worker re-read its peers and pull at once, when this transaction
/// commits.
pub fn wake_worker_on_commit() {
    ensure_callback();
    WAKE_ON_COMMIT.set(true);
}

/// Makes sure a worker runs for this database once this transaction commits.
pub fn launch_worker_on_commit() {
    ensure_callback();
    LAUNCH_ON_COMMIT.set(true);
    WAKE_ON_COMMIT.set(true);
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_COMMIT => {
            if LAUNCH_ON_COMMIT.get() {
                request_launch(pg_sys::MyDatabaseId);
            }
            if WAKE_ON_COMMIT.get() {
                wake_worker(pg_sys::MyDatabaseId);
            }
            WAKE_ON_COMMIT.set(false);
            LAUNCH_ON_COMMIT.set(false);
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PREPARE => {
            WAKE_ON_COMMIT.set(false);
            LAUNCH_ON_COMMIT.set(false);
        }
        _ => {}
    }
}

/// Sends SIGUSR1 (which sets the latch of a background worker) to `pid`.
pub fn signal(pid: i32) {
    if pid > 0 {
        // SAFETY: kill(2) with a pid published by the process itself.
        unsafe {
            libc_kill(pid, pg_sys::SIGUSR1 as i32);
        }
    }
}

/// Wakes the worker of `dboid`, if one runs.
pub fn wake_worker(dboid: pg_sys::Oid) {
    let Some(shared) = shared() else { return };
    if let Some(slot) = shared.db_slot(dboid) {
        slot.wake_requests.fetch_add(1, Ordering::AcqRel);
        signal(slot.worker_pid.load(Ordering::Acquire));
    }
}

/// Asks the supervisor to start a worker for `dboid` (unless one runs).
pub fn request_launch(dboid: pg_sys::Oid) {
    let Some(shared) = shared() else { return };
    let Some(slot) = shared.db_slot_or_new(dboid) else {
        pgrx::warning!("trompe: no free database slot (at most {} databases)", crate::shmem::MAX_DATABASES);
        return;
    };
    if slot.worker_pid.load(Ordering::Acquire) == 0 {
        slot.set_state(DbState::LaunchRequested);
    }
    signal(shared.supervisor_pid.load(Ordering::Acquire));
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
