//! The end of a transaction that captured changes (and of its subtransactions): the buffered
//! changes become the transaction's last log row before it commits; at commit, pullers are
//! woken and the commit time recorded; at any end, the per-transaction state is reset. The
//! callbacks are registered on a backend's first captured change (`record`).

use std::cell::Cell;

use pgrx::pg_sys;

use crate::capture::{buffer, local_writes};
use crate::error::TrompeError;

thread_local! {
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// Records one change of the current (sub)transaction in its buffer (see `buffer::record`),
/// making sure first that the transaction's end writes it to the log.
pub fn record(nsp: &str, rel: &str, encode: impl FnOnce(&mut Vec<u8>, u64)) -> Result<(), TrompeError> {
    ensure_xact_callback();
    buffer::record(nsp, rel, encode)
}

/// Registers this backend's transaction callbacks (once).
pub fn ensure_xact_callback() {
    if !CALLBACK_REGISTERED.get() {
        // SAFETY: registering transaction callbacks once per backend, with valid functions.
        unsafe {
            pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut());
            pg_sys::RegisterSubXactCallback(Some(on_subxact_event), std::ptr::null_mut());
        }
        CALLBACK_REGISTERED.set(true);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_subxact_event(
    event: pg_sys::SubXactEvent::Type,
    _sub: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    match event {
        // Still inside the subtransaction: a large release is written as a chunk.
        pg_sys::SubXactEvent::SUBXACT_EVENT_PRE_COMMIT_SUB => {
            if let Err(e) = buffer::release_subtransaction() {
                e.raise();
            }
        }
        pg_sys::SubXactEvent::SUBXACT_EVENT_COMMIT_SUB => {
            buffer::end_subtransaction(true);
            local_writes::end_subtransaction(true);
        }
        pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB => {
            buffer::end_subtransaction(false);
            local_writes::end_subtransaction(false);
        }
        _ => {}
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    match event {
        // Still inside the transaction: the buffered changes become its last log row.
        pg_sys::XactEvent::XACT_EVENT_PRE_COMMIT | pg_sys::XactEvent::XACT_EVENT_PRE_PREPARE => {
            if let Err(e) = buffer::flush_all().and_then(|_| local_writes::pre_commit()) {
                e.raise();
            }
        }
        pg_sys::XactEvent::XACT_EVENT_COMMIT => {
            let wrote_log = crate::log::writer::wrote_log();
            if wrote_log || crate::session::applying_for_peer() {
                // Its rows are the ones capture and apply will look up the version of.
                crate::commit_time_cache::record_current_commit();
            }
            if wrote_log {
                crate::shmem::announce_log_commit();
            }
            crate::marker_writes::capture_transaction_ended();
            reset_transaction_state();
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PREPARE => {
            // Balances the announcement made before the failed commit.
            crate::marker_writes::capture_transaction_ended();
            reset_transaction_state();
        }
        _ => {}
    }
}

fn reset_transaction_state() {
    crate::log::writer::forget_log_write();
    buffer::reset();
    local_writes::end_of_transaction();
    crate::row_versions::end_of_transaction();
    crate::capture::ddl_policy::end_of_transaction();
}
