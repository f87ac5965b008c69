//! Row versions PostgreSQL's own records no longer tell.
//!
//! A row's version is the commit time and node of the transaction that wrote it, read from its
//! `xmin` through commit timestamps and replication origins. Two things lose that:
//!
//! - a **table rewrite** (`ALTER TABLE ... TYPE`, `SET ACCESS METHOD`, ...) writes every row
//!   again with the rewriting (sub)transaction as `xmin`. The `table_rewrite` event trigger
//!   (which fires for DDL applied for a peer too) keeps every row's version first, in
//!   `trompe.row_versions` under the rewriting subtransaction's xid (the transaction's,
//!   outside any), and records that xid in `trompe.rewrites` (module [`rewrite`], how versions
//!   are read in [`table_versions`]); rows of that xid read their kept version, unless the
//!   subtransaction wrote them itself after the rewrite (then their entry is removed as it
//!   writes them). A second rewrite in another subtransaction of the same transaction takes
//!   the first one's entries over.
//! - **freezing**, after which PostgreSQL may truncate the commit timestamps of the row's
//!   transaction: a row whose `xmin` precedes its table's `relfrozenxid` may be frozen, and a
//!   frozen row's raw `xmin` cannot be trusted (it may be more than 2^31 transactions old, and
//!   then reads as a recent one). Such rows read their version from `trompe.row_versions`,
//!   where it is kept before vacuum can freeze them: by the ProcessUtility hook before `VACUUM`
//!   (with `FREEZE`, `FULL`, or not) and `CLUSTER`, and by the worker for autovacuum, for rows
//!   older than half of `vacuum_freeze_min_age` (see [`archive_aging`]). Since PostgreSQL 16
//!   vacuum also freezes younger rows, whole pages at a time, when it writes a full-page image
//!   of the page anyway: a row younger than half of `autovacuum_freeze_max_age` without a kept
//!   version reads its version from its raw `xmin`, which is still its own (the worker keeps
//!   it before it gets that old). An older frozen row without a kept version is older than
//!   anything that matters: its version is unknown (it loses).
//!
//! A row committed while such a statement keeps versions may be frozen without a kept one: it
//! reads its version through the statement's freeze window (module [`freeze_window`]).
//!
//! Only versions younger than `trompe.tombstone_retention` are kept, and entries are pruned
//! after it: an older version loses to every change a node can still receive, as an unknown
//! one does.

use std::cell::RefCell;
use std::collections::HashMap;

use pgrx::prelude::*;
use trompe_core::changeset::OldVersion;

use crate::run_as::as_extension_owner;

mod freeze_ages;
mod freeze_window;
mod keep;
mod rewrite;
mod sweep;
mod table_versions;

use freeze_ages::freeze_min_age;
pub use freeze_window::close_own as after_utility;
use keep::{keep, retention_horizon};
use rewrite::current_xid;
pub use sweep::Sweep;
use table_versions::archive_exists;
pub use table_versions::TableVersions;

/// A statement of this backend: its transaction's local id and its command id.
type StatementId = (u32, pg_sys::CommandId);

thread_local! {
    /// What decides the versions of the table `_row_version` read last, with the statement that
    /// read it: a statement keeping versions asks for every row of one table (the facts hold
    /// for the statement).
    static STATEMENT_FACTS: RefCell<Option<(pg_sys::Oid, StatementId, TableVersions)>> = const { RefCell::new(None) };
    /// Tables the current transaction rewrote, with the xids of the (sub)transactions that
    /// rewrote them (its own later writes of their rows take their kept versions back; a later
    /// rewrite in another subtransaction takes over the versions an earlier one kept).
    static REWRITTEN_HERE: RefCell<HashMap<pg_sys::Oid, Vec<pg_sys::TransactionId>>> = RefCell::new(HashMap::new());
}

