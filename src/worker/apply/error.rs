//! Why a change could not be applied, with the SQLSTATE reported for it.

/// Why a change could not be applied; the message is shown in `trompe.status`.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A table the change is for does not exist here.
    #[error("table {0} does not exist on this node")]
    NoSuchTable(String),
    /// A table the change is for is not replicated here.
    #[error("table {0} is not replicated on this node")]
    NotReplicated(String),
    /// A column of the change does not exist here.
    #[error("column {column} of table {table} does not exist on this node")]
    NoSuchColumn {
        /// The table.
        table: String,
        /// The column.
        column: String,
    },
    /// The primary keys differ between the nodes.
    #[error("table {0} has a different primary key on this node than on the peer")]
    KeyMismatch(String),
    /// The change itself is malformed.
    #[error("malformed change {id}: {reason}")]
    Malformed {
        /// Its position.
        id: i64,
        /// What is wrong.
        reason: String,
    },
    /// PostgreSQL raised an error while applying.
    #[error("{0}")]
    Postgres(String),
    /// DDL the peer may not run here.
    #[error("DDL from the peer refused: {0}")]
    Refused(crate::peer_ddl::Refusal),
}

impl ApplyError {
    /// The SQLSTATE reported for it.
    pub fn code(&self) -> pgrx::PgSqlErrorCode {
        use pgrx::PgSqlErrorCode::*;
        match self {
            ApplyError::NoSuchTable(_) => ERRCODE_UNDEFINED_TABLE,
            ApplyError::NotReplicated(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            ApplyError::NoSuchColumn { .. } => ERRCODE_UNDEFINED_COLUMN,
            ApplyError::KeyMismatch(_) => ERRCODE_INVALID_TABLE_DEFINITION,
            ApplyError::Malformed { .. } => ERRCODE_DATA_CORRUPTED,
            ApplyError::Postgres(_) => ERRCODE_INTERNAL_ERROR,
            ApplyError::Refused(r) => r.code(),
        }
    }
}

impl From<ApplyError> for crate::worker::txn::TxnError {
    fn from(e: ApplyError) -> Self {
        crate::worker::txn::TxnError { code: Some(e.code()), message: e.to_string() }
    }
}
