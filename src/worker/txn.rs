//! Running work in a transaction of the worker, turning any PostgreSQL error into a message
//! and rolling the transaction back (pgrx's `BackgroundWorker::transaction` would commit).

use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::PgTryBuilder;

/// The message of a caught error, with its detail.
pub fn message_of(e: &CaughtError) -> String {
    let report = match e {
        CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r,
        CaughtError::RustPanic { ereport, .. } => ereport,
    };
    match report.detail() {
        Some(d) if !d.is_empty() => format!("{} ({d})", report.message()),
        _ => report.message().to_string(),
    }
}

/// Runs `f` in a new transaction and commits it; on an error (raised or returned) rolls back
/// and returns the message.
pub fn in_transaction<R>(f: impl FnOnce() -> Result<R, String>) -> Result<R, String> {
    // SAFETY: starts a transaction in the worker, outside any other transaction.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let result = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
        let value = f()?;
        // SAFETY: pops the snapshot pushed above and commits; a failing commit raises an
        // error that is caught below.
        unsafe {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        }
        Ok(value)
    }))
    .catch_others(|e| Err(message_of(&e)))
    .execute();
    if result.is_err() {
        // SAFETY: rolls back whatever transaction state is left (SPI, snapshots, locks).
        unsafe { pg_sys::AbortCurrentTransaction() };
    }
    result
}
