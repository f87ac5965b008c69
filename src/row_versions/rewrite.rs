//! Keeping row versions across a table rewrite by `ALTER TABLE`.
//!
//! The `table_rewrite` event fires after `ALTER TABLE` changed the catalog but before it
//! copies the rows: the relation's descriptor already has the new column types while the rows
//! on disk still have the old ones, and indexes the statement re-creates exist but are still
//! empty (planning any query on the table then fails reading them). So the rows are not read
//! through SQL: before an `ALTER TABLE` of a replicated table runs, the ProcessUtility hook
//! takes the statement's own lock and copies the table's descriptor and primary key columns
//! ([`before_alter_table`]); if the table is then rewritten, [`keep_before_rewrite`] scans its
//! heap with that layout, as `ALTER TABLE` itself does.

use std::cell::RefCell;
use std::collections::HashMap;

use pgrx::pg_sys;
use trompe_core::changeset::OldVersion;

use crate::run_as::as_extension_owner;

/// How many row versions one `INSERT` into `trompe.row_versions` carries.
const BATCH: usize = 1000;

/// A table's row layout as it was before the running `ALTER TABLE`.
struct Layout {
    /// A copy of its tuple descriptor, in the transaction's memory.
    desc: pg_sys::TupleDesc,
    /// Its primary key columns (0-based descriptor positions), in key order.
    key: Vec<usize>,
}

thread_local! {
    /// The layouts of the replicated tables the current transaction's `ALTER TABLE`
    /// statements may rewrite, by table.
    static LAYOUTS: RefCell<HashMap<pg_sys::Oid, Layout>> = RefCell::new(HashMap::new());
}

/// Before `ALTER TABLE` statement `stmt` runs: if it may rewrite a replicated table (it takes
/// an `ACCESS EXCLUSIVE` lock), takes that lock on the table (and on its partitions or
/// children, unless `ONLY`) as the statement is about to, and remembers their layouts.
/// Nothing is locked for a user who does not own the table (the statement fails anyway).
///
/// # Safety
/// `stmt` must be an `AlterTableStmt` parse tree.
pub unsafe fn before_alter_table(stmt: *mut pg_sys::AlterTableStmt) -> Result<(), String> {
    // SAFETY: the caller's contract; the lookup takes no lock, the lock taken next is the
    // statement's own, and find_all_inheritors locks the children as ALTER TABLE does.
    unsafe {
        if (*stmt).objtype != pg_sys::ObjectType::OBJECT_TABLE || (*stmt).relation.is_null() || (*stmt).cmds.is_null() {
            return Ok(());
        }
        let lockmode = pg_sys::AlterTableGetLockLevel((*stmt).cmds);
        if lockmode != pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE {
            return Ok(()); // nothing that rewrites
        }
        let relid = pg_sys::RangeVarGetRelidExtended(
            (*stmt).relation,
            pg_sys::NoLock as pg_sys::LOCKMODE,
            pg_sys::RVROption::RVR_MISSING_OK,
            None,
            std::ptr::null_mut(),
        );
        if relid == pg_sys::InvalidOid || !owned_with_replicated_part(relid)? {
            return Ok(());
        }
        pg_sys::LockRelationOid(relid, lockmode);
        let relids: Vec<pg_sys::Oid> =
            if (*(*stmt).relation).inh { crate::catalog::with_inheritors(relid, lockmode) } else { vec![relid] };
        for relid in relids {
            if crate::catalog::is_replicated(relid)? {
                remember_layout(relid);
            }
        }
        Ok(())
    }
}

/// Whether the current user owns table `relid` (or is a member of its owner) and it or one of
/// its partitions or children is replicated.
fn owned_with_replicated_part(relid: pg_sys::Oid) -> Result<bool, String> {
    // SAFETY: reads the current user id.
    let user = unsafe { pg_sys::GetUserId() };
    as_extension_owner(|| {
        crate::sql::flag(
            "SELECT pg_catalog.pg_has_role($2::oid, c.relowner, 'USAGE')
                    AND EXISTS (SELECT 1 FROM trompe.tables t
                                 WHERE t.relid = c.oid
                                    OR t.relid IN (SELECT relid FROM pg_catalog.pg_partition_tree(c.oid))
                                    OR t.relid IN (SELECT inhrelid FROM pg_catalog.pg_inherits WHERE inhparent = c.oid))
               FROM pg_catalog.pg_class c WHERE c.oid = $1::oid",
            &[Some(&relid.to_u32().to_string()), Some(&user.to_u32().to_string())],
        )
    })
}

