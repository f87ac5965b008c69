//! DDL on a replicated table that could not end the same on every node is refused where it is
//! run, before it reaches any peer:
//!
//! - `ADD COLUMN` whose default is not immutable (`now()`, `random()`, `serial`, identity
//!   columns): each node would compute its own values for the existing rows when it replays it;
//! - `ALTER COLUMN ... TYPE ... USING` an expression that is not immutable, for the same reason;
//! - `DETACH PARTITION ... CONCURRENTLY` of a replicated partition, which PostgreSQL runs in
//!   several transactions and peers could not replay as one;
//! - `ALTER TABLE ... SET SCHEMA` of a replicated table (or one in a replicated schema) into a
//!   schema that is not replicated, or of a table that is not into one that is.
//!
//! Each refusal says what to do instead. DDL applied for a peer is never refused here (its
//! origin accepted it).

use std::ffi::CStr;

use pgrx::pg_sys;

use crate::error::TrompeError;

/// Columns a statement adds to a replicated table, checked once it ran.
pub struct AddedColumns {
    relid: pg_sys::Oid,
    table: String,
    columns: Vec<String>,
}

const ADD_COLUMN_HINT: &str = "Add the column without a default, fill it with an UPDATE (which replicates), then set the default with ALTER COLUMN ... SET DEFAULT.";
const USING_HINT: &str =
    "Change the type with an immutable USING expression, or add a column, fill it with an UPDATE and swap the columns.";
const DETACH_HINT: &str = "Use DETACH PARTITION without CONCURRENTLY.";

fn is_replicated(relid: pg_sys::Oid) -> bool {
    crate::run_as::as_extension_owner(|| {
        crate::sql::flag(
            "SELECT EXISTS (SELECT 1 FROM trompe.tables WHERE relid = $1::oid)",
            &[Some(&relid.to_u32().to_string())],
        )
    })
    .unwrap_or(false)
}

/// The oid of the relation `range` names, InvalidOid if none.
unsafe fn relid_of(range: *mut pg_sys::RangeVar) -> pg_sys::Oid {
    if range.is_null() {
        return pg_sys::InvalidOid;
    }
    // SAFETY: a name lookup without locking (the statement locks it itself).
    unsafe {
        pg_sys::RangeVarGetRelidExtended(
            range,
            pg_sys::NoLock as pg_sys::LOCKMODE,
            pg_sys::RVROption::RVR_MISSING_OK,
            None,
            std::ptr::null_mut(),
        )
    }
}

thread_local! {
    /// Tables an `ALTER TABLE` of this transaction found unlogged or without a primary key: if
    /// the statement makes one replicable, its rows go to the peers (`tables::_after_ddl`).
    static MAY_BECOME_REPLICABLE: std::cell::RefCell<std::collections::HashSet<pg_sys::Oid>> =
        std::cell::RefCell::new(std::collections::HashSet::new());
}

/// The tables noted since the last call (see `MAY_BECOME_REPLICABLE`).
pub fn take_may_have_become_replicable() -> std::collections::HashSet<pg_sys::Oid> {
    MAY_BECOME_REPLICABLE.with(|m| std::mem::take(&mut *m.borrow_mut()))
}

/// The transaction ended (the ProcessUtility hook registers the callback that calls this).
pub fn end_of_transaction() {
    MAY_BECOME_REPLICABLE.with(|m| m.borrow_mut().clear());
}

/// Whether table `relid` cannot be replicated as it is: unlogged, or without a primary key (an
/// `ALTER TABLE` may change that, and then its rows must reach the peers).
unsafe fn not_replicable_yet(relid: pg_sys::Oid) -> bool {
    // SAFETY: a syscache lookup, and the relation opened (the statement locks it anyway) to
    // read its primary key, then closed.
    unsafe {
        if pg_sys::get_rel_persistence(relid) as u8 == pg_sys::RELPERSISTENCE_UNLOGGED {
            return true;
        }
        let rel = pg_sys::try_relation_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        if rel.is_null() {
            return false;
        }
        let keyless = crate::pg_compat::primary_key_index(rel) == pg_sys::InvalidOid;
        pg_sys::relation_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        keyless
    }
}

/// Whether a type name is one of the serial pseudo-types.
unsafe fn is_serial(type_name: *mut pg_sys::TypeName) -> bool {
    if type_name.is_null() || (*type_name).names.is_null() {
        return false;
    }
    // SAFETY: a type name's names are String nodes; the last one is the type's own name.
    unsafe {
        let names = (*type_name).names;
        let last = (*(*names).elements.add((*names).length as usize - 1)).ptr_value as *mut pg_sys::String;
        let name = CStr::from_ptr((*last).sval).to_bytes();
        matches!(name, b"serial" | b"bigserial" | b"smallserial" | b"serial2" | b"serial4" | b"serial8")
    }
}

