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

extern "C" {
    /// utils/bytea.h: how `bytea` values print (`bytea_output`: 0 escape, 1 hex).
    static mut bytea_output: std::ffi::c_int;
}

/// `bytea_output = hex`.
const BYTEA_OUTPUT_HEX: std::ffi::c_int = 1;

thread_local! {
    /// The `UTC` time zone, looked up once per backend (PostgreSQL keeps it for the backend's
    /// life).
    static UTC: Cell<*mut pg_sys::pg_tz> = const { Cell::new(std::ptr::null_mut()) };
}

/// The `UTC` time zone of this backend.
fn utc() -> *mut pg_sys::pg_tz {
    UTC.with(|u| {
        if u.get().is_null() {
            // SAFETY: looks a built-in zone name up; the result lives as long as the backend.
            u.set(unsafe { pg_sys::pg_tzset(c"UTC".as_ptr()) });
            if u.get().is_null() {
                pgrx::warning!(
                    "trompe: the time zone UTC cannot be loaded (is the server's time zone data complete?): \
                     timestamptz keys print in the session's time zone, and may not match across nodes"
                );
            }
        }
        u.get()
    })
}

/// While alive, output functions print in a fixed, settings-independent format (ISO dates,
/// postgres interval style, shortest exact floats, times with a time zone in UTC, `bytea` in
/// hex), so that text captured in any session parses back to the same value on any peer, and a
/// key prints as the same text on every node (tombstones and kept versions are found by it).
pub struct CanonicalOutput {
    date_style: i32,
    date_order: i32,
    interval_style: i32,
    extra_float_digits: i32,
    time_zone: *mut pg_sys::pg_tz,
    bytea_output: std::ffi::c_int,
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
                time_zone: pg_sys::session_timezone,
                bytea_output,
            };
            bytea_output = BYTEA_OUTPUT_HEX;
            pg_sys::DateStyle = pg_sys::USE_ISO_DATES as i32;
            pg_sys::DateOrder = pg_sys::DATEORDER_MDY as i32;
            pg_sys::IntervalStyle = pg_sys::INTSTYLE_POSTGRES as i32;
            pg_sys::extra_float_digits = 1;
            let utc = utc();
            if !utc.is_null() {
                pg_sys::session_timezone = utc;
            }
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
            pg_sys::session_timezone = self.time_zone;
            bytea_output = self.bytea_output;
        }
    }
}
