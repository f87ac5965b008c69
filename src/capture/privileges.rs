//! DDL on what a replicated schema *is*, besides the objects in it: `GRANT`/`REVOKE` (on the
//! schema, on objects in it, on replicated tables elsewhere), `ALTER DEFAULT PRIVILEGES IN
//! SCHEMA`, and `ALTER SCHEMA ... RENAME`. PostgreSQL's event triggers name no object for
//! `GRANT` and `ALTER DEFAULT PRIVILEGES`, so the ProcessUtility hook notes what such a
//! statement targets and the DDL event trigger asks [`_privilege_targets_replicated`].

use std::cell::RefCell;
use std::ffi::CStr;

use pgrx::prelude::*;

/// What a `GRANT`, `REVOKE` or `ALTER DEFAULT PRIVILEGES` being run targets.
#[derive(Default)]
struct Targets {
    schemas: Vec<pg_sys::Oid>,
    relations: Vec<pg_sys::Oid>,
    functions: Vec<pg_sys::Oid>,
    types: Vec<pg_sys::Oid>,
}

thread_local! {
    /// One entry per privilege statement being run (innermost last).
    static TARGETS: RefCell<Vec<Targets>> = const { RefCell::new(Vec::new()) };
}

/// While alive, the targets of the privilege statement being run are known.
pub struct TargetsScope(());

impl Drop for TargetsScope {
    fn drop(&mut self) {
        TARGETS.with(|t| t.borrow_mut().pop());
    }
}

/// Before utility statement `node` runs: notes what a privilege statement targets, and moves a
/// replicated schema's entry along with an `ALTER SCHEMA ... RENAME` (on every node: the
/// statement's own transaction, so a failing rename takes it back).
///
/// # Safety
/// `node` must be a utility statement's parse tree (or NULL).
pub unsafe fn before_utility(node: *mut pg_sys::Node) -> Option<TargetsScope> {
    if node.is_null() {
        return None;
    }
    // SAFETY: the node's tag says which statement struct it is.
    let targets = unsafe {
        match (*node).type_ {
            pg_sys::NodeTag::T_GrantStmt => grant_targets(node as *mut pg_sys::GrantStmt),
            pg_sys::NodeTag::T_AlterDefaultPrivilegesStmt => {
                default_privileges_targets(node as *mut pg_sys::AlterDefaultPrivilegesStmt)
            }
            pg_sys::NodeTag::T_RenameStmt => {
                let stmt = node as *mut pg_sys::RenameStmt;
                if (*stmt).renameType == pg_sys::ObjectType::OBJECT_SCHEMA
                    && !(*stmt).subname.is_null()
                    && !(*stmt).newname.is_null()
                {
                    rename_replicated_schema(
                        &CStr::from_ptr((*stmt).subname).to_string_lossy(),
                        &CStr::from_ptr((*stmt).newname).to_string_lossy(),
                    );
                }
                return None;
            }
            _ => return None,
        }
    };
    TARGETS.with(|t| t.borrow_mut().push(targets));
    Some(TargetsScope(()))
}

/// Keeps a replicated schema replicated under its new name.
fn rename_replicated_schema(old: &str, new: &str) {
    // SAFETY: syscache lookups inside the statement's transaction.
    let has_trompe = unsafe {
        let nsp = pg_sys::get_namespace_oid(c"trompe".as_ptr(), true);
        nsp != pg_sys::InvalidOid && pg_sys::get_relname_relid(c"schemas".as_ptr(), nsp) != pg_sys::InvalidOid
    };
    if !has_trompe {
        return;
    }
    let _internal = crate::session::InternalOperation::begin();
    let renamed = crate::run_as::as_extension_owner(|| {
        crate::sql::execute(
            "UPDATE trompe.schemas SET schema_name = $2 WHERE schema_name = $1",
            &[Some(old), Some(new)],
        )
    });
    if let Err(e) = renamed {
        pgrx::warning!("trompe: could not follow the rename of schema {old} to {new}: {e}");
    }
}

/// Iterates a PostgreSQL list of pointers.
unsafe fn elements(list: *mut pg_sys::List) -> impl Iterator<Item = *mut std::ffi::c_void> {
    let n = if list.is_null() { 0 } else { unsafe { (*list).length as usize } };
    // SAFETY: the list has n pointer cells.
    (0..n).map(move |i| unsafe { (*(*list).elements.add(i)).ptr_value })
}

/// The namespace named by String node `s` (InvalidOid if none).
unsafe fn namespace_of_name(s: *mut std::ffi::c_void) -> pg_sys::Oid {
    // SAFETY: a String node, as the grammar makes schema names.
    unsafe {
        let s = s as *mut pg_sys::String;
        if s.is_null() || (*s).sval.is_null() {
            return pg_sys::InvalidOid;
        }
        pg_sys::get_namespace_oid((*s).sval, true)
    }
}