/// Called by the `table_rewrite` event trigger before table `relid` is rewritten: keeps the
/// version of each of its rows under the current subtransaction's xid (or the transaction's,
/// outside any), which the rewritten rows get as `xmin`.
#[pg_extern(volatile, parallel_unsafe)]
fn _preserve_versions(relid: pg_sys::Oid) {
    let result = (|| -> Result<(), String> {
        if !archive_exists() || !crate::catalog::is_replicated(relid)? {
            return Ok(());
        }
        if rewrite::keep_before_rewrite(relid)?.is_none() {
            pgrx::warning!(
                "trompe: the row versions of table {} are not kept across this rewrite: \
                 a change a peer made before it may lose to it; run ALTER TABLE on the table itself",
                crate::ddl_history::qualified(relid)
            );
            return Ok(());
        }
        // The rewritten rows' xmin is the current subtransaction's xid, not the top-level one.
        let xid = current_xid();
        // SAFETY: inside a transaction whose current subtransaction has an xid (assigned above).
        let full_xid = unsafe { pg_sys::GetCurrentFullTransactionId() }.value;
        let earlier = rewrite_xids(relid, Some(xid));
        as_extension_owner(|| {
            crate::sql::execute(
                "INSERT INTO trompe.rewrites (relid, xid) VALUES ($1::oid, $2::xid8) ON CONFLICT DO NOTHING",
                &[Some(&relid.to_u32().to_string()), Some(&full_xid.to_string())],
            )?;
            if let Some(earlier) = &earlier {
                // Rows an earlier rewrite of this transaction kept versions for (in another
                // subtransaction) were skipped by this one's, which wrote them again: their
                // versions now belong to this rewrite's xid.
                crate::sql::execute(
                    "UPDATE trompe.row_versions SET row_xmin = $2::xid
                      WHERE relid = $1::oid AND row_xmin = ANY ($3::xid[])",
                    &[Some(&relid.to_u32().to_string()), Some(&xid.into_inner().to_string()), Some(earlier)],
                )?;
            }
            Ok::<_, String>(())
        })?;
        REWRITTEN_HERE.with(|r| {
            let mut r = r.borrow_mut();
            let xids = r.entry(relid).or_default();
            if !xids.contains(&xid) {
                xids.push(xid);
            }
        });
        Ok(())
    })();
    if let Err(e) = result {
        crate::error::TrompeError::Internal(format!("keeping the row versions of a rewritten table: {e}")).raise();
    }
}

/// The version of row `key` of table `relid` written by transaction `xmin` (see
/// [`TableVersions::row_version`]): its commit time and node, NULL when unknown.
#[pg_extern(volatile, parallel_unsafe)]
fn _row_version(
    relid: pg_sys::Oid,
    xmin: pg_sys::TransactionId,
    key: Vec<Option<String>>,
) -> TableIterator<'static, (name!(committed_us, Option<i64>), name!(node_id, Option<pgrx::Uuid>))> {
    // SAFETY: reads the current command's id. (Each transaction numbers its commands anew: the
    // local transaction id tells them apart.)
    let command = (crate::pg_compat::local_transaction_id(), unsafe { pg_sys::GetCurrentCommandId(false) });
    let cached = STATEMENT_FACTS
        .with(|f| f.borrow().as_ref().filter(|(r, c, _)| *r == relid && *c == command).map(|(_, _, v)| v.clone()));
    let versions = match cached {
        Some(versions) => versions,
        None => {
            // SAFETY: opens the relation to read what decides its versions; closed before returning.
            let versions = unsafe {
                let rel = pg_sys::try_relation_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
                if rel.is_null() {
                    return TableIterator::new(vec![(None, None)]);
                }
                let v = TableVersions::of(rel);
                pg_sys::relation_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
                v
            };
            let versions = versions.map_err(crate::error::TrompeError::Internal).unwrap_or_else(|e| e.raise());
            STATEMENT_FACTS.with(|f| *f.borrow_mut() = Some((relid, command, versions.clone())));
            versions
        }
    };
    let row = match versions.row_version(xmin, || key) {
        OldVersion::Committed { ts, node } => (Some(ts), Some(pgrx::Uuid::from_bytes(node.0))),
        _ => (None, None),
    };
    TableIterator::new(vec![row])
}

