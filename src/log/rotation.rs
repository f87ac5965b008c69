//! Which log table writers append to, and the rotation that keeps the log small without ever
//! deleting from it: writers switch to the next table every `trompe.log_rotation_interval`,
//! and a table that is no longer current is truncated once every consumer has confirmed
//! everything in it.

use std::sync::atomic::Ordering;

use pgrx::prelude::*;
use trompe_core::snapshot::Snapshot;

use crate::error::TrompeError;
use crate::log::writer::as_extension_owner;
use crate::log::LOG_SLOTS;
use crate::shmem::{shared, DbSlot};

fn read_current_slot() -> Result<usize, TrompeError> {
    let slot = as_extension_owner(|| {
        Spi::get_one::<i32>("SELECT slot FROM trompe.log_rotation WHERE is_current")
    })
    .map_err(|e| TrompeError::Internal(format!("reading trompe.log_rotation: {e}")))?
    .ok_or_else(|| TrompeError::Internal("trompe.log_rotation has no current log table".into()))?;
    usize::try_from(slot)
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
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT slot, is_current, retired_below::text, (extract(epoch FROM now() - switched_at) * 1000)::int8
               FROM trompe.log_rotation ORDER BY slot",
            None,
            &[],
        )?;
        let mut out = Vec::new();
        for row in rows {
            out.push(SlotRow {
                slot: row.get::<i32>(1)?.unwrap_or(0) as usize,
                is_current: row.get::<bool>(2)?.unwrap_or(false),
                retired_below: row.get::<String>(3)?.and_then(|t| t.parse().ok()),
                age_ms: row.get::<i64>(4)?.unwrap_or(0),
            });
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .map_err(|e| e.to_string())
}

fn table_is_empty(slot: usize) -> Result<bool, String> {
    Spi::get_one::<bool>(&format!(
        "SELECT NOT EXISTS (SELECT 1 FROM trompe.log_{slot})"
    ))
    .map(|v| v.unwrap_or(false))
    .map_err(|e| e.to_string())
}

/// The smallest xmin over every consumer's confirmed position and this node's current
/// snapshot: every transaction below it has finished and every consumer has applied it.
fn confirmed_horizon() -> Result<u64, String> {
    let now: Snapshot = Spi::get_one::<String>("SELECT pg_current_snapshot()::text")
        .map_err(|e| e.to_string())?
        .ok_or("no snapshot")?
        .parse()
        .map_err(|e: trompe_core::snapshot::SnapshotError| e.to_string())?;
    let mut horizon = now.xmin;
    let confirmed: Vec<String> = Spi::connect(|client| {
        let rows = client.select("SELECT confirmed FROM trompe.consumers", None, &[])?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row.get::<String>(1)?.unwrap_or_default());
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .map_err(|e| e.to_string())?;
    for text in confirmed {
        match text.parse::<Snapshot>() {
            Ok(s) => horizon = horizon.min(s.xmin),
            Err(_) => return Ok(0),
        }
    }
    Ok(horizon)
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
    let horizon = confirmed_horizon()?;
    for row in rows.iter().filter(|r| !r.is_current) {
        match row.retired_below {
            // Writers switched away in an earlier round: any transaction that could still
            // write here has an id below the next one to be assigned now.
            None => {
                Spi::run_with_args(
                    "UPDATE trompe.log_rotation SET retired_below = pg_snapshot_xmax(pg_current_snapshot()) WHERE slot = $1",
                    &[(row.slot as i32).into()],
                )
                .map_err(|e| e.to_string())?;
            }
            Some(below) if below <= horizon && !table_is_empty(row.slot)? => {
                // lock_timeout: never queue behind a reader; try again next round.
                Spi::run(&format!(
                    "SET LOCAL lock_timeout = '50ms'; TRUNCATE trompe.log_{}",
                    row.slot
                ))
                .map_err(|e| e.to_string())?;
            }
            _ => {}
        }
    }
    let current_row = rows
        .iter()
        .find(|r| r.slot == current)
        .ok_or("no current row")?;
    let next = (current + 1) % LOG_SLOTS;
    let next_row = rows.iter().find(|r| r.slot == next).ok_or("no next row")?;
    let next_free = next_row.retired_below.is_some() && table_is_empty(next)?;
    if current_row.age_ms >= crate::guc::LOG_ROTATION_MS.get() as i64
        && next_free
        && !table_is_empty(current)?
    {
        Spi::run_with_args(
            "UPDATE trompe.log_rotation SET is_current = (slot = $1), switched_at = now(),
                    retired_below = CASE WHEN slot = $1 THEN retired_below ELSE NULL END
              WHERE slot IN ($1, $2)",
            &[(next as i32).into(), (current as i32).into()],
        )
        .map_err(|e| e.to_string())?;
        db.log_slot.store(-1, Ordering::Release);
    }
    Ok(())
}