/// Remembers the layout of table `relid` (locked by the caller) for this transaction.
///
/// # Safety
/// The caller holds a lock on `relid` that keeps its layout from changing.
unsafe fn remember_layout(relid: pg_sys::Oid) {
    // SAFETY: the relation is locked (caller's contract); the copy lives in the transaction's
    // memory, which outlives the statement, and the entry is dropped at its end.
    unsafe {
        let rel = pg_sys::relation_open(relid, pg_sys::NoLock as pg_sys::LOCKMODE);
        let key = crate::catalog::primary_key_columns(rel);
        let desc =
            pgrx::PgMemoryContexts::TopTransactionContext.switch_to(|_| pg_sys::CreateTupleDescCopy((*rel).rd_att));
        pg_sys::relation_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        if let Some(key) = key {
            LAYOUTS.with(|l| l.borrow_mut().insert(relid, Layout { desc, key }));
        }
    }
}

/// The transaction ended: its layouts went with its memory.
pub fn end_of_transaction() {
    LAYOUTS.with(|l| l.borrow_mut().clear());
}

/// Table `relid`, which the running `ALTER TABLE` is about to rewrite, keeps each of its rows'
/// versions under the current subtransaction's xid. Returns how many, or `None` when its layout from
/// before the statement is not known (a rewrite `ALTER TABLE` did not start, such as one
/// cascading from `ALTER TYPE`): then nothing is kept.
pub fn keep_before_rewrite(relid: pg_sys::Oid) -> Result<Option<u64>, String> {
    let Some((desc, key)) = LAYOUTS.with(|l| l.borrow().get(&relid).map(|l| (l.desc, l.key.clone()))) else {
        return Ok(None);
    };
    let _canonical = crate::session::CanonicalOutput::enter();
    // SAFETY: ALTER TABLE holds an ACCESS EXCLUSIVE lock on the table; its heap is scanned
    // with the descriptor its rows were written with, under a registered snapshot, and every
    // scan resource is released before returning (or by the transaction's abort on error).
    unsafe {
        let rel = pg_sys::relation_open(relid, pg_sys::NoLock as pg_sys::LOCKMODE);
        if (*(*rel).rd_rel).relam != pg_sys::HEAP_TABLE_AM_OID {
            pg_sys::relation_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
            return Ok(None);
        }
        let versions = super::table_versions::TableVersions::of(rel)?;
        let outputs: Vec<pg_sys::Oid> = key
            .iter()
            .map(|&i| {
                let (mut func, mut varlena) = (pg_sys::InvalidOid, false);
                pg_sys::getTypeOutputInfo(
                    (*crate::pg_compat::tuple_desc_attr(desc, i)).atttypid,
                    &mut func,
                    &mut varlena,
                );
                func
            })
            .collect();
        let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot());
        let flags = pg_sys::ScanOptions::SO_TYPE_SEQSCAN
            | pg_sys::ScanOptions::SO_ALLOW_STRAT
            | pg_sys::ScanOptions::SO_ALLOW_SYNC
            | pg_sys::ScanOptions::SO_ALLOW_PAGEMODE;
        let scan = pg_sys::heap_beginscan(rel, snapshot, 0, std::ptr::null_mut(), std::ptr::null_mut(), flags);
        let mut batch = Batch::default();
        let mut kept = 0;
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            // The raw xmin, as the capture trigger reads it.
            let xmin = (*(*tuple).t_data).t_choice.t_heap.t_xmin;
            if pg_sys::TransactionIdIsCurrentTransactionId(xmin) {
                // Written by this transaction: the row has its version after the rewrite too
                // (an entry kept by an earlier rewrite in it is moved to this rewrite's xid,
                // see `_preserve_versions`).
                continue;
            }
            let values: Vec<Option<String>> = key
                .iter()
                .zip(&outputs)
                .map(|(&i, &func)| {
                    let mut isnull = false;
                    let value = pg_sys::heap_getattr(tuple, i as i32 + 1, desc, &mut isnull);
                    (!isnull).then(|| {
                        let out = pg_sys::OidOutputFunctionCall(func, value);
                        let text = std::ffi::CStr::from_ptr(out).to_string_lossy().into_owned();
                        pg_sys::pfree(out.cast());
                        text
                    })
                })
                .collect();
            let version = versions.row_version(xmin, || values.clone());
            batch.push(&values, version);
            if batch.len() >= BATCH {
                kept += batch.flush(relid)?;
            }
        }
        kept += batch.flush(relid)?;
        pg_sys::heap_endscan(scan);
        pg_sys::UnregisterSnapshot(snapshot);
        pg_sys::relation_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        Ok(Some(kept))
    }
}

