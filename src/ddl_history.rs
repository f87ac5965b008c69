//! What DDL on this node renamed or dropped among replicated tables and their columns, kept in
//! `trompe.schema_changes` for `trompe.tombstone_retention`: a peer's change written before the
//! DDL reached it still names the old table or column, and apply maps it to what remains here
//! (see `worker::apply::resolve`) instead of stopping the stream.
//!
//! Drops are recorded by the `sql_drop` event trigger (which fires also for DDL applied for a
//! peer), renames by the ProcessUtility hook, which sees the old name before the statement runs.

use std::ffi::CStr;

use pgrx::prelude::*;

use crate::run_as::as_extension_owner;

/// A rename of a table or column seen before the statement ran; recorded once it succeeded.
pub struct PendingRename {
    relid: pg_sys::Oid,
    old_nsp: String,
    old_rel: String,
    /// The column renamed and its new name (None: the table was renamed or moved).
    column: Option<(String, String)>,
}

/// The schema and name of relation `relid`.
fn names_of(relid: pg_sys::Oid) -> Option<(String, String)> {
    // SAFETY: syscache lookups inside a transaction; NULL when the relation is gone.
    unsafe {
        let rel = pg_sys::get_rel_name(relid);
        let nsp = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(relid));
        if rel.is_null() || nsp.is_null() {
            return None;
        }
        Some((CStr::from_ptr(nsp).to_string_lossy().into_owned(), CStr::from_ptr(rel).to_string_lossy().into_owned()))
    }
}

/// Relation `relid` as `schema.name` (quoted where needed), for messages.
pub fn qualified(relid: pg_sys::Oid) -> String {
    names_of(relid)
        .map_or_else(|| relid.to_u32().to_string(), |(nsp, rel)| trompe_core::ident::readable_qualified(&nsp, &rel))
}

/// Before utility statement `node` runs: the rename of a table or column it makes, if any.
///
/// # Safety
/// `node` must be a utility statement's parse tree (or NULL).
pub unsafe fn before_utility(node: *mut pg_sys::Node) -> Option<PendingRename> {
    if node.is_null() {
        return None;
    }
    // SAFETY: the node's tag says which statement struct it is; names are NUL-terminated.
    let (relation, column) = unsafe {
        match (*node).type_ {
            pg_sys::NodeTag::T_RenameStmt => {
                let stmt = node as *mut pg_sys::RenameStmt;
                match (*stmt).renameType {
                    pg_sys::ObjectType::OBJECT_TABLE => ((*stmt).relation, None),
                    pg_sys::ObjectType::OBJECT_COLUMN
                        if (*stmt).relationType == pg_sys::ObjectType::OBJECT_TABLE
                            && !(*stmt).subname.is_null()
                            && !(*stmt).newname.is_null() =>
                    {
                        let old = CStr::from_ptr((*stmt).subname).to_string_lossy().into_owned();
                        let new = CStr::from_ptr((*stmt).newname).to_string_lossy().into_owned();
                        ((*stmt).relation, Some((old, new)))
                    }
                    _ => return None,
                }
            }
            pg_sys::NodeTag::T_AlterObjectSchemaStmt => {
                let stmt = node as *mut pg_sys::AlterObjectSchemaStmt;
                if (*stmt).objectType != pg_sys::ObjectType::OBJECT_TABLE {
                    return None;
                }
                ((*stmt).relation, None)
            }
            _ => return None,
        }
    };
    if relation.is_null() {
        return None;
    }
    // SAFETY: looks the name up without locking (the statement locks it itself); a missing
    // relation gives InvalidOid.
    let relid = unsafe {
        pg_sys::RangeVarGetRelidExtended(
            relation,
            pg_sys::NoLock as pg_sys::LOCKMODE,
            pg_sys::RVROption::RVR_MISSING_OK,
            None,
            std::ptr::null_mut(),
        )
    };
    if relid == pg_sys::InvalidOid {
        return None;
    }
    let (old_nsp, old_rel) = names_of(relid)?;
    Some(PendingRename { relid, old_nsp, old_rel, column })
}

/// Whether this database has trompe's schema history (trompe 0.5.0 or later installed).
fn history_exists() -> bool {
    // SAFETY: syscache lookups inside a transaction.
    let nsp = unsafe { pg_sys::get_namespace_oid(c"trompe".as_ptr(), true) };
    // SAFETY: as above.
    nsp != pg_sys::InvalidOid
        && unsafe { pg_sys::get_relname_relid(c"schema_changes".as_ptr(), nsp) } != pg_sys::InvalidOid
}

