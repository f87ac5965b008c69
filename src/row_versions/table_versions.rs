//! How the row versions of one table are read: from `xmin` through commit timestamps, or from
//! the versions kept in `trompe.row_versions` for rows rewritten or possibly frozen.

use pgrx::prelude::*;
use trompe_core::changeset::OldVersion;
use trompe_core::nodeid::NodeId;

use crate::capture::version::version_of;
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
        }
        Ok(TableVersions { relid, rewrites, frozen_before, unkept_since })
    }

    /// The version of this table's row written by transaction `xmin` (its raw `xmin`) whose
    /// primary key, as canonical text, `key` computes (only when needed).
    pub fn row_version(&self, xmin: pg_sys::TransactionId, key: impl FnOnce() -> Vec<Option<String>>) -> OldVersion {
        let raw = xmin.into_inner();
        if raw < pg_sys::TransactionId::FIRST_NORMAL.into_inner() {
            return OldVersion::Unknown;
        }
        if self.rewrites.contains(&raw) {
            return kept(self.relid, raw, &key()).unwrap_or_else(|| version_of(xmin));
        }
        // SAFETY: plain comparison of transaction ids.
        let maybe_frozen = self.frozen_before.into_inner() >= pg_sys::TransactionId::FIRST_NORMAL.into_inner()
            && unsafe { pg_sys::TransactionIdPrecedes(xmin, self.frozen_before) };
        if maybe_frozen {
            return kept(self.relid, raw, &key()).unwrap_or_else(|| {
                if super::freeze_window::in_window(raw, self.unkept_since) {
                    version_of(xmin)
                } else {
                    OldVersion::Unknown
                }
            });
        }
        version_of(xmin)
    }
}

/// The version kept for the row `key` of table `relid` whose `xmin` is `raw`, if any.
fn kept(relid: pg_sys::Oid, raw: u32, key: &[Option<String>]) -> Option<OldVersion> {
    if !archive_exists() {
        return None;
    }
    let refs: Vec<Option<&str>> = key.iter().map(|k| k.as_deref()).collect();
    let row = as_extension_owner(|| {
        crate::sql::row(
            "SELECT committed_us::text, node_id::text
               FROM trompe.row_versions WHERE relid = $1::oid AND key = $2::text[] AND row_xmin = $3::xid",
            &[
                Some(&relid.to_u32().to_string()),
                Some(&trompe_core::pgarray::format_text_array(&refs)),
                Some(&raw.to_string()),
            ],
        )
    })
    .ok()
    .flatten()?;
    let ts = row.first().cloned().flatten().and_then(|t| t.parse::<i64>().ok());
    let node = row.get(1).cloned().flatten().and_then(|n| n.parse::<NodeId>().ok());
    Some(match (ts, node) {
        (Some(ts), Some(node)) => OldVersion::Committed { ts, node },
        _ => OldVersion::Unknown,
    })
}
