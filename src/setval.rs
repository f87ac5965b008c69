//! `setval` on a sequence a replicated table draws from means "continue above this value" on
//! every node, each in its own sequence slot: a data dump ends with `setval`, and so do Rails'
//! `reset_pk_sequence!` and Django's `sqlsequencereset`. Queries calling `pg_catalog.setval` are
//! made to call [`_setval`] instead (a post-parse-analysis hook swaps the function in the query
//! tree), which sets the value, moves it into this node's slot and logs the call for peers,
//! where it is replayed (and moved into their slots) in order with the rows.

use std::ffi::CStr;

use pgrx::prelude::*;

use crate::error::OrRaise;

static mut PREVIOUS_HOOK: pg_sys::post_parse_analyze_hook_type = None;

/// `setval(regclass, bigint)` and `setval(regclass, bigint, boolean)`.
const SETVAL: u32 = pg_sys::F_SETVAL_REGCLASS_INT8;
const SETVAL3: u32 = pg_sys::F_SETVAL_REGCLASS_INT8_BOOL;

/// Installs the hook (once per process).
pub fn install() {
    // SAFETY: hooks are installed from _PG_init, single-threaded, before any query runs.
    unsafe {
        PREVIOUS_HOOK = pg_sys::post_parse_analyze_hook;
        pg_sys::post_parse_analyze_hook = Some(after_parse_analyze);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn after_parse_analyze(
    pstate: *mut pg_sys::ParseState,
    query: *mut pg_sys::Query,
    jstate: *mut pg_sys::JumbleState,
) {
    // SAFETY: calls the hook installed before ours with what we were given.
    unsafe {
        if let Some(previous) = PREVIOUS_HOOK {
            previous(pstate, query, jstate);
        }
    }
    if crate::session::in_internal_operation() || !crate::capture::ddl::queries_run_now() {
        return;
    }
    // SAFETY: the source text is the query's NUL-terminated text (or NULL).
    let mentions_setval = unsafe {
        !pstate.is_null()
            && !(*pstate).p_sourcetext.is_null()
            && CStr::from_ptr((*pstate).p_sourcetext).to_bytes().windows(6).any(|w| w.eq_ignore_ascii_case(b"setval"))
    };
    if !mentions_setval || query.is_null() {
        return;
    }
    // SAFETY: catalog lookups inside the statement's transaction.
    let (two, three) = unsafe { (lookup(2), lookup(3)) };
    if two == pg_sys::InvalidOid || three == pg_sys::InvalidOid {
        return;
    }
    let mut ctx = (two, three);
    // SAFETY: walks the analysed query (and its subqueries), changing only the function of
    // setval calls to one with the same arguments and result.
    unsafe {
        pg_sys::query_tree_walker(query, Some(swap), (&raw mut ctx).cast(), 0);
    }
}

/// The oid of `trompe._setval` with `nargs` arguments, InvalidOid if this database has none.
unsafe fn lookup(nargs: usize) -> pg_sys::Oid {
    // SAFETY: builds a qualified name list and looks the function up (missing_ok).
    unsafe {
        let name = pg_sys::lappend(
            pg_sys::lappend(std::ptr::null_mut(), pg_sys::makeString(pg_sys::pstrdup(c"trompe".as_ptr())).cast()),
            pg_sys::makeString(pg_sys::pstrdup(c"_setval".as_ptr())).cast(),
        );
        let types = [pg_sys::OIDOID, pg_sys::INT8OID, pg_sys::BOOLOID];
        pg_sys::LookupFuncName(name, nargs as i32, types.as_ptr(), true)
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn swap(node: *mut pg_sys::Node, ctx: *mut std::ffi::c_void) -> bool {
    if node.is_null() {
        return false;
    }
    // SAFETY: the walker hands over nodes of the query tree; the tag says which struct it is;
    // ctx is the pair of replacement oids.
    unsafe {
        match (*node).type_ {
            pg_sys::NodeTag::T_Query => {
                return pg_sys::query_tree_walker(node.cast(), Some(swap), ctx, 0);
            }
            pg_sys::NodeTag::T_FuncExpr => {
                let f = node as *mut pg_sys::FuncExpr;
                let (two, three) = *(ctx as *const (pg_sys::Oid, pg_sys::Oid));
                if (*f).funcid == pg_sys::Oid::from(SETVAL) {
                    (*f).funcid = two;
                } else if (*f).funcid == pg_sys::Oid::from(SETVAL3) {
                    (*f).funcid = three;
                }
            }
            _ => {}
        }
        pg_sys::expression_tree_walker(node, Some(swap), ctx)
    }
}

/// `setval(seq, value)` as trompe applies it (see the module's documentation).
#[pg_extern(name = "_setval", volatile, parallel_unsafe)]
fn _setval2(seq: pg_sys::Oid, value: i64) -> i64 {
    set_and_share(seq, value, true)
}

/// `setval(seq, value, called)` as trompe applies it (see the module's documentation).
#[pg_extern(name = "_setval", volatile, parallel_unsafe)]
fn _setval3(seq: pg_sys::Oid, value: i64, called: bool) -> i64 {
    set_and_share(seq, value, called)
}

fn set_and_share(seq: pg_sys::Oid, value: i64, called: bool) -> i64 {
    let oid = seq.to_u32().to_string();
    let capture = !crate::session::applying_for_peer() && !crate::session::in_internal_operation();
    let _internal = crate::session::InternalOperation::begin();
    // The value is set as the caller asked (with the caller's privileges), then moved into this
    // node's slot if the sequence feeds a replicated table.
    crate::sql::execute(
        "SELECT pg_catalog.setval($1::oid::regclass, $2::bigint, $3::boolean)",
        &[Some(&oid), Some(&value.to_string()), Some(if called { "true" } else { "false" })],
    )
    .map_err(crate::error::TrompeError::Internal)
    .or_raise();
    let Some(qualified) = crate::sequences::continue_above(seq, if called { value } else { value - 1 }).or_raise()
    else {
        return value;
    };
    if capture {
        let statement = format!("SELECT pg_catalog.setval({}::regclass, {value}, {called})", literal(&qualified));
        let schema = crate::sql::value(
            "SELECT relnamespace::regnamespace::text FROM pg_class WHERE oid = $1::oid",
            &[Some(&oid)],
        )
        .ok()
        .flatten()
        .unwrap_or_default();
        let role = crate::sql::value("SELECT current_user::text", &[]).ok().flatten().unwrap_or_default();
        crate::capture::ddl::append("SELECT", &schema, &qualified, &statement, "", &role, &[]).or_raise();
    }
    value
}

/// `text` as an SQL string literal that reads the same whatever `standard_conforming_strings`.
fn literal(text: &str) -> String {
    let quoted = text.replace('\'', "''");
    if quoted.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    }
}