impl PendingRename {
    /// After the statement succeeded: records the rename if the table is replicated.
    pub fn record(self) {
        if !history_exists() {
            return;
        }
        let Some((nsp, rel)) = names_of(self.relid) else { return };
        let relid = self.relid.to_u32().to_string();
        let result = as_extension_owner(|| {
            match &self.column {
            Some((old, new)) => crate::sql::execute(
                "INSERT INTO trompe.schema_changes (relid, kind, old_column, new_column)
                 SELECT $1::oid, 'rename_column', $2, $3 WHERE EXISTS (SELECT 1 FROM trompe.tables WHERE relid = $1::oid)",
                &[Some(&relid), Some(old), Some(new)],
            ),
            None if (nsp.as_str(), rel.as_str()) != (self.old_nsp.as_str(), self.old_rel.as_str()) => {
                crate::sql::execute(
                    "INSERT INTO trompe.schema_changes (relid, kind, old_nsp, old_rel)
                     SELECT $1::oid, 'rename_table', $2, $3 WHERE EXISTS (SELECT 1 FROM trompe.tables WHERE relid = $1::oid)",
                    &[Some(&relid), Some(&self.old_nsp), Some(&self.old_rel)],
                )
            }
            None => Ok(0),
        }
        });
        if let Err(e) = result {
            pgrx::warning!("trompe: could not record the rename of {}.{}: {e}", self.old_nsp, self.old_rel);
        }
    }
}

/// Called by the `sql_drop` event trigger (also for DDL applied for a peer): records the
/// columns and tables of replicated tables the command dropped.
#[pg_extern(volatile, parallel_unsafe)]
fn _note_dropped() {
    if !history_exists() {
        return;
    }
    let result = as_extension_owner(|| {
        crate::sql::execute(
            "WITH o AS (SELECT * FROM pg_catalog.pg_event_trigger_dropped_objects()
                         WHERE objid IN (SELECT relid::oid FROM trompe.tables)),
                  tables AS (SELECT objid FROM o WHERE object_type = 'table'),
                  forget AS (DELETE FROM trompe.schema_changes WHERE relid IN (SELECT objid FROM tables)
                               AND kind <> 'drop_table')
             INSERT INTO trompe.schema_changes (relid, kind, old_nsp, old_rel, old_column)
             SELECT o.objid, CASE o.object_type WHEN 'table' THEN 'drop_table' ELSE 'drop_column' END,
                    o.address_names[1], o.address_names[2],
                    CASE o.object_type WHEN 'table column' THEN o.address_names[3] END
               FROM o WHERE o.object_type IN ('table', 'table column')",
            &[],
        )
    });
    if let Err(e) = result {
        pgrx::warning!("trompe: could not record dropped columns or tables: {e}");
    }
}

/// What happened here to a table a peer's change names, when no table has that name now.
pub enum TableFate {
    /// Renamed (or moved to another schema): it is now `nsp.rel`.
    Renamed { nsp: String, rel: String },
    /// Dropped: changes for it have nothing to apply to.
    Dropped,
}

/// What DDL on this node did to the table a peer knows as `nsp.rel`, if it renamed or dropped
/// it; the latest record counts.
pub fn table_fate(nsp: &str, rel: &str) -> Result<Option<TableFate>, String> {
    if !history_exists() {
        return Ok(None);
    }
    let row = as_extension_owner(|| {
        crate::sql::row(
            "SELECT kind, relid::text FROM trompe.schema_changes
              WHERE kind IN ('rename_table', 'drop_table') AND old_nsp = $1 AND old_rel = $2
              ORDER BY id DESC LIMIT 1",
            &[Some(nsp), Some(rel)],
        )
    })?;
    let Some(row) = row else { return Ok(None) };
    match row.first().cloned().flatten().as_deref() {
        Some("drop_table") => Ok(Some(TableFate::Dropped)),
        _ => {
            let relid = row.get(1).cloned().flatten().and_then(|r| r.parse::<u32>().ok()).map(pg_sys::Oid::from);
            Ok(relid.and_then(names_of).map(|(nsp, rel)| TableFate::Renamed { nsp, rel }))
        }
    }
}

/// The renames and drops of columns of table `relid` recorded here, oldest first: `(old, new)`,
/// `new` None for a drop.
pub fn column_changes(relid: pg_sys::Oid) -> Result<Vec<(String, Option<String>)>, String> {
    if !history_exists() {
        return Ok(Vec::new());
    }
    let rows = as_extension_owner(|| {
        crate::sql::rows(
            "SELECT old_column, new_column FROM trompe.schema_changes
              WHERE relid = $1::oid AND kind IN ('rename_column', 'drop_column') ORDER BY id",
            &[Some(&relid.to_u32().to_string())],
        )
    })?;
    Ok(rows.into_iter().filter_map(|r| Some((r.first().cloned().flatten()?, r.get(1).cloned().flatten()))).collect())
}

/// Forgets what is older than the tombstone retention (no change in flight can be that old).
pub fn prune(retention_ms: i64) -> Result<u64, String> {
    if !history_exists() {
        return Ok(0);
    }
    crate::sql::execute(
        "DELETE FROM trompe.schema_changes WHERE at < now() - $1::bigint * interval '1 millisecond'",
        &[Some(&retention_ms.to_string())],
    )
}
