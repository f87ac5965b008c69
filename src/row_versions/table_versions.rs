//! How the row versions of one table are read: from `xmin` through commit timestamps, or from
//! the versions kept in `trompe.row_versions` for rows rewritten or possibly frozen.

use pgrx::prelude::*;
use trompe_core::changeset::OldVersion;
use trompe_core::nodeid::NodeId;

use crate::capture::version::version_of;
use crate::catalog::{first_by_primary_key, oid_key};
use crate::run_as::as_extension_owner;

/// What decides how a table's row versions are read: the transactions that rewrote it (whose
/// rows have kept versions) and the transaction before which rows may be frozen.
#[derive(Clone, Debug, Default)]
pub struct TableVersions {
    /// The table.
    pub relid: pg_sys::Oid,
    /// Transactions that rewrote the table within the retention, as raw xids.
    pub rewrites: Vec<u32>,
    /// The table's `relfrozenxid`: rows with an older `xmin` may be frozen.
    pub frozen_before: pg_sys::TransactionId,
    /// The start (a full transaction id) of the oldest open freeze window on the table: frozen
    /// rows written since may have no kept version yet.
    pub unkept_since: Option<u64>,
    /// Whether `trompe.row_versions` held versions of the table's rows when this was read:
    /// without any, a row old enough to be frozen is not looked up there (every writer of
    /// kept versions invalidates the table's cached facts, so this is read again).
    pub has_kept: bool,
}

/// Whether this database has the version archive (trompe 0.5.0 or later).
pub(super) fn archive_exists() -> bool {
    // SAFETY: syscache lookups inside a transaction.
    unsafe {
        let nsp = pg_sys::get_namespace_oid(c"trompe".as_ptr(), true);
        nsp != pg_sys::InvalidOid && pg_sys::get_relname_relid(c"rewrites".as_ptr(), nsp) != pg_sys::InvalidOid
    }
}

impl TableVersions {
    /// What decides how the row versions of the open relation `rel` are read (cached with
    /// the relation's other facts: a rewrite or a vacuum that moves `relfrozenxid` invalidates
    /// them).
    ///
    /// # Safety
    /// `rel` must be an open relation.
    pub unsafe fn of(rel: pg_sys::Relation) -> Result<TableVersions, String> {
        // SAFETY: rel is open (caller's contract).
        let (relid, frozen_before) = unsafe { ((*rel).rd_id, (*(*rel).rd_rel).relfrozenxid) };
        let mut rewrites = Vec::new();
        let mut unkept_since = None;
        let mut has_kept = false;
        if archive_exists() {
            let row = as_extension_owner(|| {
                crate::sql::row(
                    "SELECT (SELECT pg_catalog.string_agg((xid::text::bigint % 4294967296)::text, ',')
                               FROM trompe.rewrites WHERE relid = $1::oid),
                            (SELECT pg_catalog.min(since)::text FROM trompe.freeze_windows WHERE relid = $1::oid)",
                    &[Some(&relid.to_u32().to_string())],
                )
            })?
            .unwrap_or_default();
            let text = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
            rewrites = text(0).split(',').filter_map(|x| x.parse::<u32>().ok()).collect();
            unkept_since = text(1).parse::<u64>().ok();
            // Under the latest snapshot, as the lookups: a transaction whose snapshot is older
            // than versions kept since must not cache that there are none.
            has_kept = any_kept(relid);
        }
        Ok(TableVersions { relid, rewrites, frozen_before, unkept_since, has_kept })
    }

    /// The version kept for the row whose raw `xmin` is `raw` and whose key `key` computes (not
    /// looked up, nor the key computed, when the table had no kept versions).
    fn kept(&self, raw: u32, key: impl FnOnce() -> Vec<Option<String>>) -> Option<OldVersion> {
        if self.has_kept {
            kept(self.relid, raw, &key())
        } else {
            None
        }
    }

    /// The version of this table's row written by transaction `xmin` (its raw `xmin`) whose
    /// primary key, as canonical text, `key` computes (only when needed).
    pub fn row_version(&self, xmin: pg_sys::TransactionId, key: impl FnOnce() -> Vec<Option<String>>) -> OldVersion {
        let raw = xmin.into_inner();
        if raw < pg_sys::TransactionId::FIRST_NORMAL.into_inner() {
            return OldVersion::Unknown;
        }
        if self.rewrites.contains(&raw) {
            return self.kept(raw, key).unwrap_or_else(|| version_of(xmin));
        }
        // SAFETY: plain comparison of transaction ids.
        let maybe_frozen = self.frozen_before.into_inner() >= pg_sys::TransactionId::FIRST_NORMAL.into_inner()
            && unsafe { pg_sys::TransactionIdPrecedes(xmin, self.frozen_before) };
        if maybe_frozen {
            return self.kept(raw, key).unwrap_or_else(|| {
                if super::freeze_window::in_window(raw, self.unkept_since) || young_enough_to_trust(raw) {
                    version_of(xmin)
                } else {
                    OldVersion::Unknown
                }
            });
        }
        version_of(xmin)
    }
}

/// Whether a possibly frozen row without a kept version, whose raw `xmin` is `raw`, is young
/// enough for its commit timestamp to tell its version: less than half of
/// `autovacuum_freeze_max_age` transactions old.
///
/// Since PostgreSQL 16 vacuum freezes whole pages of young rows when it writes a full-page image
/// of them anyway, before they reach the age from which trompe keeps versions (half of the
/// freeze age, which is at most half of `autovacuum_freeze_max_age`, so a quarter of it): such
/// a row's raw `xmin` is still its own, and its commit timestamp is kept until every table of
/// every database is frozen past it. The worker keeps its version once it reaches that age,
/// long before it leaves this range. (A row more than 2^32 transactions old whose raw `xmin`
/// aliases a transaction of this range reads that transaction's version, as it does when that
/// `xmin` follows the table's `relfrozenxid`.)
fn young_enough_to_trust(raw: u32) -> bool {
    // SAFETY: a shared read of the next transaction id.
    let next = unsafe { pg_sys::ReadNextTransactionId().into_inner() };
    let age = next.wrapping_sub(raw) as i32;
    age > 0 && age < super::freeze_ages::trusted_age()
}

