//! Running work in a transaction of the worker, turning any PostgreSQL error into a message
//! and rolling the transaction back (pgrx's `BackgroundWorker::transaction` would commit).

use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::{PgSqlErrorCode, PgTryBuilder};

/// A failed transaction: the error's message (with its detail) and SQLSTATE, if PostgreSQL
/// raised it.
#[derive(Debug, Clone)]
pub struct TxnError {
    /// What went wrong.
    pub message: String,
    /// The SQLSTATE of a PostgreSQL error.
    pub code: Option<PgSqlErrorCode>,
}

impl From<String> for TxnError {
    fn from(message: String) -> Self {
        TxnError { message, code: None }
    }
}

impl From<&str> for TxnError {
    fn from(message: &str) -> Self {
        TxnError { message: message.to_string(), code: None }
    }
}

/// The error PostgreSQL (or a Rust panic) raised, as a message with its SQLSTATE.
pub fn error_of(e: &CaughtError) -> TxnError {
    let report = match e {
        CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r,
        CaughtError::RustPanic { ereport, .. } => ereport,
    };
    let message = match report.detail() {
        Some(d) if !d.is_empty() => format!("{} ({d})", report.message()),
        _ => report.message().to_string(),
    };
    TxnError { message, code: Some(report.sql_error_code()) }
}

/// Runs `f` in a new transaction and commits it; on an error (raised or returned) rolls back
/// and returns it.
pub fn in_transaction_coded<R>(f: impl FnOnce() -> Result<R, TxnError>) -> Result<R, TxnError> {
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
    .catch_others(|e| Err(error_of(&e)))
    .execute();
    if result.is_err() {
        // SAFETY: rolls back whatever transaction state is left (SPI, snapshots, locks).
        unsafe { pg_sys::AbortCurrentTransaction() };
    }
    result
}

/// [`in_transaction_coded`] for work whose errors are plain messages.
pub fn in_transaction<R>(f: impl FnOnce() -> Result<R, String>) -> Result<R, String> {
    in_transaction_coded(|| f().map_err(TxnError::from)).map_err(|e| e.message)
}

/// Sends the table statistics of what the worker wrote (rows inserted, updated, deleted; scans)
/// to the cumulative statistics, as PostgreSQL's apply worker does: autovacuum and autoanalyze
/// see a table only through them, and a table only peers write would never be vacuumed or
/// analyzed. PostgreSQL flushes at most once a second and keeps what it holds back for a later
/// call. Does nothing inside a transaction (PostgreSQL requires one to have ended).
pub fn report_statistics() {
    // SAFETY: flushes this backend's pending statistics, between transactions only.
    unsafe {
        if !pg_sys::IsTransactionOrTransactionBlock() {
            pg_sys::pgstat_report_stat(false);
        }
    }
}