/// A row of table `relid` with primary key `key` was written by a transaction that rewrote the
/// table (after the rewrite): it has that transaction's version, not the kept one. The version
/// kept under any of the transaction's rewrites of the table is dropped (the row's `xmin` is now
/// the writing subtransaction's: a later rewrite in the transaction must not take the entry
/// over); a rolled-back write brings it back with the row.
pub fn written_after_rewrite(relid: pg_sys::Oid, key: &[Option<String>]) -> Result<(), String> {
    let Some(xids) = rewrite_xids(relid, None) else {
        return Ok(());
    };
    let refs: Vec<Option<&str>> = key.iter().map(|k| k.as_deref()).collect();
    as_extension_owner(|| {
        crate::sql::execute(
            "DELETE FROM trompe.row_versions
              WHERE relid = $1::oid AND key_hash = pg_catalog.hash_array_extended($2::text[], 0)
                AND key = $2::text[] AND row_xmin = ANY ($3::xid[])",
            &[Some(&relid.to_u32().to_string()), Some(&trompe_core::pgarray::format_text_array(&refs)), Some(&xids)],
        )
    })
    .map(|_| ())
}

/// The xids of the (sub)transactions of the current transaction that rewrote table `relid`,
/// but `except`, as an `xid[]` literal: `None` if there are none.
fn rewrite_xids(relid: pg_sys::Oid, except: Option<pg_sys::TransactionId>) -> Option<String> {
    let xids: Vec<String> = REWRITTEN_HERE.with(|r| {
        r.borrow()
            .get(&relid)
            .into_iter()
            .flatten()
            .filter(|&&x| Some(x) != except)
            .map(|x| x.into_inner().to_string())
            .collect()
    });
    let xids: Vec<Option<&str>> = xids.iter().map(|x| Some(x.as_str())).collect();
    (!xids.is_empty()).then(|| trompe_core::pgarray::format_text_array(&xids))
}

/// Whether the current transaction rewrote any replicated table.
pub fn any_rewritten_here() -> bool {
    REWRITTEN_HERE.with(|r| !r.borrow().is_empty())
}

/// Whether table `relid` was rewritten by the current transaction.
pub fn rewritten_here(relid: pg_sys::Oid) -> bool {
    REWRITTEN_HERE.with(|r| r.borrow().contains_key(&relid))
}

/// The transaction ended: forgets which tables it rewrote.
pub fn end_of_transaction() {
    REWRITTEN_HERE.with(|r| r.borrow_mut().clear());
    STATEMENT_FACTS.with(|f| f.borrow_mut().take());
    rewrite::end_of_transaction();
}

/// Opens a freeze window on table `relid` if it is replicated (see [`freeze_window`]).
fn open_freeze_window(relid: pg_sys::Oid) -> Result<(), String> {
    if !archive_exists() || !crate::catalog::is_replicated(relid)? {
        return Ok(());
    }
    freeze_window::open(relid)
}

/// Keeps the versions of the rows of replicated table `relid` whose `xmin` is at least
/// `min_age` transactions old (vacuum may freeze them), under their own `xmin`: those from the
/// table's sweep watermark on (older ones were kept by a sweep, see [`sweep`]).
pub fn archive_aging(relid: pg_sys::Oid, min_age: i64) -> Result<u64, String> {
    if !archive_exists() || !crate::catalog::is_replicated(relid)? {
        return Ok(0);
    }
    keep(relid, "t.xmin", &sweep::band(min_age, sweep::watermark(relid)?, None), true)
}

