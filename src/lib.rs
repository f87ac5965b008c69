//! trompe: asynchronous multi-master replication inside PostgreSQL.
//!
//! Row triggers (Rust) and an event trigger capture every change of a replicated table into a
//! log in the same transaction; a background worker per database pulls every peer's log over
//! libpq and applies it in-process, exactly once and in order.

use pgrx::prelude::*;

pub mod capture;
pub mod catalog;
pub mod commit_time_cache;
pub mod compare;
pub mod conflicts;
pub mod consumers;
pub mod ddl_history;
pub mod ddl_settings;
pub mod error;
pub mod exceptions;
pub mod guc;
pub mod join;
pub mod large_objects;
pub mod libpq;
pub mod log;
pub mod marker_writes;
pub mod node;
pub mod notices;
pub mod origins;
pub mod peer_calls;
pub mod peer_ddl;
pub mod peers;
pub mod pg_compat;
pub mod pg_list;
pub mod retention;
pub mod row_versions;
pub mod run_as;
pub mod sequences;
pub mod session;
pub mod setval;
pub mod shmem;
pub mod sql;
pub mod status;
pub mod sync;
pub mod tables;
pub mod utility_hook;
pub mod worker;

#[cfg(any(test, feature = "pg_test"))]
mod tests;

::pgrx::pg_module_magic!(name, version);

pgrx::extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
pgrx::extension_sql_file!("../sql/compare.sql", name = "compare", requires = ["bootstrap"]);
pgrx::extension_sql_file!("../sql/large_objects.sql", name = "large_objects", requires = ["bootstrap"]);
pgrx::extension_sql_file!("../sql/join.sql", name = "join", requires = ["bootstrap"]);
pgrx::extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

/// Library initialisation: settings and hooks always; shared memory and the supervisor worker
/// only when loaded through `shared_preload_libraries`.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::define();
    utility_hook::install();
    setval::install();
    // SAFETY: reading a global set by the postmaster while it loads preloaded libraries.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        guc::define_preloaded();
        shmem::request();
        worker::supervisor::register();
    }
    // SAFETY: called once while the library loads, after every trompe.* setting is defined:
    // a misspelt one (in postgresql.conf or SET) is then reported instead of kept silently.
    unsafe { pg_sys::MarkGUCPrefixReserved(c"trompe".as_ptr()) };
}

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'trompe'", "track_commit_timestamp = on"]
    }
}
