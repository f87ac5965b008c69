//! Which log table writers append to, and the rotation that keeps the log small without ever
//! deleting from it: writers switch to the next table every `trompe.log_rotation_interval`,
//! and a table that is no longer current is truncated once every consumer has confirmed
//! everything in it. Past `trompe.max_log_size`, the consumers that hold back the oldest table
//! are marked lost (they must join again) and no longer hold anything back.

use std::sync::atomic::Ordering;

use pgrx::pg_sys;
use trompe_core::nodeid::NodeId;
use trompe_core::snapshot::Snapshot;

use crate::error::TrompeError;
use crate::log::LOG_SLOTS;
use crate::run_as::as_extension_owner;
use crate::shmem::{shared, DbSlot};
use crate::sql;

fn read_current_slot() -> Result<usize, TrompeError> {
    let slot = as_extension_owner(|| sql::value("SELECT slot FROM trompe.log_rotation WHERE is_current", &[]))
        .map_err(|e| TrompeError::Internal(format!("reading trompe.log_rotation: {e}")))?
        .ok_or_else(|| TrompeError::Internal("trompe.log_rotation has no current log table".into()))?;
    slot.parse::<usize>()
        .ok()
        .filter(|s| *s < LOG_SLOTS)
        .ok_or_else(|| TrompeError::Internal(format!("trompe.log_rotation names log table {slot}")))
}

/// The log table new transactions append to (from shared memory when the worker published it).
pub fn current_slot() -> Result<usize, TrompeError> {
    // SAFETY: MyDatabaseId is a backend-local global.
    let db = shared().and_then(|s| s.db_slot(unsafe { pg_sys::MyDatabaseId }));
    if let Some(db) = db {
        let v = db.log_slot.load(Ordering::Acquire);
        if (0..LOG_SLOTS as i32).contains(&v) {
            return Ok(v as usize);
        }
    }
    read_current_slot()
}

struct SlotRow {
    slot: usize,
    is_current: bool,
    retired_below: Option<u64>,
    age_ms: i64,
}

fn slot_rows() -> Result<Vec<SlotRow>, String> {
    let rows = sql::rows(
        "SELECT slot, is_current, retired_below, (extract(epoch FROM now() - switched_at) * 1000)::int8
           FROM trompe.log_rotation ORDER BY slot",
        &[],
    )?;
    Ok(rows
        .into_iter()
        .map(|r| SlotRow {
            slot: r[0].as_deref().and_then(|v| v.parse().ok()).unwrap_or(0),
            is_current: r[1].as_deref() == Some("t"),
            retired_below: r[2].as_deref().and_then(|v| v.parse().ok()),
            age_ms: r[3].as_deref().and_then(|v| v.parse().ok()).unwrap_or(0),
        })
        .collect())
}

fn table_is_empty(slot: usize) -> Result<bool, String> {
    sql::flag(&format!("SELECT NOT EXISTS (SELECT 1 FROM trompe.log_{slot})"), &[])
}

/// The newest transaction with changes in log table `slot` (an index-only scan), if any.
fn newest_transaction(slot: usize) -> Result<Option<u64>, String> {
    Ok(sql::value(&format!("SELECT max(txid) FROM trompe.log_{slot}"), &[])?.and_then(|t| t.parse().ok()))
}

/// The smallest xmin over every consumer's confirmed position: every consumer has applied
/// every transaction below it (u64::MAX without consumers). Saves positions consumers
/// confirmed through shared memory into `trompe.consumers` on the way.
fn confirmed_horizon() -> Result<u64, String> {
    let mut horizon = u64::MAX;
    let query = if crate::consumers::lost_installed() {
        "SELECT node_id, confirmed FROM trompe.consumers WHERE lost_at IS NULL"
    } else {
        "SELECT node_id, confirmed FROM trompe.consumers"
    };
    for r in sql::rows(query, &[])? {
        let (Some(node), Some(stored)) = (r[0].as_deref(), r[1].as_deref()) else {
            return Ok(0);
        };
        let Ok(id) = node.parse::<NodeId>() else {
            return Ok(0);
        };
        let confirmed = crate::consumers::effective_confirmed(&id.0, stored);
        if confirmed != stored {
            sql::execute(
                "UPDATE trompe.consumers SET confirmed = $2, confirmed_at = now() WHERE node_id = $1::uuid",
                &[Some(node), Some(&confirmed)],
            )?;
        }
        match confirmed.parse::<Snapshot>() {
            Ok(s) => horizon = horizon.min(s.xmin),
            Err(_) => return Ok(0),
        }
    }
    Ok(horizon)
}

/// The size of the log tables together, in bytes.
fn log_size() -> Result<i64, String> {
    let parts: Vec<String> = (0..LOG_SLOTS).map(|s| format!("pg_total_relation_size('trompe.log_{s}')")).collect();
    sql::value(&format!("SELECT ({})::text", parts.join(" + ")), &[])?
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| "the size of the log is unknown".to_string())
}