/// The replicated tables whose aging rows (older than half of `vacuum_freeze_min_age`, or of
/// the table's `autovacuum_freeze_min_age` when lower) need their versions kept now, oldest
/// watermark first (see [`sweep`]).
pub fn sweeps_due() -> Result<Vec<Sweep>, String> {
    if !archive_exists() {
        return Ok(Vec::new());
    }
    sweep::due(freeze_min_age())
}

/// Keeps the versions of the aging rows of the table `due` names in one slice of it, from
/// block `from_block` on: returns where the next slice starts, or `None` once the table is
/// swept (its watermark then moves, in the same transaction).
pub fn sweep_slice(due: &Sweep, from_block: u32) -> Result<Option<u32>, String> {
    if !archive_exists() || !crate::catalog::is_replicated(due.relid)? {
        return Ok(None);
    }
    give_way_to_locks()?;
    let Some(slice) = sweep::slice(due.relid, from_block)? else {
        sweep::record(due.relid, due.target)?;
        return Ok(None);
    };
    let condition = format!("{} AND {}", sweep::band(due.half, due.from, Some(due.target)), slice.condition());
    keep(due.relid, "t.xmin", &condition, true)?;
    Ok(Some(slice.end))
}

/// The worker's version keeping waits at most 100 ms for a lock (of a table a session holds
/// locked: a migration, `LOCK TABLE`) and is simply tried again a minute later: replication
/// does not wait with it.
fn give_way_to_locks() -> Result<(), String> {
    crate::sql::execute("SELECT pg_catalog.set_config('lock_timeout', '100ms', true)", &[]).map(|_| ())
}

/// The replicated tables a utility statement about to run may freeze rows of, with the age
/// from which it freezes them: `VACUUM` (all tables, or those listed; every row with `FREEZE`
/// or `FULL`) and `CLUSTER` (every row); before an `ALTER TABLE`, the layout of the replicated tables it may rewrite
/// (see [`rewrite`]).
///
/// # Safety
/// `node` must be a utility statement's parse tree (or NULL).
pub unsafe fn before_utility(node: *mut pg_sys::Node) {
    if node.is_null() {
        return;
    }
    // SAFETY: the node's tag says which statement it is; options are DefElems.
    let (relations, freeze_all) = unsafe {
        match (*node).type_ {
            pg_sys::NodeTag::T_VacuumStmt if (*(node as *mut pg_sys::VacuumStmt)).is_vacuumcmd => {
                let stmt = node as *mut pg_sys::VacuumStmt;
                // VACUUM FULL, as CLUSTER, freezes every row it can whatever the freeze age.
                let freeze = option_set((*stmt).options, "freeze") || option_set((*stmt).options, "full");
                let rels = crate::pg_list::pointers::<pg_sys::VacuumRelation>((*stmt).rels)
                    .into_iter()
                    .map(|vr| (*vr).relation)
                    .filter(|relation| !relation.is_null())
                    .collect();
                (Some(rels), freeze)
            }
            pg_sys::NodeTag::T_ClusterStmt => {
                let stmt = node as *mut pg_sys::ClusterStmt;
                let rels = if (*stmt).relation.is_null() { vec![] } else { vec![(*stmt).relation] };
                (Some(rels), true)
            }
            _ => (None, false),
        }
    };
    if node_is_alter_table(node) && archive_exists() {
        // SAFETY: an AlterTableStmt (checked).
        if let Err(e) = unsafe { rewrite::before_alter_table(node.cast()) } {
            crate::error::TrompeError::Internal(format!("reading the layout of an altered table: {e}")).raise();
        }
        return;
    }
    let Some(relations) = relations else { return };
    if !archive_exists() {
        return;
    }
    let min_age = if freeze_all { 0 } else { i64::from(freeze_min_age()) };
    let relids: Vec<pg_sys::Oid> = if relations.is_empty() {
        replicated_tables().unwrap_or_default()
    } else {
        relations
            .into_iter()
            .flat_map(|r| {
                // SAFETY: a name lookup without locking (the statement locks the table itself);
                // `r` is a RangeVar of the statement.
                let (relid, inh) = unsafe {
                    let relid = pg_sys::RangeVarGetRelidExtended(
                        r,
                        pg_sys::NoLock as pg_sys::LOCKMODE,
                        pg_sys::RVROption::RVR_MISSING_OK,
                        None,
                        std::ptr::null_mut(),
                    );
                    (relid, (*r).inh)
                };
                // A partitioned table is vacuumed or clustered partition by partition (unless
                // ONLY): each replicated partition keeps its versions.
                // SAFETY: a syscache lookup of an existing relation's kind.
                let partitioned = relid != pg_sys::InvalidOid
                    && unsafe { pg_sys::get_rel_relkind(relid) }
                        == pg_sys::RELKIND_PARTITIONED_TABLE as std::ffi::c_char;
                if partitioned && inh {
                    crate::catalog::with_inheritors(relid, pg_sys::NoLock as pg_sys::LOCKMODE)
                } else {
                    vec![relid]
                }
            })
            .filter(|r| *r != pg_sys::InvalidOid)
            .collect()
    };
    for relid in relids {
        if let Err(e) = open_freeze_window(relid).and_then(|()| archive_aging(relid, min_age)) {
            crate::error::TrompeError::Internal(format!("keeping row versions before vacuum: {e}")).raise();
        }
    }
}