/// Whether the `USING` expression `raw` of a type change of table `relid` may give different
/// values on different nodes (it uses functions that are not immutable).
unsafe fn using_is_mutable(relid: pg_sys::Oid, raw: *mut pg_sys::Node) -> bool {
    // SAFETY: analyses a copy of the expression against the table, as ALTER TABLE will, in a
    // parse state of our own; errors in it are the statement's own errors.
    unsafe {
        let rel = pg_sys::relation_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let pstate = pg_sys::make_parsestate(std::ptr::null_mut());
        let nsitem = pg_sys::addRangeTableEntryForRelation(
            pstate,
            rel,
            pg_sys::AccessShareLock as i32,
            std::ptr::null_mut(),
            false,
            true,
        );
        pg_sys::addNSItemToQuery(pstate, nsitem, false, true, true);
        let expr = pg_sys::transformExpr(
            pstate,
            pg_sys::copyObjectImpl(raw.cast()).cast(),
            pg_sys::ParseExprKind::EXPR_KIND_ALTER_COL_TRANSFORM,
        );
        let mutable = pg_sys::contain_mutable_functions(expr);
        pg_sys::free_parsestate(pstate);
        pg_sys::relation_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        mutable
    }
}

/// Before utility statement `node` runs: refuses what could not replicate alike; returns the
/// columns to check once it ran.
///
/// # Safety
/// `node` must be a utility statement's parse tree (or NULL).
pub unsafe fn before_utility(node: *mut pg_sys::Node) -> Result<Option<AddedColumns>, TrompeError> {
    // SAFETY: reads backend-local globals and the node's tag; an AlterObjectSchemaStmt is
    // checked as one.
    unsafe {
        if !node.is_null()
            && (*node).type_ == pg_sys::NodeTag::T_AlterObjectSchemaStmt
            && !crate::session::applying_for_peer()
            && !crate::session::in_internal_operation()
            && !pg_sys::creating_extension
        {
            check_set_schema(node.cast())?;
            return Ok(None);
        }
        if node.is_null()
            || (*node).type_ != pg_sys::NodeTag::T_AlterTableStmt
            || crate::session::applying_for_peer()
            || crate::session::in_internal_operation()
            || pg_sys::creating_extension
        {
            return Ok(None);
        }
    }
    // SAFETY: an AlterTableStmt (checked above) whose commands are AlterTableCmds with the
    // node types their subtype implies.
    unsafe {
        let stmt = node as *mut pg_sys::AlterTableStmt;
        let relid = relid_of((*stmt).relation);
        if relid == pg_sys::InvalidOid || (*stmt).cmds.is_null() {
            return Ok(None);
        }
        if not_replicable_yet(relid) && !is_replicated(relid) {
            MAY_BECOME_REPLICABLE.with(|m| m.borrow_mut().insert(relid));
        }
        let table = crate::ddl_history::qualified(relid);
        let cmds = (*stmt).cmds;
        let mut checks: Option<bool> = None;
        let mut replicated = || *checks.get_or_insert_with(|| is_replicated(relid));
        let mut added = Vec::new();
        for i in 0..(*cmds).length as usize {
            let cmd = (*(*cmds).elements.add(i)).ptr_value as *mut pg_sys::AlterTableCmd;
            match (*cmd).subtype {
                pg_sys::AlterTableType::AT_AddColumn if !(*cmd).def.is_null() => {
                    let def = (*cmd).def as *mut pg_sys::ColumnDef;
                    if (*def).generated != 0 || !replicated() {
                        continue;
                    }
                    let name = CStr::from_ptr((*def).colname).to_string_lossy().into_owned();
                    if (*def).identity != 0 || is_serial((*def).typeName) {
                        return Err(TrompeError::DivergentDdl {
                            what: format!("ADD COLUMN {name}"),
                            table,
                            reason: "each node would number the existing rows from its own sequence".into(),
                            hint: ADD_COLUMN_HINT,
                        });
                    }
                    added.push(name);
                }
                pg_sys::AlterTableType::AT_AlterColumnType if !(*cmd).def.is_null() => {
                    let def = (*cmd).def as *mut pg_sys::ColumnDef;
                    if !(*def).raw_default.is_null() && replicated() && using_is_mutable(relid, (*def).raw_default) {
                        let name = CStr::from_ptr((*cmd).name).to_string_lossy().into_owned();
                        return Err(TrompeError::DivergentDdl {
                            what: format!("ALTER COLUMN {name} TYPE"),
                            table,
                            reason: "its USING expression is not immutable".into(),
                            hint: USING_HINT,
                        });
                    }
                }
                pg_sys::AlterTableType::AT_DetachPartition if !(*cmd).def.is_null() => {
                    let part = (*cmd).def as *mut pg_sys::PartitionCmd;
                    let partition = relid_of((*part).name);
                    if (*part).concurrent && partition != pg_sys::InvalidOid && is_replicated(partition) {
                        return Err(TrompeError::UnreplicableDdl(
                            format!("DETACH PARTITION {} CONCURRENTLY", crate::ddl_history::qualified(partition)),
                            DETACH_HINT,
                        ));
                    }
                }
                _ => {}
            }
        }
        Ok((!added.is_empty()).then_some(AddedColumns { relid, table, columns: added }))
    }
}

