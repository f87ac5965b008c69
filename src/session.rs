//! What this backend is doing right now, as far as trompe cares: running trompe's own commands
//! (not captured as DDL), applying changes for a peer (not captured again), printing values in
//! the canonical format that every peer parses back to the same value.

use std::cell::Cell;

use pgrx::pg_sys;

thread_local! {
    /// Depth of trompe's own operations in progress in this backend: DDL they run is not captured.
    static INTERNAL_DEPTH: Cell<u32> = const { Cell::new(0) };
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