unsafe fn grant_targets(stmt: *mut pg_sys::GrantStmt) -> Targets {
    let mut t = Targets::default();
    // SAFETY: the grammar builds the objects list by target type and object type, as matched.
    unsafe {
        let objects = (*stmt).objects;
        if (*stmt).targtype == pg_sys::GrantTargetType::ACL_TARGET_ALL_IN_SCHEMA {
            t.schemas.extend(elements(objects).map(|s| namespace_of_name(s)));
            return t;
        }
        match (*stmt).objtype {
            pg_sys::ObjectType::OBJECT_TABLE | pg_sys::ObjectType::OBJECT_SEQUENCE => {
                for range in elements(objects) {
                    t.relations.push(pg_sys::RangeVarGetRelidExtended(
                        range.cast(),
                        pg_sys::NoLock as pg_sys::LOCKMODE,
                        pg_sys::RVROption::RVR_MISSING_OK,
                        None,
                        std::ptr::null_mut(),
                    ));
                }
            }
            pg_sys::ObjectType::OBJECT_SCHEMA => {
                t.schemas.extend(elements(objects).map(|s| namespace_of_name(s)));
            }
            kind @ (pg_sys::ObjectType::OBJECT_FUNCTION
            | pg_sys::ObjectType::OBJECT_PROCEDURE
            | pg_sys::ObjectType::OBJECT_ROUTINE) => {
                for owa in elements(objects) {
                    t.functions.push(pg_sys::LookupFuncWithArgs(kind, owa.cast(), true));
                }
            }
            pg_sys::ObjectType::OBJECT_TYPE | pg_sys::ObjectType::OBJECT_DOMAIN => {
                for names in elements(objects) {
                    let type_name = pg_sys::makeTypeNameFromNameList(names.cast());
                    t.types.push(pg_sys::LookupTypeNameOid(std::ptr::null_mut(), type_name, true));
                }
            }
            _ => {}
        }
    }
    t
}

unsafe fn default_privileges_targets(stmt: *mut pg_sys::AlterDefaultPrivilegesStmt) -> Targets {
    let mut t = Targets::default();
    // SAFETY: the options are DefElems; "schemas" holds a list of String nodes.
    unsafe {
        for def in elements((*stmt).options) {
            let def = def as *mut pg_sys::DefElem;
            if !(*def).defname.is_null() && CStr::from_ptr((*def).defname).to_bytes() == b"schemas" {
                t.schemas.extend(elements((*def).arg.cast()).map(|s| namespace_of_name(s)));
            }
        }
    }
    t
}

fn oid_array(oids: &[pg_sys::Oid]) -> String {
    let items: Vec<String> =
        oids.iter().filter(|o| **o != pg_sys::InvalidOid).map(|o| o.to_u32().to_string()).collect();
    format!("{{{}}}", items.join(","))
}

/// Whether the `GRANT`, `REVOKE` or `ALTER DEFAULT PRIVILEGES` being run targets a replicated
/// schema, something in one, a replicated table or a sequence one owns (called by the DDL event
/// trigger).
#[pg_extern(volatile, parallel_unsafe)]
fn _privilege_targets_replicated() -> bool {
    let arrays = TARGETS.with(|t| {
        t.borrow()
            .last()
            .map(|t| [oid_array(&t.schemas), oid_array(&t.relations), oid_array(&t.functions), oid_array(&t.types)])
    });
    let Some([schemas, relations, functions, types]) = arrays else { return false };
    crate::sql::flag(
        "SELECT EXISTS (
                  SELECT 1 FROM pg_catalog.pg_namespace n
                   WHERE n.nspname IN (SELECT schema_name FROM trompe.schemas)
                     AND n.oid IN (SELECT unnest($1::oid[])
                                   UNION ALL SELECT relnamespace FROM pg_catalog.pg_class WHERE oid = ANY ($2::oid[])
                                   UNION ALL SELECT pronamespace FROM pg_catalog.pg_proc WHERE oid = ANY ($3::oid[])
                                   UNION ALL SELECT typnamespace FROM pg_catalog.pg_type WHERE oid = ANY ($4::oid[])))
             OR EXISTS (
                  SELECT 1 FROM trompe.tables t
                   WHERE t.relid::oid = ANY ($2::oid[])
                      OR t.relid::oid IN (SELECT d.refobjid FROM pg_catalog.pg_depend d
                                           WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = ANY ($2::oid[])
                                             AND d.refclassid = 'pg_catalog.pg_class'::regclass
                                             AND d.deptype IN ('a', 'i')))",
        &[Some(&schemas), Some(&relations), Some(&functions), Some(&types)],
    )
    .unwrap_or(false)
}
