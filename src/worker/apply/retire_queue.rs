//! The durable queue of rows retired by a unique collision: the apply transaction queues the
//! key, the worker logs the removal afterwards (see `retire`).

use std::cell::Cell;

use trompe_core::pgarray::format_text_array;

use super::error::ApplyError;
use super::table::Table;

thread_local! {
    /// Whether the queue may hold keys: true at start, so keys left by a crash are logged.
    static QUEUED: Cell<bool> = const { Cell::new(true) };
}

/// Whether this database's schema has the queue (0.4.0 and later).
pub(super) fn queue_exists() -> Result<bool, String> {
    crate::sql::relation_exists("trompe.retirements")
}

/// Inside the apply transaction that retired the row with `keys` of `table` (and wrote its
/// tombstone): queues its removal. Returns false if the schema predates the queue; the caller
/// then logs the removal in the apply transaction, as 0.3.0 did.
pub(super) fn queue(table: &Table, keys: &[Option<&str>]) -> Result<bool, ApplyError> {
    if !queue_exists().map_err(ApplyError::Postgres)? {
        return Ok(false);
    }
    crate::sql::execute(
        "INSERT INTO trompe.retirements (relid, key) VALUES ($1::oid, $2::text[])
         ON CONFLICT (relid, key) DO UPDATE SET key = EXCLUDED.key",
        &[Some(&table.relid.to_u32().to_string()), Some(&format_text_array(keys))],
    )
    .map_err(ApplyError::Postgres)?;
    QUEUED.set(true);
    Ok(true)
}

/// Whether keys may have been queued since the last call (and forgets it).
pub(super) fn take_queued() -> bool {
    QUEUED.replace(false)
}

/// Keys may be queued: the worker looks at the queue at its next round.
pub(super) fn mark_queued() {
    QUEUED.set(true);
}
