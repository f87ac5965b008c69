//! Change capture: the row and TRUNCATE triggers, DDL capture, and the per-backend state they
//! share (whether trompe itself is running a command, whether this transaction wrote to the
//! log, which log table it appends to).

pub mod buffer;
pub mod ddl;
pub mod ddl_policy;
pub mod guard;
pub mod privileges;
pub mod relinfo;
pub mod row;
pub mod truncate;
pub mod version;

use std::cell::Cell;

use pgrx::pg_sys;

thread_local! {
    /// Depth of trompe's own operations in progress in this backend: DDL they run is not captured.
    static INTERNAL_DEPTH: Cell<u32> = const { Cell::new(0) };
    /// This transaction wrote to the change log: wake pullers when it commits.
    static WROTE_LOG: Cell<bool> = const { Cell::new(false) };
    /// This transaction wrote tombstones or truncation markers.
    static WROTE_MARKERS: Cell<bool> = const { Cell::new(false) };
    /// The log table this transaction appends to, once chosen.
    static LOG_SLOT: Cell<Option<usize>> = const { Cell::new(None) };
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// While alive, commands run by this backend are trompe's own and are not captured as DDL.
pub struct InternalOperation(());

impl InternalOperation {
    /// Marks the start of an internal operation; it ends when the guard is dropped.
    pub fn begin() -> Self {
        INTERNAL_DEPTH.set(INTERNAL_DEPTH.get() + 1);
        InternalOperation(())
    }
}

impl Drop for InternalOperation {
    fn drop(&mut self) {
        INTERNAL_DEPTH.set(INTERNAL_DEPTH.get().saturating_sub(1));
    }
}

/// True while trompe itself runs commands in this backend.
pub fn in_internal_operation() -> bool {
    INTERNAL_DEPTH.get() > 0
}

/// True when this backend applies changes on behalf of a peer (a replication origin is set up),
/// so nothing it writes is captured again.
pub fn applying_for_peer() -> bool {
    // SAFETY: reading a backend-local global.
    unsafe { pg_sys::replorigin_session_origin != pg_sys::InvalidRepOriginId as pg_sys::RepOriginId }
}

/// The log table this transaction appends to, chosen on its first change.
pub fn log_slot_for_transaction() -> Result<usize, crate::error::TrompeError> {
    ensure_xact_callback();
    if let Some(slot) = LOG_SLOT.get() {
        return Ok(slot);
    }
    let slot = crate::log::rotation::current_slot()?;
    LOG_SLOT.set(Some(slot));
    Ok(slot)
}

/// Records that this transaction wrote tombstones or truncation markers.
pub fn note_markers_written() {
    if !WROTE_MARKERS.get() {
        crate::shmem::announce_tombstone_writer();
    }
    WROTE_MARKERS.set(true);
}

/// Records that this transaction wrote to the change log.
pub fn note_log_write() {
    WROTE_LOG.set(true);
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
            guard::end_subtransaction(true);
        }
        pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB => {
            buffer::end_subtransaction(false);
            guard::end_subtransaction(false);
        }
        _ => {}
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    match event {
        // Still inside the transaction: the buffered changes become its last log row.
        pg_sys::XactEvent::XACT_EVENT_PRE_COMMIT | pg_sys::XactEvent::XACT_EVENT_PRE_PREPARE => {
            if let Err(e) = buffer::flush_all().and_then(|_| guard::pre_commit()) {
                e.raise();
            }
        }
        pg_sys::XactEvent::XACT_EVENT_COMMIT => {
            if WROTE_LOG.get() || applying_for_peer() {
                // Its rows are the ones capture and apply will look up the version of.
                crate::commit_times::record_current_commit();
            }
            if WROTE_LOG.get() {
                crate::shmem::announce_log_commit();
            }
            if WROTE_MARKERS.get() {
                crate::shmem::bump_tombstone_generation();
            }
            reset_transaction_state();
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PREPARE => {
            if WROTE_MARKERS.get() {
                // Balances the announcement made before the failed commit.
                crate::shmem::bump_tombstone_generation();
            }
            reset_transaction_state();
        }
        _ => {}
    }
}

fn reset_transaction_state() {
    WROTE_LOG.set(false);
    LOG_SLOT.set(None);
    buffer::reset();
    guard::end_of_transaction();
    crate::row_versions::end_of_transaction();
    WROTE_MARKERS.set(false);
}

/// While alive, output functions print in a fixed, settings-independent format (ISO dates,
/// postgres interval style, shortest exact floats), so that text captured in any session parses
/// back to the same value on any peer.
pub struct CanonicalOutput {
    date_style: i32,
    date_order: i32,
    interval_style: i32,
    extra_float_digits: i32,
}

impl CanonicalOutput {
    /// Switches this backend to the canonical output format until the guard is dropped.
    pub fn enter() -> Self {
        // SAFETY: these are plain backend-local globals read by the output functions; the
        // guard restores them, also when an error unwinds through it.
        unsafe {
            let saved = CanonicalOutput {
                date_style: pg_sys::DateStyle,
                date_order: pg_sys::DateOrder,
                interval_style: pg_sys::IntervalStyle,
                extra_float_digits: pg_sys::extra_float_digits,
            };
            pg_sys::DateStyle = pg_sys::USE_ISO_DATES as i32;
            pg_sys::DateOrder = pg_sys::DATEORDER_MDY as i32;
            pg_sys::IntervalStyle = pg_sys::INTSTYLE_POSTGRES as i32;
            pg_sys::extra_float_digits = 1;
            saved
        }
    }
}

impl Drop for CanonicalOutput {
    fn drop(&mut self) {
        // SAFETY: restoring the backend-local globals saved by `enter`.
        unsafe {
            pg_sys::DateStyle = self.date_style;
            pg_sys::DateOrder = self.date_order;
            pg_sys::IntervalStyle = self.interval_style;
            pg_sys::extra_float_digits = self.extra_float_digits;
        }
    }
}
