//! The supervisor: one per server (a static background worker, restarted by the postmaster).
//! It starts a worker for every database with trompe: at server start (and after a crash) it
//! probes every database; later it starts workers on request (CREATE EXTENSION, add_peer),
//! restarts workers that died, and brings back workers held away by DROP/ALTER DATABASE.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use pgrx::bgworkers::{BackgroundWorkerBuilder, BgWorkerStartTime};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::shmem::{now_ms, shared, DbState};

/// Delay before restarting a worker that died.
const RESTART_DELAY_MS: i64 = 5_000;

/// Registers the supervisor; called from `_PG_init` while preloading.
pub fn register() {
    BackgroundWorkerBuilder::new("trompe supervisor")
        .set_type("trompe supervisor")
        .set_library("trompe")
        .set_function("trompe_supervisor_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(std::time::Duration::from_secs(5)))
        .load();
}

/// Installs the standard signal handlers of a background worker: SIGTERM ends it at the next
/// interrupt check, SIGHUP asks for a configuration reload.
pub fn install_signal_handlers() {
    // SAFETY: standard PostgreSQL handlers, installed before signals are unblocked.
    unsafe {
        crate::pg_compat::install_signal_handler(pg_sys::SIGTERM, postgres_die);
        crate::pg_compat::install_signal_handler(pg_sys::SIGHUP, postgres_reload_handler);
        pg_sys::BackgroundWorkerUnblockSignals();
    }
}

extern "C-unwind" {
    /// PostgreSQL's SIGTERM handler for backends: terminate at the next interrupt check.
    #[link_name = "die"]
    fn postgres_die(signal: std::ffi::c_int);
    /// PostgreSQL's SIGHUP handler: set ConfigReloadPending and the latch.
    #[link_name = "SignalHandlerForConfigReload"]
    fn postgres_reload_handler(signal: std::ffi::c_int);
}

/// Connectable databases (oid, name).
fn list_databases() -> Vec<(pg_sys::Oid, String)> {
    let mut out = Vec::new();
    // SAFETY: a catalog scan of pg_database inside a transaction, as the autovacuum launcher
    // does; tuples are read while the scan is open.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let form = pg_sys::GETSTRUCT(tuple) as pg_sys::Form_pg_database;
            if (*form).datallowconn && !(*form).datistemplate {
                let name = std::ffi::CStr::from_ptr((*form).datname.data.as_ptr()).to_string_lossy().into_owned();
                out.push(((*form).oid, name));
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        pg_sys::PopActiveSnapshot();
        pg_sys::CommitTransactionCommand();
    }
    out
}

fn launch(dboid: pg_sys::Oid, dbname: &str) -> Option<*mut pg_sys::BackgroundWorkerHandle> {
    let mut worker = pg_sys::BackgroundWorker::default();
    let copy = |dst: &mut [std::ffi::c_char], s: &str| {
        let room = dst.len() - 1;
        for (d, b) in dst.iter_mut().zip(s.bytes().take(room)) {
            *d = b as std::ffi::c_char;
        }
    };
    copy(&mut worker.bgw_name, &format!("trompe worker for database {dbname}"));
    copy(&mut worker.bgw_type, "trompe worker");
    copy(&mut worker.bgw_library_name, "trompe");
    copy(&mut worker.bgw_function_name, "trompe_worker_main");
    worker.bgw_flags = (pg_sys::BGWORKER_SHMEM_ACCESS | pg_sys::BGWORKER_BACKEND_DATABASE_CONNECTION) as i32;
    worker.bgw_start_time = pg_sys::BgWorkerStartTime::BgWorkerStart_RecoveryFinished;
    worker.bgw_restart_time = pg_sys::BGW_NEVER_RESTART;
    worker.bgw_main_arg = pg_sys::Datum::from(dboid.to_u32());
    // SAFETY: MyProcPid is ours; the postmaster tells us (SIGUSR1, latch) when it stops.
    worker.bgw_notify_pid = unsafe { pg_sys::MyProcPid };
    let mut handle: *mut pg_sys::BackgroundWorkerHandle = std::ptr::null_mut();
    // SAFETY: registering a dynamic worker with a fully initialised description.
    let ok = unsafe { pg_sys::RegisterDynamicBackgroundWorker(&mut worker, &mut handle) };
    ok.then_some(handle)
}

/// Entry point of the supervisor.
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn trompe_supervisor_main(_arg: pg_sys::Datum) {
    install_signal_handlers();
    // SAFETY: connects to no database: only shared catalogs (pg_database) are read.
    unsafe { pg_sys::BackgroundWorkerInitializeConnection(std::ptr::null(), std::ptr::null(), 0) };
    let Some(shared) = shared() else { return };
    // SAFETY: MyProcPid is ours.
    shared.supervisor_pid.store(unsafe { pg_sys::MyProcPid }, Ordering::Release);
    let mut handles: HashMap<u32, *mut pg_sys::BackgroundWorkerHandle> = HashMap::new();
    let mut names: HashMap<u32, String> = HashMap::new();

    // At start, probe every database whose worker is not known to run.
    for (dboid, name) in list_databases() {
        names.insert(dboid.to_u32(), name);
        if let Some(slot) = shared.db_slot_or_new(dboid) {
            let running = slot.worker_pid.load(Ordering::Acquire) != 0;
            if !running && matches!(slot.state(), DbState::Free | DbState::Running | DbState::Failed) {
                slot.set_state(DbState::LaunchRequested);
            }
        }
    }
    loop {
        // SAFETY: interrupt and reload handling of a background worker.
        unsafe {
            if pg_sys::ConfigReloadPending != 0 {
                pg_sys::ConfigReloadPending = 0;
                pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
            }
        }
        pgrx::check_for_interrupts!();
        let now = now_ms();
        let mut next_wake = now + 10_000;
        let mut need_names = false;
        for slot in shared.dbs.iter() {
            let dboid = slot.dboid.load(Ordering::Acquire);
            if dboid == 0 {
                continue;
            }
            let state = slot.state();
            // A worker we started that stopped without saying why died: restart it later.
            if state == DbState::Running && slot.worker_pid.load(Ordering::Acquire) == 0 {
                if let Some(h) = handles.get(&dboid) {
                    let mut pid = 0;
                    // SAFETY: the handle came from RegisterDynamicBackgroundWorker.
                    let status = unsafe { pg_sys::GetBackgroundWorkerPid(*h, &mut pid) };
                    if status == pg_sys::BgwHandleStatus::BGWH_STOPPED {
                        handles.remove(&dboid);
                        slot.retry_at.store(now + RESTART_DELAY_MS, Ordering::Release);
                        slot.set_state(DbState::Failed);
                    }
                }
            }
            let state = slot.state();
            let due = match state {
                DbState::LaunchRequested => true,
                DbState::Held | DbState::Failed => {
                    let at = slot.retry_at.load(Ordering::Acquire);
                    if now < at {
                        next_wake = next_wake.min(at);
                    }
                    now >= at
                }
                _ => false,
            };
            if !due {
                continue;
            }
            if !names.contains_key(&dboid) {
                need_names = true;
                continue;
            }
            let name = names[&dboid].clone();
            // Marked running before the worker starts, unless a command took a hold meanwhile
            // (worker::dbguard): a hold taken after this is seen by the worker as it starts.
            if !slot.replace_state(state, DbState::Running) {
                continue;
            }
            match launch(pg_sys::Oid::from(dboid), &name) {
                Some(h) => {
                    handles.insert(dboid, h);
                }
                None => {
                    pgrx::log!("trompe: cannot start a worker for database {name} (max_worker_processes?); retrying");
                    slot.retry_at.store(now + RESTART_DELAY_MS, Ordering::Release);
                    slot.set_state(DbState::Failed);
                }
            }
        }
        if need_names {
            let dbs = list_databases();
            names = dbs.into_iter().map(|(o, n)| (o.to_u32(), n)).collect();
            // Slots of databases that no longer exist are freed.
            for slot in shared.dbs.iter() {
                let dboid = slot.dboid.load(Ordering::Acquire);
                if dboid != 0 && !names.contains_key(&dboid) && slot.worker_pid.load(Ordering::Acquire) == 0 {
                    slot.set_state(DbState::Free);
                    slot.dboid.store(0, Ordering::Release);
                }
            }
            continue;
        }
        // SAFETY: waiting on our latch; SIGUSR1 (requests, worker exits) sets it.
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                (next_wake - now).clamp(10, 10_000) as std::ffi::c_long,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn worker_exit(_code: i32, dboid: pg_sys::Datum) {
    if let Some(shared) = shared() {
        if let Some(slot) = shared.db_slot(pg_sys::Oid::from(dboid.value() as u32)) {
            if slot.worker_pid.load(Ordering::Acquire) == pg_sys::MyProcPid {
                slot.worker_pid.store(0, Ordering::Release);
            }
        }
        crate::worker::control::signal(shared.supervisor_pid.load(Ordering::Acquire));
    }
}

/// Entry point of a database's worker.
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn trompe_worker_main(arg: pg_sys::Datum) {
    install_signal_handlers();
    let dboid = pg_sys::Oid::from(arg.value() as u32);
    let Some(shared) = shared() else { return };
    let Some(slot) = shared.db_slot_or_new(dboid) else {
        return;
    };
    // The pid is published before the worker connects, and the hold looked at after: a command
    // that needs the database without sessions (worker::dbguard) sets the hold before it
    // looks for the pid, so either it sees the pid and stops the worker, or the worker sees
    // the hold and never connects.
    // SAFETY: MyProcPid is ours.
    let me = unsafe { pg_sys::MyProcPid };
    if slot.worker_pid.compare_exchange(0, me, Ordering::SeqCst, Ordering::SeqCst).is_err() {
        // Another worker serves this database.
        return;
    }
    // SAFETY: registers the callback that unpublishes the pid however the worker exits.
    unsafe { pg_sys::before_shmem_exit(Some(worker_exit), pg_sys::Datum::from(dboid.to_u32())) };
    std::sync::atomic::fence(Ordering::SeqCst);
    if slot.state() == DbState::Held {
        return;
    }
    // SAFETY: connects to the database as the bootstrap superuser; fails (FATAL) if it was
    // dropped meanwhile.
    unsafe {
        pg_sys::BackgroundWorkerInitializeConnectionByOid(dboid, pg_sys::InvalidOid, 0);
        pg_sys::pgstat_report_appname(c"trompe worker".as_ptr());
        // Changes applied here fire no ordinary triggers and no foreign key checks (they were
        // checked at the origin), like pglogical's apply; commits need not wait for disk; names
        // are always qualified; values parse the same whatever the server's settings; the
        // small statements of apply never pay for JIT compilation; a database made read-only
        // for its applications by default still takes its peers' changes.
        let settings: [(&std::ffi::CStr, &std::ffi::CStr); 7] = [
            (c"session_replication_role", c"replica"),
            (c"synchronous_commit", c"off"),
            (c"search_path", c""),
            (c"DateStyle", c"ISO, MDY"),
            (c"IntervalStyle", c"postgres"),
            (c"jit", c"off"),
            (c"default_transaction_read_only", c"off"),
        ];
        for (name, value) in settings {
            pg_sys::SetConfigOption(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_OVERRIDE,
            );
        }
    }
    crate::worker::engine::run(dboid, slot);
}