/// The version kept for the row `key` of table `relid` whose `xmin` is `raw`, if any. Capture
/// asks for every update or delete of a row old enough to be frozen (most rows of a table
/// vacuum has been through), so this is one lookup in the primary key index of
/// `trompe.row_versions`, without SQL.
fn kept(relid: pg_sys::Oid, raw: u32, key: &[Option<String>]) -> Option<OldVersion> {
    if !archive_exists() {
        return None;
    }
    // SAFETY: the archive exists (checked); see `kept_in`.
    let row = unsafe { kept_in(relid, raw, key) }?;
    Some(match row {
        (Some(ts), Some(node)) => OldVersion::Committed { ts, node },
        _ => OldVersion::Unknown,
    })
}

/// Whether `trompe.row_versions` holds any version of table `relid`'s rows, as committed now.
fn any_kept(relid: pg_sys::Oid) -> bool {
    // SAFETY: one scan key on the index's first column; nothing is read from the row.
    unsafe { first_by_primary_key(c"row_versions", |_| vec![oid_key(1, relid)], |row| row.is_some()) }.unwrap_or(false)
}

/// The commit time and node kept in `trompe.row_versions` for (`relid`, `key`) under `xmin`
/// `raw`: `None` if no entry (or one under another `xmin`).
///
/// # Safety
/// Inside a transaction, with `trompe.row_versions` existing.
unsafe fn kept_in(relid: pg_sys::Oid, raw: u32, key: &[Option<String>]) -> Option<(Option<i64>, Option<NodeId>)> {
    // SAFETY: the key array and its texts are palloc'd in the current context (freed after the
    // scan); the scan keys compare the index's columns with their own operators and the key's
    // collation; attributes are read from the row the scan found, with the table's descriptor
    // (1-based numbers: relid, key, row_xmin, committed_us, node_id, key_hash).
    unsafe {
        let mut elems: Vec<pg_sys::Datum> = Vec::with_capacity(key.len());
        let mut nulls: Vec<bool> = Vec::with_capacity(key.len());
        for k in key {
            match k {
                Some(text) => {
                    let c = crate::sql::cstring(text);
                    elems.push(pg_sys::Datum::from(pg_sys::cstring_to_text(c.as_ptr())));
                    nulls.push(false);
                }
                None => {
                    elems.push(pg_sys::Datum::from(0));
                    nulls.push(true);
                }
            }
        }
        let mut dims = [key.len() as i32];
        let mut lbs = [1i32];
        let array = pg_sys::construct_md_array(
            elems.as_mut_ptr(),
            nulls.as_mut_ptr(),
            1,
            dims.as_mut_ptr(),
            lbs.as_mut_ptr(),
            pg_sys::TEXTOID,
            -1,
            false,
            pg_sys::TYPALIGN_INT as std::ffi::c_char,
        );
        // The primary key index is (relid, key_hash, key): the key's collation (its third
        // column's) hashes and compares keys. Down the index only the hashes are compared.
        let make_keys = |index: pg_sys::Relation| {
            let key_collation = *(*index).rd_indcollation.add(2);
            let hash = pg_sys::OidFunctionCall2Coll(
                pg_sys::F_HASH_ARRAY_EXTENDED.into(),
                key_collation,
                pg_sys::Datum::from(array),
                pg_sys::Datum::from(0i64),
            );
            let mut by_hash: pg_sys::ScanKeyData = std::mem::zeroed();
            // Scan keys name the table's columns (systable_beginscan maps them to the index's):
            // key_hash is the sixth, key the second.
            pg_sys::ScanKeyInit(
                &mut by_hash,
                6,
                pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
                pg_sys::F_INT8EQ.into(),
                hash,
            );
            let mut by_key: pg_sys::ScanKeyData = std::mem::zeroed();
            pg_sys::ScanKeyEntryInitialize(
                &mut by_key,
                0,
                2,
                pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
                pg_sys::InvalidOid,
                key_collation,
                pg_sys::F_ARRAY_EQ.into(),
                pg_sys::Datum::from(array),
            );
            vec![oid_key(1, relid), by_hash, by_key]
        };
        let read = |row: Option<(pg_sys::HeapTuple, pg_sys::TupleDesc)>| {
            let (tuple, desc) = row?;
            let mut isnull = false;
            let xmin = pg_sys::heap_getattr(tuple, 3, desc, &mut isnull);
            let same_xmin = !isnull && xmin.value() as u32 == raw;
            let ts = pg_sys::heap_getattr(tuple, 4, desc, &mut isnull);
            let ts = (!isnull).then(|| ts.value() as i64);
            let node = pg_sys::heap_getattr(tuple, 5, desc, &mut isnull);
            let node = (!isnull).then(|| {
                let bytes = std::slice::from_raw_parts(node.cast_mut_ptr::<u8>(), 16);
                let mut id = [0u8; 16];
                id.copy_from_slice(bytes);
                NodeId(id)
            });
            same_xmin.then_some((ts, node))
        };
        let found = first_by_primary_key(c"row_versions", make_keys, read).flatten();
        pg_sys::pfree(array.cast());
        found
    }
}