/// Whether `node` (not NULL) is an `ALTER TABLE` (or `ALTER INDEX`, ...) statement.
fn node_is_alter_table(node: *mut pg_sys::Node) -> bool {
    // SAFETY: the caller passes a valid node; only its tag is read.
    unsafe { (*node).type_ == pg_sys::NodeTag::T_AlterTableStmt }
}

/// Whether a list of `DefElem` options has `name` set (to true, or without a value).
unsafe fn option_set(list: *mut pg_sys::List, name: &str) -> bool {
    // SAFETY: the list is NIL or holds DefElems (caller's contract).
    unsafe {
        crate::pg_list::pointers::<pg_sys::DefElem>(list).into_iter().any(|def| {
            !(*def).defname.is_null()
                && std::ffi::CStr::from_ptr((*def).defname).to_bytes() == name.as_bytes()
                && pg_sys::defGetBoolean(def)
        })
    }
}

fn replicated_tables() -> Result<Vec<pg_sys::Oid>, String> {
    let rows = as_extension_owner(|| crate::sql::rows("SELECT relid::oid::text FROM trompe.tables", &[]))?;
    Ok(rows
        .into_iter()
        .filter_map(|r| r.first().cloned().flatten()?.parse::<u32>().ok())
        .map(pg_sys::Oid::from)
        .collect())
}

/// Run by the worker now and then: closes the freeze windows of statements that ended, and
/// prunes kept versions older than the retention. (The worker sweeps the tables [`sweeps_due`]
/// names, a slice at a time, with [`sweep_slice`].)
pub fn maintain() -> Result<(), String> {
    if !archive_exists() {
        return Ok(());
    }
    give_way_to_locks()?;
    freeze_window::close_ended()?;
    sweep::forget_unreplicated()?;
    as_extension_owner(|| {
        let retention = crate::guc::TOMBSTONE_RETENTION_S.get().to_string();
        crate::sql::execute(
            "DELETE FROM trompe.rewrites WHERE at < now() - make_interval(secs => $1::int)",
            &[Some(&retention)],
        )?;
        crate::sql::execute(
            "DELETE FROM trompe.row_versions v
              WHERE coalesce(v.committed_us < $1::bigint, true)
                AND NOT EXISTS (SELECT 1 FROM trompe.rewrites w WHERE w.relid = v.relid AND w.xid::xid = v.row_xmin)",
            &[Some(&retention_horizon().to_string())],
        )
    })?;
    Ok(())
}
