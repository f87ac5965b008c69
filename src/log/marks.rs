//! Snapshot marks: snapshots of this node taken now and then while its log grows, so that a
//! consumer far behind catches up in steps of bounded size.
//!
//! A step of a pull runs from the consumer's position to a snapshot of this node, and its first
//! pull lists every transaction of the step (see `serve`). A consumer back from a long outage
//! would list its whole backlog before its first change: millions of transactions, seconds.
//! Instead, when its position is more than [`STEP_XIDS`] transaction ids behind, its step ends
//! at a recorded mark: a real snapshot of this node from back then, so every transaction that
//! committed after it is in a later step, exactly as with a snapshot taken now.

use std::cell::Cell;
use std::sync::atomic::Ordering;

use trompe_core::snapshot::Snapshot;

use crate::shmem::DbSlot;
use crate::sql;

/// A consumer whose position is more transaction ids behind this node's current snapshot than
/// this is given a step that ends at a mark; the step aims at this many ids.
pub const STEP_XIDS: u64 = 10_000;

/// How often the worker records a mark while transactions write to the log: at 50,000
/// transactions a second, marks are 5,000 ids apart.
pub const MARK_EVERY_MS: i64 = 100;

thread_local! {
    /// The log commit counter when the worker last recorded a mark.
    static MARKED_AT: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Run by the worker every [`MARK_EVERY_MS`]: whether a transaction wrote to the log since the
/// last mark (then [`record`] is due), read without a transaction.
pub fn due(db: &DbSlot) -> bool {
    MARKED_AT.get() != Some(db.log_commits.load(Ordering::Acquire))
}

/// Records a mark: this node's current snapshot.
pub fn record(db: &DbSlot) -> Result<(), String> {
    let commits = db.log_commits.load(Ordering::Acquire);
    if installed()? {
        sql::execute("INSERT INTO trompe.snapshot_marks (snap) VALUES (pg_catalog.pg_current_snapshot())", &[])?;
    }
    MARKED_AT.set(Some(commits));
    Ok(())
}

/// Run by the worker with log maintenance: drops the marks no consumer can use any more (every
/// consumer's confirmed position, or this node's snapshot when there is no consumer, has all
/// their transactions ended: `horizon` is the lowest such `xmin`).
pub fn prune(horizon: u64) -> Result<(), String> {
    if !installed()? {
        return Ok(());
    }
    let horizon = if horizon == u64::MAX { sql::snapshot_now()?.xmin } else { horizon };
    sql::execute(
        "DELETE FROM trompe.snapshot_marks WHERE pg_catalog.pg_snapshot_xmax(snap) <= $1::xid8",
        &[Some(&horizon.to_string())],
    )?;
    Ok(())
}

/// Where the next step of a consumer at position `done` ends, if not at `now` (this node's
/// current snapshot): at the newest mark at most [`STEP_XIDS`] ids past `done`, or else at the
/// first mark past it; `None` when `done` is close to `now` or no mark lies between.
pub fn step_end(done: &Snapshot, now: &Snapshot) -> Result<Option<Snapshot>, String> {
    if now.xmax.saturating_sub(done.xmax) <= STEP_XIDS || !installed()? {
        return Ok(None);
    }
    let rows = sql::rows(
        "SELECT snap::text FROM trompe.snapshot_marks WHERE pg_catalog.pg_snapshot_xmax(snap) > $1::xid8
          ORDER BY id LIMIT 1000",
        &[Some(&done.xmax.to_string())],
    )?;
    let marks = rows.into_iter().filter_map(|r| r.first().cloned().flatten()?.parse::<Snapshot>().ok());
    Ok(trompe_core::snapshot::bounded_step_end(done, now, marks, STEP_XIDS))
}

/// Whether this database has the marks table (trompe 0.5.0 or later).
fn installed() -> Result<bool, String> {
    sql::flag("SELECT pg_catalog.to_regclass('trompe.snapshot_marks') IS NOT NULL", &[])
}
