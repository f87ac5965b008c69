//! Rows a freezing statement froze without a kept version.
//!
//! `VACUUM` and `CLUSTER` keep the versions of the rows they may freeze before they run (see
//! [`super::before_utility`]), under a snapshot of their own. A row committed after that
//! snapshot, but before the statement computes its freeze cutoff, may be frozen without a kept
//! version. So each such statement first opens a *freeze window* on each table: in
//! `trompe.freeze_windows`, from the oldest transaction its keeping pass may not see, with the
//! backend and statement that opened it.
//!
//! A frozen row with no kept version whose `xmin` is in a window reads its version from its
//! commit timestamp: that transaction is recent, so its raw `xmin` is exact, and PostgreSQL
//! truncates commit timestamps only once every table of every database is frozen past it.
//! When the statement has ended, the versions of the rows it froze in the window are kept and
//! the window is closed: by the same backend right after the statement ([`close_own`]), or by
//! the worker for a statement that failed or whose backend ended ([`close_ended`]).

use std::cell::Cell;

use pgrx::prelude::*;

use crate::run_as::as_extension_owner;

thread_local! {
    /// Whether this backend opened a freeze window that it has not closed yet.
    static OPENED_HERE: Cell<bool> = const { Cell::new(false) };
}

/// Opens a freeze window on table `relid` for the statement this backend runs: from the oldest
/// transaction the current snapshot does not see as ended.
pub(super) fn open(relid: pg_sys::Oid) -> Result<(), String> {
    as_extension_owner(|| {
        crate::sql::execute(
            "INSERT INTO trompe.freeze_windows (relid, since, pid, backend_start, query_start)
             SELECT $1::oid, pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot()),
                    a.pid, a.backend_start, a.query_start
               FROM pg_catalog.pg_stat_activity a
              WHERE a.pid = pg_catalog.pg_backend_pid()
             ON CONFLICT DO NOTHING",
            &[Some(&relid.to_u32().to_string())],
        )
    })?;
    OPENED_HERE.with(|o| o.set(true));
    Ok(())
}

/// The statement that opened freeze windows in this backend has ended: keeps the versions of
/// the rows it froze in them, and closes them.
pub fn close_own() -> Result<(), String> {
    if !OPENED_HERE.with(Cell::get) {
        return Ok(());
    }
    close_where("w.pid = pg_catalog.pg_backend_pid()")?;
    OPENED_HERE.with(|o| o.set(false));
    Ok(())
}

/// Closes the freeze windows of statements that no longer run (they failed, or their backend
/// ended), after keeping the versions of the rows they froze.
pub(super) fn close_ended() -> Result<(), String> {
    close_where(
        "NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a
                      WHERE a.pid = w.pid AND a.backend_start = w.backend_start
                        AND a.query_start = w.query_start AND a.state = 'active')",
    )
}

/// Closes the freeze windows `condition` (over `trompe.freeze_windows w`) selects.
fn close_where(condition: &str) -> Result<(), String> {
    let windows = as_extension_owner(|| {
        crate::sql::rows(
            &format!(
                "SELECT w.relid::oid::text, w.since::text, w.pid::text, w.backend_start::text, w.query_start::text
                   FROM trompe.freeze_windows w WHERE {condition} ORDER BY w.relid, w.since"
            ),
            &[],
        )
    })?;
    let mut swept: Vec<u32> = Vec::new();
    for window in &windows {
        let text = |i: usize| window.get(i).cloned().flatten().unwrap_or_default();
        let relid = text(0).parse::<u32>().map_err(|e| format!("a freeze window's table: {e}"))?;
        if !swept.contains(&relid) {
            // Ordered by `since`: the first window of a table is its oldest.
            let since = text(1).parse::<u64>().map_err(|e| format!("a freeze window's start: {e}"))?;
            keep_frozen_since(pg_sys::Oid::from(relid), since)?;
            swept.push(relid);
        }
        as_extension_owner(|| {
            crate::sql::execute(
                "DELETE FROM trompe.freeze_windows
                  WHERE relid = $1::oid AND since = $2::xid8 AND pid = $3::int
                    AND backend_start = $4::timestamptz AND query_start = $5::timestamptz",
                &[Some(&text(0)), Some(&text(1)), Some(&text(2)), Some(&text(3)), Some(&text(4))],
            )
        })?;
    }
    Ok(())
}

/// Keeps the versions of the frozen rows of table `relid` written from transaction `since` on
/// (none if the table is gone, no longer replicated, or not frozen that far).
fn keep_frozen_since(relid: pg_sys::Oid, since: u64) -> Result<(), String> {
    if !crate::catalog::is_replicated(relid)? {
        return Ok(());
    }
    let since_age = format!("pg_catalog.age(pg_catalog.xid('{since}'::xid8))");
    let frozen_age =
        format!("(SELECT pg_catalog.age(c.relfrozenxid) FROM pg_catalog.pg_class c WHERE c.oid = {})", relid.to_u32());
    let frozen_past_since =
        as_extension_owner(|| crate::sql::flag(&format!("SELECT coalesce({frozen_age} < {since_age}, false)"), &[]))?;
    if frozen_past_since {
        let condition = format!("pg_catalog.age(t.xmin) <= {since_age} AND pg_catalog.age(t.xmin) > {frozen_age}");
        super::keep::keep(relid, "t.xmin", &condition, true)?;
    }
    Ok(())
}

/// Whether a frozen row's raw `xmin`, `raw`, is in a freeze window that starts at `since` (a
/// full transaction id): then its commit timestamp tells its version.
pub(super) fn in_window(raw: u32, since: Option<u64>) -> bool {
    let Some(since) = since else { return false };
    // SAFETY: a shared read of the next transaction id.
    let next = unsafe { pg_sys::ReadNextFullTransactionId().value };
    trompe_core::committime::widen(raw, next) >= since
}
