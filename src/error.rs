//! trompe's errors: one enum, each variant with the SQLSTATE a client sees.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

/// Every error trompe raises on purpose. Messages name the object at fault; none contains a
/// password.
#[derive(Debug, thiserror::Error)]
pub enum TrompeError {
    /// The library is not in `shared_preload_libraries`, so there is no shared memory or worker.
    #[error("trompe is not loaded through shared_preload_libraries")]
    NotPreloaded,
    /// A table to replicate has no primary key.
    #[error("table {0} has no primary key")]
    NoPrimaryKey(String),
    /// The DDL would remove the primary key of a replicated table.
    #[error("cannot remove the primary key of replicated table {0}")]
    DropPrimaryKey(String),
    /// Temporary or unlogged tables cannot be replicated.
    #[error("table {table} is {kind}; only permanent tables can be replicated")]
    NotPermanent {
        /// The table.
        table: String,
        /// "temporary" or "unlogged".
        kind: &'static str,
    },
    /// The DDL would disable or remove trompe's capture triggers on a replicated table.
    #[error("cannot disable or remove the capture triggers of replicated table {0}")]
    CaptureDisabled(String),
    /// The DDL would make a replicated table unlogged.
    #[error("cannot make replicated table {0} unlogged")]
    MadeUnlogged(String),
    /// Only ordinary tables can be replicated.
    #[error("{name} is {kind}, not an ordinary table")]
    NotATable {
        /// The relation.
        name: String,
        /// What it is instead.
        kind: &'static str,
    },
    /// A schema given by name does not exist.
    #[error("schema \"{0}\" does not exist")]
    NoSuchSchema(String),
    /// trompe's own schema or a system schema cannot be replicated.
    #[error("schema \"{0}\" cannot be replicated")]
    ReservedSchema(String),
    /// Something in trompe's own state is not as it must be.
    #[error("trompe internal error: {0}")]
    Internal(String),
}

impl TrompeError {
    /// The SQLSTATE of this error.
    pub fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            TrompeError::NotPreloaded => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            TrompeError::NoPrimaryKey(_) | TrompeError::DropPrimaryKey(_) => {
                ERRCODE_INVALID_TABLE_DEFINITION
            }
            TrompeError::NotPermanent { .. } | TrompeError::MadeUnlogged(_) => {
                ERRCODE_FEATURE_NOT_SUPPORTED
            }
            TrompeError::CaptureDisabled(_) => ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
            TrompeError::NotATable { .. } => ERRCODE_WRONG_OBJECT_TYPE,
            TrompeError::NoSuchSchema(_) => ERRCODE_INVALID_SCHEMA_NAME,
            TrompeError::ReservedSchema(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            TrompeError::Internal(_) => ERRCODE_INTERNAL_ERROR,
        }
    }

    /// A hint for the user, where there is a useful one.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            TrompeError::NotPreloaded => {
                Some("Add trompe to shared_preload_libraries in postgresql.conf and restart the server.")
            }
            TrompeError::NoPrimaryKey(_) => Some("Add a primary key to the table, then replicate it."),
            TrompeError::DropPrimaryKey(_) | TrompeError::CaptureDisabled(_) => {
                Some("Stop replicating the table with trompe.remove_table() first, or keep a primary key on it.")
            }
            _ => None,
        }
    }

    /// Raises this error as a PostgreSQL ERROR; never returns.
    pub fn raise(self) -> ! {
        let mut report = ErrorReport::new(self.sqlstate(), self.to_string(), "trompe");
        if let Some(h) = self.hint() {
            report = report.set_hint(h);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("ereport(ERROR) returned")
    }
}

/// Unwraps a result, raising the error as a PostgreSQL ERROR.
pub trait OrRaise<T> {
    /// The value, or the error raised.
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for Result<T, TrompeError> {
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => e.raise(),
        }
    }
}