/// The xid of the current subtransaction (or of the transaction, outside any), assigned now if
/// it had none: the `xmin` of the rows it writes, rewrites included.
pub(super) fn current_xid() -> pg_sys::TransactionId {
    // SAFETY: inside a transaction (every caller runs in one); assigns an xid if needed.
    unsafe { pg_sys::GetCurrentTransactionId() }
}

/// Row versions waiting to be written to `trompe.row_versions`.
#[derive(Default)]
struct Batch {
    keys: Vec<String>,
    times: Vec<Option<String>>,
    nodes: Vec<Option<String>>,
}

impl Batch {
    fn len(&self) -> usize {
        self.keys.len()
    }

    fn push(&mut self, key: &[Option<String>], version: OldVersion) {
        let refs: Vec<Option<&str>> = key.iter().map(|k| k.as_deref()).collect();
        self.keys.push(trompe_core::pgarray::format_text_array(&refs));
        let (time, node) = match version {
            OldVersion::Committed { ts, node } => (Some(ts.to_string()), Some(node.to_string())),
            _ => (None, None),
        };
        self.times.push(time);
        self.nodes.push(node);
    }

    /// Writes the batch under the current subtransaction's xid, which the rewritten rows get as
    /// `xmin` (unless kept so already), and empties it.
    fn flush(&mut self, relid: pg_sys::Oid) -> Result<u64, String> {
        if self.keys.is_empty() {
            return Ok(0);
        }
        let keys: Vec<Option<&str>> = self.keys.iter().map(|k| Some(k.as_str())).collect();
        let times: Vec<Option<&str>> = self.times.iter().map(|t| t.as_deref()).collect();
        let nodes: Vec<Option<&str>> = self.nodes.iter().map(|n| n.as_deref()).collect();
        let written = as_extension_owner(|| {
            crate::sql::execute(
                "INSERT INTO trompe.row_versions (relid, key, row_xmin, committed_us, node_id)
                 SELECT $1::oid, u.k::text[], $5::xid, u.c, u.n
                   FROM ROWS FROM (pg_catalog.unnest($2::text[]), pg_catalog.unnest($3::bigint[]), pg_catalog.unnest($4::uuid[])) AS u(k, c, n)
                 ON CONFLICT (relid, key_hash, key) DO UPDATE
                    SET row_xmin = EXCLUDED.row_xmin, committed_us = EXCLUDED.committed_us, node_id = EXCLUDED.node_id
                  WHERE (row_versions.row_xmin, row_versions.committed_us, row_versions.node_id)
                        IS DISTINCT FROM (EXCLUDED.row_xmin, EXCLUDED.committed_us, EXCLUDED.node_id)",
                &[
                    Some(&relid.to_u32().to_string()),
                    Some(&trompe_core::pgarray::format_text_array(&keys)),
                    Some(&trompe_core::pgarray::format_text_array(&times)),
                    Some(&trompe_core::pgarray::format_text_array(&nodes)),
                    Some(&current_xid().into_inner().to_string()),
                ],
            )
        })?;
        if written > 0 {
            super::keep::reread_table_facts(relid);
        }
        *self = Batch::default();
        Ok(written)
    }
}