/// Past `trompe.max_log_size`: marks lost every consumer that has not confirmed all of the
/// oldest retired log table (one nobody writes to any more), so that it can be truncated. A
/// lost consumer's pulls are refused (SQLSTATE 53400) until it registers anew (joins again).
fn mark_laggards(rows: &[SlotRow], xmin: u64) -> Result<(), String> {
    let max_mb = crate::guc::MAX_LOG_SIZE_MB.get();
    if max_mb < 0 || !crate::consumers::lost_installed() {
        return Ok(());
    }
    let size = log_size()?;
    if size <= max_mb as i64 * 1024 * 1024 {
        return Ok(());
    }
    let mut retired: Vec<&SlotRow> =
        rows.iter().filter(|r| !r.is_current && r.retired_below.is_some_and(|b| b <= xmin)).collect();
    retired.sort_by_key(|r| r.retired_below);
    let mut oldest_newest = None;
    for r in retired {
        oldest_newest = newest_transaction(r.slot)?;
        if oldest_newest.is_some() {
            break;
        }
    }
    let Some(newest) = oldest_newest else {
        return Ok(());
    };
    for r in sql::rows("SELECT node_id, name, confirmed FROM trompe.consumers WHERE lost_at IS NULL", &[])? {
        let (Some(node), Some(name), Some(stored)) = (r[0].as_deref(), r[1].as_deref(), r[2].as_deref()) else {
            continue;
        };
        let Ok(id) = node.parse::<NodeId>() else { continue };
        let confirmed = crate::consumers::effective_confirmed(&id.0, stored);
        if confirmed.parse::<Snapshot>().is_ok_and(|c| c.xmin > newest) {
            continue;
        }
        let reason = format!(
            "it fell behind while this node's change log grew past trompe.max_log_size ({max_mb} MB; it holds {} MB), \
             so the changes it had not applied are no longer kept for it and it must join again",
            size >> 20
        );
        sql::execute(
            "UPDATE trompe.consumers SET lost_at = now(), lost_reason = $2 WHERE node_id = $1::uuid",
            &[Some(node), Some(&reason)],
        )?;
        pgrx::warning!("trompe: consumer \"{name}\" (node {node}) marked lost: {reason}");
    }
    Ok(())
}

/// Takes an exclusive lock on log table `slot` (until the transaction ends) if nobody holds a
/// lock on it; never waits.
fn lock_if_free(slot: usize) -> Result<bool, String> {
    let relid = sql::value(&format!("SELECT 'trompe.log_{slot}'::regclass::oid"), &[])?
        .and_then(|v| v.parse::<u32>().ok())
        .ok_or_else(|| format!("trompe.log_{slot} does not exist"))?;
    // SAFETY: a conditional lock on an existing relation inside the current transaction,
    // released when it ends.
    Ok(unsafe {
        pg_sys::ConditionalLockRelationOid(pg_sys::Oid::from(relid), pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE)
    })
}

/// One round of log maintenance (inside a transaction of the worker): records when retired
/// tables stopped receiving writes, truncates retired tables every consumer has confirmed,
/// and switches writers to the next table when the current one is old enough.
pub fn maintain(db: &DbSlot) -> Result<(), String> {
    let rows = slot_rows()?;
    let Some(current) = rows.iter().find(|r| r.is_current).map(|r| r.slot) else {
        return Err("trompe.log_rotation has no current log table".into());
    };
    db.log_slot.store(current as i32, Ordering::Release);
    // Registering a consumer takes this lock: the consumers read below are all there are until
    // this transaction ends, or nothing is truncated this round.
    let may_truncate = crate::consumers::try_lock_registrations()?;
    let watermark = crate::consumers::logins_installed();
    let xmin = crate::sql::snapshot_now()?.xmin;
    if may_truncate {
        mark_laggards(&rows, xmin)?;
    }
    let horizon = confirmed_horizon()?;
    super::marks::prune(horizon)?;
    for row in rows.iter().filter(|r| !r.is_current) {
        let slot = row.slot.to_string();
        match row.retired_below {
            // Writers switched away in an earlier round: any transaction that could still
            // write here has an id below the next one to be assigned now.
            None => {
                sql::execute(
                    "UPDATE trompe.log_rotation SET retired_below = pg_snapshot_xmax(pg_current_snapshot())
                      WHERE slot = $1::int",
                    &[Some(&slot)],
                )?;
            }
            // Nobody can write here any more, and every consumer has applied all of it.
            // Only if the table is free right now: waiting for a reader would queue every pull
            // behind this TRUNCATE. Otherwise, again next round. The newest transaction
            // truncated is recorded: a node resuming from a position older than it may have
            // missed changes (see consumers::resume_consumer).
            Some(below) if may_truncate && below <= xmin => {
                let Some(newest) = newest_transaction(row.slot)?.filter(|newest| *newest < horizon) else {
                    continue;
                };
                if lock_if_free(row.slot)? {
                    sql::execute(&format!("TRUNCATE trompe.log_{}", row.slot), &[])?;
                    if watermark {
                        sql::execute(
                            "UPDATE trompe.log_rotation SET truncated_through = greatest(truncated_through, $2::xid8)
                              WHERE slot = $1::int",
                            &[Some(&slot), Some(&newest.to_string())],
                        )?;
                    }
                }
            }
            _ => {}
        }
    }
    let current_row = rows.iter().find(|r| r.slot == current).ok_or("no current row")?;
    let next = (current + 1) % LOG_SLOTS;
    let next_row = rows.iter().find(|r| r.slot == next).ok_or("no next row")?;
    let next_free = next_row.retired_below.is_some() && table_is_empty(next)?;
    if current_row.age_ms >= crate::guc::LOG_ROTATION_MS.get() as i64 && next_free && !table_is_empty(current)? {
        sql::execute(
            "UPDATE trompe.log_rotation SET is_current = (slot = $1::int), switched_at = now(),
                    retired_below = CASE WHEN slot = $1::int THEN retired_below ELSE NULL END
              WHERE slot IN ($1::int, $2::int)",
            &[Some(&next.to_string()), Some(&current.to_string())],
        )?;
        db.log_slot.store(-1, Ordering::Release);
    }
    Ok(())
}
