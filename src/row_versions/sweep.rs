//! Which rows of a table still need their versions kept before vacuum may freeze them, without
//! reading the version of every old row again each time.
//!
//! A row's `xmin` never changes, so once the versions of a table's rows written before some
//! transaction have been kept (or found too old to keep), they need not be looked at again:
//! `trompe.version_sweeps` holds that transaction per table (its *watermark*). The worker sweeps
//! a table when enough transactions have aged past half of its freeze age since its watermark
//! (see [`due`]), a slice of [`SLICE_BLOCKS`] blocks at a time, each in a transaction of its
//! own, between which the worker goes on replicating; `VACUUM` looks only at rows from the
//! watermark on. Each sweep still scans the table, but it reads the version only of the rows of
//! its band, and runs once per quarter of that half-age of transactions, not once a minute.

use pgrx::prelude::*;

use crate::run_as::as_extension_owner;

/// How many blocks of a table a slice of a sweep scans (8 MB with 8 kB blocks).
pub(super) const SLICE_BLOCKS: u32 = 1024;

/// The blocks `[start, end)` of a table one slice of a sweep scans.
pub(super) struct Slice {
    /// The first block.
    pub start: u32,
    /// The block after the last.
    pub end: u32,
}

impl Slice {
    /// The condition (over rows aliased `t`) selecting the rows of the slice's blocks: a TID
    /// range scan reads only those.
    pub fn condition(&self) -> String {
        format!("t.ctid >= '({},0)'::tid AND t.ctid < '({},0)'::tid", self.start, self.end)
    }
}

/// The slice of table `relid` from block `start` on, `None` past its last block (or if the
/// table is gone). Rows a sweep looks for do not move but by a rewrite (which keeps the versions
/// of every row from the watermark on first): blocks added meanwhile hold none of them.
pub(super) fn slice(relid: pg_sys::Oid, start: u32) -> Result<Option<Slice>, String> {
    // SAFETY: opens the relation to read its size; closed before returning.
    let blocks = unsafe {
        let rel = pg_sys::try_relation_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        if rel.is_null() {
            return Ok(None);
        }
        let blocks = pg_sys::RelationGetNumberOfBlocksInFork(rel, pg_sys::ForkNumber::MAIN_FORKNUM);
        pg_sys::relation_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        blocks
    };
    Ok((start < blocks).then(|| Slice { start, end: start.saturating_add(SLICE_BLOCKS).min(blocks) }))
}

/// SQL for the next transaction id (a full one, as `bigint`) of the running statement's
/// snapshot: evaluated once per statement.
const NEXT_XID: &str = "(SELECT pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())::text::bigint)";

/// SQL for the full transaction id of a row's `xmin` (rows aliased `t`): the latest one with
/// those low 32 bits not after the statement's next transaction id. (A frozen row more than
/// 2^32 transactions old reads as younger; such a row's version is unknown, kept or not.)
fn full_xmin() -> String {
    format!("({NEXT_XID} - (({NEXT_XID} - t.xmin::text::bigint) % 4294967296 + 4294967296) % 4294967296)")
}

/// The condition (over rows aliased `t`) selecting the rows at least `min_age` transactions
/// old whose `xmin` is from `from` on, and before `before` if given.
pub(super) fn band(min_age: i64, from: u64, before: Option<u64>) -> String {
    let xmin = full_xmin();
    let mut condition = format!("{xmin} >= {from} AND {xmin} <= {NEXT_XID} - {}", min_age.max(0));
    if let Some(before) = before {
        condition.push_str(&format!(" AND {xmin} < {before}"));
    }
    condition
}

/// The watermark of table `relid`: rows with an older `xmin` had their versions kept already
/// (0 when the table was never swept).
pub(super) fn watermark(relid: pg_sys::Oid) -> Result<u64, String> {
    let row = as_extension_owner(|| {
        crate::sql::row(
            "SELECT kept_below::text FROM trompe.version_sweeps WHERE relid = $1::oid",
            &[Some(&relid.to_u32().to_string())],
        )
    })?;
    Ok(row.and_then(|r| r.first().cloned().flatten()).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0))
}

/// A sweep of one table that is due: keep the versions of its rows at least `half` transactions
/// old from its watermark up to `target`, then move the watermark to `target`.
pub struct Sweep {
    /// The table.
    pub relid: pg_sys::Oid,
    /// Half of the table's freeze age: rows this old have their versions kept.
    pub half: i64,
    /// The table's watermark now.
    pub from: u64,
    /// Its watermark once swept: no later than the oldest transaction of this database still
    /// running (a row it writes must not fall below the watermark unseen), nor than `half`
    /// transactions ago.
    pub target: u64,
}

