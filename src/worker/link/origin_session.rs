//! The peer's replication origin, set up for the transactions applied from it.

use pgrx::pg_sys;

/// The peer's replication origin set up while a batch is applied, so each commit records the
/// origin's commit time and identity; released when dropped (also after an error).
pub(crate) struct OriginSession {
    active: bool,
}

impl Drop for OriginSession {
    fn drop(&mut self) {
        self.reset();
    }
}

impl OriginSession {
    /// No origin set up yet.
    pub(crate) fn none() -> Self {
        OriginSession { active: false }
    }

    /// Sets up `origin` and the commit time the next commit records.
    pub(crate) fn setup(&mut self, origin: pg_sys::RepOriginId, commit_us: i64) {
        if origin == pg_sys::InvalidRepOriginId as pg_sys::RepOriginId {
            return;
        }
        // SAFETY: sets up the session's replication origin (one at a time in this process) and
        // the timestamp the next commit records.
        unsafe {
            crate::pg_compat::replorigin_session_setup(origin);
            pg_sys::replorigin_session_origin = origin;
            pg_sys::replorigin_session_origin_timestamp = commit_us;
            pg_sys::replorigin_session_origin_lsn = 0;
        }
        self.active = true;
    }

    /// Releases the origin, if one is set up.
    pub(crate) fn reset(&mut self) {
        if self.active {
            // SAFETY: releases the origin set up by `setup`.
            unsafe {
                pg_sys::replorigin_session_reset();
                pg_sys::replorigin_session_origin = pg_sys::InvalidRepOriginId as pg_sys::RepOriginId;
                pg_sys::replorigin_session_origin_timestamp = 0;
                pg_sys::replorigin_session_origin_lsn = 0;
            }
            self.active = false;
        }
    }
}
