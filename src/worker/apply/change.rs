//! One change from a peer's log, as apply takes it.

use trompe_core::changeset::ChangeRecord;

/// One change from a peer's log: the decoded change and what its log row says about its
/// transaction. Reads as the decoded change (`change.nsp`, `change.cols`, ...).
#[derive(Debug, Clone)]
pub struct Change {
    /// The log id of the last log row of its transaction.
    pub txn_last: i64,
    /// Commit time of its transaction at the origin (PostgreSQL TimestampTz).
    pub commit_us: i64,
    /// The change as decoded from the log.
    pub record: ChangeRecord,
}

impl Change {
    /// Its position in its transaction at the origin.
    pub fn id(&self) -> i64 {
        self.record.seq as i64
    }
}

impl std::ops::Deref for Change {
    type Target = ChangeRecord;

    fn deref(&self) -> &ChangeRecord {
        &self.record
    }
}
