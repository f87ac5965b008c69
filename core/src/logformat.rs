//! The change log's vocabulary: what kind of change a log entry records.

/// The kind of change one log entry records (the `op` column of `trompe.log`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// A row was inserted: `cols`/`vals` hold the new row.
    Insert,
    /// A row was updated: `cols`/`vals` hold the new row, `oldkey` the old primary key.
    Update,
    /// A row was deleted: `cols`/`oldkey` hold its primary key.
    Delete,
    /// A table was truncated: `vals` holds the options.
    Truncate,
    /// A DDL command: `vals` holds the command text, search_path, role, command tag and the
    /// session settings it ran with (see [`crate::ddlsettings`]).
    Ddl,
}

/// Why a log entry sent by a peer was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogFormatError {
    /// An `op` code trompe does not know.
    #[error("unknown change kind \"{0}\" in the peer's log")]
    UnknownOp(String),
}

impl Op {
    /// The one-letter code stored in the log.
    pub fn code(self) -> &'static str {
        match self {
            Op::Insert => "I",
            Op::Update => "U",
            Op::Delete => "D",
            Op::Truncate => "T",
            Op::Ddl => "S",
        }
    }

    /// Reads a one-letter code from the log.
    pub fn from_code(code: &str) -> Result<Op, LogFormatError> {
        match code {
            "I" => Ok(Op::Insert),
            "U" => Ok(Op::Update),
            "D" => Ok(Op::Delete),
            "T" => Ok(Op::Truncate),
            "S" => Ok(Op::Ddl),
            other => Err(LogFormatError::UnknownOp(other.chars().take(16).collect())),
        }
    }

    /// True for changes to single rows.
    pub fn is_row_change(self) -> bool {
        matches!(self, Op::Insert | Op::Update | Op::Delete)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for op in [Op::Insert, Op::Update, Op::Delete, Op::Truncate, Op::Ddl] {
            assert_eq!(Op::from_code(op.code()), Ok(op));
        }
        assert!(Op::from_code("X").is_err());
        assert!(Op::from_code("").is_err());
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn codes_read_back_and_anything_else_is_refused(code in "\\PC{0,4}") {
            match Op::from_code(&code) {
                Ok(op) => prop_assert_eq!(op.code(), code.as_str()),
                Err(LogFormatError::UnknownOp(shown)) => prop_assert!(shown.chars().count() <= 16),
            }
        }
    }

    #[test]
    fn every_op_reads_back_from_its_code() {
        for op in [Op::Insert, Op::Update, Op::Delete, Op::Truncate, Op::Ddl] {
            assert_eq!(Op::from_code(op.code()), Ok(op));
        }
    }
}
