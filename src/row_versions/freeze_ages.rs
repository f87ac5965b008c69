//! The transaction ages from which vacuum freezes rows, as the server's settings have them.

extern "C" {
    /// postmaster/autovacuum.h: the `autovacuum_freeze_max_age` setting.
    static autovacuum_freeze_max_age: std::ffi::c_int;
}

/// The age from which vacuum freezes rows as this session's settings have it:
/// `vacuum_freeze_min_age`, capped (as vacuum caps it) at half of `autovacuum_freeze_max_age`.
pub(super) fn freeze_min_age() -> i32 {
    // SAFETY: reads the GUCs' backend-local variables.
    unsafe { pgrx::pg_sys::vacuum_freeze_min_age.min(autovacuum_freeze_max_age / 2) }
}

/// Half of `autovacuum_freeze_max_age` (a server-wide setting): a frozen row younger than that
/// reads its commit timestamp (see `TableVersions::row_version`), and the worker keeps every
/// row's version before it gets that old (from half of the freeze age, at most a quarter of it).
pub(super) fn trusted_age() -> i32 {
    // SAFETY: reads a GUC's variable, set at server start.
    unsafe { autovacuum_freeze_max_age / 2 }
}