const SET_SCHEMA_OUT_HINT: &str = "Replicate the target schema on every node first (trompe.add_schema), or stop replicating the table on every node (trompe.remove_table) before moving it.";
const SET_SCHEMA_IN_HINT: &str = "Create the table in the replicated schema instead and fill it there (CREATE TABLE ... (LIKE ... INCLUDING ALL); INSERT INTO ... SELECT ...): that replicates, rows included.";

/// Whether schema `name` is replicated here.
fn schema_replicated(name: &str) -> bool {
    crate::run_as::as_extension_owner(|| {
        crate::sql::flag("SELECT EXISTS (SELECT 1 FROM trompe.schemas WHERE schema_name = $1)", &[Some(name)])
    })
    .unwrap_or(false)
}

/// `ALTER TABLE ... SET SCHEMA` between a replicated schema (or of a replicated table) and one
/// that is not: peers could not follow. Moved out, a peer refuses to put the table where
/// nothing is replicated; moved in, the table (and its rows) does not exist on any peer.
///
/// # Safety
/// `stmt` must be an AlterObjectSchemaStmt.
unsafe fn check_set_schema(stmt: *mut pg_sys::AlterObjectSchemaStmt) -> Result<(), TrompeError> {
    // SAFETY: the statement's fields as the parser made them (relation and newschema set for
    // the relation kinds checked).
    unsafe {
        if (*stmt).objectType != pg_sys::ObjectType::OBJECT_TABLE || (*stmt).newschema.is_null() {
            return Ok(());
        }
        let relid = relid_of((*stmt).relation);
        if relid == pg_sys::InvalidOid {
            return Ok(());
        }
        let from = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(relid));
        if from.is_null() {
            return Ok(());
        }
        let from = CStr::from_ptr(from).to_string_lossy().into_owned();
        let to = CStr::from_ptr((*stmt).newschema).to_string_lossy().into_owned();
        let table = crate::ddl_history::qualified(relid);
        let here = is_replicated(relid) || schema_replicated(&from);
        let there = schema_replicated(&to);
        if here && !there {
            return Err(TrompeError::UnreplicableDdl(
                format!("moving {table} into schema {to}, which is not replicated,"),
                SET_SCHEMA_OUT_HINT,
            ));
        }
        if !here && there {
            return Err(TrompeError::UnreplicableDdl(
                format!("moving {table}, which is not replicated, into replicated schema {to}"),
                SET_SCHEMA_IN_HINT,
            ));
        }
        Ok(())
    }
}

impl AddedColumns {
    /// Once the statement ran: refuses it if a column it added got a default that is not
    /// immutable (the statement's transaction then rolls back).
    pub fn check(self) -> Result<(), TrompeError> {
        for name in &self.columns {
            let c_name = crate::sql::cstring(name);
            // SAFETY: looks the column up and builds its default expression (NULL if none) in
            // the current memory context; the relation is opened with the lock the statement
            // holds already.
            let mutable = unsafe {
                let attnum = pg_sys::get_attnum(self.relid, c_name.as_ptr());
                if attnum <= 0 {
                    continue;
                }
                let rel = pg_sys::relation_open(self.relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
                let default = pg_sys::build_column_default(rel, attnum as i32);
                pg_sys::relation_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
                !default.is_null() && pg_sys::contain_mutable_functions(default)
            };
            if mutable {
                return Err(TrompeError::DivergentDdl {
                    what: format!("ADD COLUMN {name}"),
                    table: self.table.clone(),
                    reason:
                        "its default is not immutable, and each node would compute it when it replays the statement"
                            .into(),
                    hint: ADD_COLUMN_HINT,
                });
            }
        }
        Ok(())
    }
}