/// The next transaction id now (full), read before [`due`] reads which transactions run: any
/// transaction that gets its id afterwards is at least as new.
fn next_xid() -> Result<u64, String> {
    let row = crate::sql::row("SELECT pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())::text", &[])?;
    row.and_then(|r| r.first().cloned().flatten())
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| "reading the next transaction id".to_string())
}

/// The replicated tables due for a sweep, oldest watermark first: those never swept, and those
/// whose watermark is a quarter of their half freeze age (or more) behind where it could be.
/// `freeze_min_age` is the server's (a table's own `autovacuum_freeze_min_age`, when lower and
/// written in decimal, takes over; PostgreSQL also takes hexadecimal or octal ones, which fall
/// back to the server's setting here rather than fail for every table).
pub(super) fn due(freeze_min_age: i32) -> Result<Vec<Sweep>, String> {
    let before = next_xid()?;
    let rows = as_extension_owner(|| {
        crate::sql::rows(
            r"SELECT t.relid::oid::text, h.half::text, coalesce(s.kept_below::text, '0'), g.target::text
               FROM trompe.tables t JOIN pg_catalog.pg_class c ON c.oid = t.relid
               LEFT JOIN trompe.version_sweeps s ON s.relid = t.relid
              CROSS JOIN (SELECT pg_catalog.pg_current_snapshot() AS snap) q
              -- The oldest transaction of this database still running or prepared: its rows
              -- (and its subtransactions') must not fall below the watermark unseen.
              -- Transactions of other databases write no rows here.
              CROSS JOIN (SELECT pg_catalog.min(x) AS oldest FROM (
                             SELECT pg_catalog.pg_snapshot_xmax(q2.snap)::text::bigint
                                    - pg_catalog.age(a.backend_xid) AS x
                               FROM pg_catalog.pg_stat_activity a, (SELECT pg_catalog.pg_current_snapshot() AS snap) q2
                              WHERE a.datid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())
                                AND a.backend_xid IS NOT NULL
                             UNION ALL
                             SELECT pg_catalog.pg_snapshot_xmax(q3.snap)::text::bigint - pg_catalog.age(p.transaction)
                               FROM pg_catalog.pg_prepared_xacts p, (SELECT pg_catalog.pg_current_snapshot() AS snap) q3
                              WHERE p.database = pg_catalog.current_database()) r) o
              CROSS JOIN LATERAL (
                    SELECT least($1::int, coalesce(
                               (SELECT CASE WHEN o.option_value ~ '^\s*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\s*$'
                                             AND length(o.option_value) < 30
                                        THEN least(greatest(round(o.option_value::numeric), 0), 2000000000)::int END
                                  FROM pg_catalog.pg_options_to_table(c.reloptions) o
                                 WHERE o.option_name = 'autovacuum_freeze_min_age'), $1::int)) / 2 AS half) h
              CROSS JOIN LATERAL (
                    SELECT greatest(least(pg_catalog.pg_snapshot_xmax(q.snap)::text::bigint - h.half,
                                          $2::bigint, coalesce(o.oldest, $2::bigint)), 3) AS target) g
              WHERE s.kept_below IS NULL
                 OR g.target - s.kept_below::text::bigint >= greatest(h.half / 4, 1)
              ORDER BY coalesce(s.kept_below::text::bigint, 0), t.relid",
            &[Some(&freeze_min_age.to_string()), Some(&before.to_string())],
        )
    })?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let field = |i: usize| r.get(i).cloned().flatten();
            Some(Sweep {
                relid: pg_sys::Oid::from(field(0)?.parse::<u32>().ok()?),
                half: field(1)?.parse().ok()?,
                from: field(2)?.parse().ok()?,
                target: field(3)?.parse().ok()?,
            })
        })
        .collect())
}

/// Table `relid` has been swept up to `target`: its watermark moves there (never back).
pub(super) fn record(relid: pg_sys::Oid, target: u64) -> Result<(), String> {
    as_extension_owner(|| {
        crate::sql::execute(
            "INSERT INTO trompe.version_sweeps (relid, kept_below) VALUES ($1::oid, $2::xid8)
             ON CONFLICT (relid) DO UPDATE SET kept_below = EXCLUDED.kept_below
              WHERE version_sweeps.kept_below < EXCLUDED.kept_below",
            &[Some(&relid.to_u32().to_string()), Some(&target.to_string())],
        )
    })
    .map(|_| ())
}

/// Forgets the watermarks of tables no longer replicated (replicated again, a table is swept
/// whole once more).
pub(super) fn forget_unreplicated() -> Result<(), String> {
    as_extension_owner(|| {
        crate::sql::execute(
            "DELETE FROM trompe.version_sweeps s WHERE NOT EXISTS (SELECT 1 FROM trompe.tables t WHERE t.relid = s.relid)",
            &[],
        )
    })
    .map(|_| ())
}
