//! Pruning of conflict-resolution state: resolved conflicts after `trompe.conflict_retention`,
//! tombstones of deleted rows after `trompe.tombstone_retention`, records of large-object
//! copies that were unlinked. Run by the worker.

use crate::sql;

/// Rows deleted per statement, so that pruning a large backlog never holds long locks.
const BATCH: i64 = 10_000;

/// How long the worker waits between two prunings: a tenth of the shorter retention, at
/// least a second and at most a minute.
pub fn interval_ms() -> i64 {
    let shorter = crate::guc::CONFLICT_RETENTION_S.get().min(crate::guc::TOMBSTONE_RETENTION_S.get());
    (i64::from(shorter) * 100).clamp(1_000, 60_000)
}

/// What one pruning did.
pub struct Pruned {
    /// Whether a batch was full, so more may remain.
    pub more: bool,
    /// Whether tombstones were deleted (cached facts about them must be refreshed after
    /// commit).
    pub tombstones: bool,
}

/// Deletes one batch of expired conflicts and tombstones. It gives way to anyone holding a lock
/// it needs: it waits at most 100 ms for a lock and is simply tried again at the next interval.
/// Without this, `DROP EXTENSION` (which locks trompe's tables in another order) could deadlock
/// with it and be the one cancelled.
pub fn prune() -> Result<Pruned, String> {
    sql::execute("SELECT pg_catalog.set_config('lock_timeout', '100ms', true)", &[])?;
    let conflicts = sql::execute(
        "DELETE FROM trompe.conflicts WHERE id IN (
             SELECT id FROM trompe.conflicts WHERE at < now() - make_interval(secs => $1::int)
             ORDER BY at LIMIT $2::bigint)",
        &[Some(&crate::guc::CONFLICT_RETENTION_S.get().to_string()), Some(&BATCH.to_string())],
    )?;
    // A tombstone's age is its own commit time; one without (frozen) is old by definition.
    let tombstones = sql::execute(
        "DELETE FROM trompe.tombstones WHERE ctid = ANY (ARRAY(
             SELECT ctid FROM trompe.tombstones
             WHERE coalesce(pg_xact_commit_timestamp(xmin) < now() - make_interval(secs => $1::int), true)
             LIMIT $2::bigint))",
        &[Some(&crate::guc::TOMBSTONE_RETENTION_S.get().to_string()), Some(&BATCH.to_string())],
    )?;
    crate::ddl_history::prune(i64::from(crate::guc::TOMBSTONE_RETENTION_S.get()) * 1000)?;
    // Copies of large objects that were unlinked here.
    if crate::large_objects::available() {
        sql::execute(
            "DELETE FROM trompe.large_objects m
              WHERE NOT EXISTS (SELECT 1 FROM pg_largeobject_metadata l WHERE l.oid = m.local_oid)",
            &[],
        )?;
    }
    Ok(Pruned { more: conflicts as i64 == BATCH || tombstones as i64 == BATCH, tombstones: tombstones > 0 })
}
