//! The background workers: a supervisor per server that starts one worker per database with
//! trompe, and that worker, which pulls every peer and applies its changes.

pub mod apply;
pub mod control;
pub mod dbguard;
pub mod engine;
pub mod link;
pub mod progress;
pub mod spool;
pub mod supervisor;
pub mod toplevel;
pub mod txn;

use pgrx::prelude::*;

/// Called at the end of CREATE EXTENSION: starts this database's worker once the creating
/// transaction commits, or says that it cannot run.
#[pg_extern(volatile, parallel_unsafe)]
fn _on_create() {
    if crate::shmem::shared().is_none() {
        pgrx::notice!(
            "trompe is not in shared_preload_libraries: changes are captured, but nothing is replicated until it is added and the server restarted"
        );
        return;
    }
    control::launch_worker_on_commit();
}
