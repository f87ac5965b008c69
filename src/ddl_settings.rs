//! The session settings that travel with replicated DDL (the list and the log format are in
//! `trompe_core::ddlsettings`): read where the statement runs, set while a peer replays it,
//! and put back to the worker's own afterwards.

use std::ffi::{CStr, CString};

use pgrx::pg_sys;
use trompe_core::ddlsettings::REPLAYED;

/// The current value of every setting of [`REPLAYED`], as PostgreSQL reads it back.
pub fn current() -> Vec<(&'static str, String)> {
    let mut out = Vec::with_capacity(REPLAYED.len());
    for name in REPLAYED {
        let c_name = cstring(name);
        // SAFETY: looks a setting up by name (missing_ok: NULL if unknown); the value is copied
        // before anything can change it.
        let value = unsafe {
            let v = pg_sys::GetConfigOption(c_name.as_ptr(), true, false);
            (!v.is_null()).then(|| CStr::from_ptr(v).to_string_lossy().into_owned())
        };
        if let Some(value) = value {
            out.push((*name, value));
        }
    }
    out
}

/// Settings set for one replayed statement inside a transaction; [`StatementSettings::end`]
/// puts the previous values back. An error before that rolls them back with the transaction.
#[must_use = "end() puts the worker's own settings back"]
pub struct StatementSettings {
    level: i32,
}

/// Sets `settings` (name, value) until [`StatementSettings::end`], as a function's `SET` clause
/// does. A value this server refuses raises its error.
pub fn set_for_statement(settings: &[(&str, &str)]) -> StatementSettings {
    // SAFETY: opens a GUC nest level, which `end` (or the transaction's abort) closes.
    let level = unsafe { pg_sys::NewGUCNestLevel() };
    for (name, value) in settings {
        set(name, Some(value), pg_sys::GucAction::GUC_ACTION_SAVE);
    }
    StatementSettings { level }
}

impl StatementSettings {
    /// Puts back the values from before [`set_for_statement`].
    pub fn end(self) {
        // SAFETY: closes the nest level opened by set_for_statement, keeping what was set
        // outside it and restoring what was set inside.
        unsafe { pg_sys::AtEOXact_GUC(true, self.level) };
    }
}

/// Sets `settings` for the session, for a statement that runs as a top-level command of its
/// own (it commits transactions itself); [`reset_session`] undoes it.
pub fn set_for_session(settings: &[(&str, &str)]) {
    for (name, value) in settings {
        set(name, Some(value), pg_sys::GucAction::GUC_ACTION_SET);
    }
}

/// Resets `settings` to the worker's defaults (`RESET name`), after [`set_for_session`].
pub fn reset_session(settings: &[(&str, &str)]) {
    for (name, _) in settings {
        set(name, None, pg_sys::GucAction::GUC_ACTION_SET);
    }
}

fn set(name: &str, value: Option<&str>, action: pg_sys::GucAction::Type) {
    let c_name = cstring(name);
    let c_value = value.map(cstring);
    // SAFETY: sets a setting as SET would (raising an error for a value this server refuses);
    // the strings outlive the call, which copies them.
    unsafe {
        let context = if pg_sys::superuser() { pg_sys::GucContext::PGC_SUSET } else { pg_sys::GucContext::PGC_USERSET };
        pg_sys::set_config_option(
            c_name.as_ptr(),
            c_value.as_ref().map_or(std::ptr::null(), |v| v.as_ptr()),
            context,
            pg_sys::GucSource::PGC_S_SESSION,
            action,
            true,
            pgrx::PgLogLevel::ERROR as i32,
            false,
        );
    }
}

fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', "")).unwrap_or_default()
}
