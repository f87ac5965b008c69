//! Replicated DDL that PostgreSQL runs only outside a transaction block (`CREATE INDEX
//! CONCURRENTLY`, `DROP INDEX CONCURRENTLY`, `REINDEX ... CONCURRENTLY`): the worker runs it as
//! a top-level statement of its own, as a client would, before the apply transaction that moves
//! the position past it. It is made safe to run again (a crash between the two repeats it):
//! an index it would create that exists and is valid is left alone, an invalid one (a build cut
//! short) is dropped first; an index it would drop that is gone is not dropped again.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::PgTryBuilder;

use crate::sql::cstring;
use crate::worker::txn::{in_transaction, in_transaction_coded, TxnError};

/// What a statement that cannot run inside a transaction block does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `CREATE INDEX CONCURRENTLY`.
    CreateIndex,
    /// `DROP INDEX CONCURRENTLY`.
    DropIndex,
    /// `REINDEX ... CONCURRENTLY`.
    Reindex,
}

/// Whether DDL `statement` must run outside a transaction block, and what it does (call inside
/// a transaction).
pub fn kind_of(statement: &str) -> Option<Kind> {
    let text = cstring(statement);
    // SAFETY: parses the text (raw parse, no catalog access) in the current memory context; a
    // syntax error raises, which the caller's transaction catches; nodes are read by their tags.
    unsafe {
        let list = pg_sys::pg_parse_query(text.as_ptr());
        if list.is_null() || (*list).length != 1 {
            return None;
        }
        let raw = (*(*list).elements).ptr_value as *mut pg_sys::RawStmt;
        let node = (*raw).stmt;
        match (*node).type_ {
            pg_sys::NodeTag::T_IndexStmt if (*(node as *mut pg_sys::IndexStmt)).concurrent => Some(Kind::CreateIndex),
            pg_sys::NodeTag::T_DropStmt => {
                let drop = node as *mut pg_sys::DropStmt;
                ((*drop).concurrent && (*drop).removeType == pg_sys::ObjectType::OBJECT_INDEX)
                    .then_some(Kind::DropIndex)
            }
            pg_sys::NodeTag::T_ReindexStmt => {
                let params = (*(node as *mut pg_sys::ReindexStmt)).params;
                let concurrently = crate::pg_list::pointers::<pg_sys::DefElem>(params).into_iter().any(|def| {
                    !(*def).defname.is_null() && CStr::from_ptr((*def).defname).to_bytes() == b"concurrently"
                });
                concurrently.then_some(Kind::Reindex)
            }
            _ => None,
        }
    }
}

/// Runs `statement` (one of [`Kind`]) as a top-level command with the origin's `search_path`,
/// `role` and session `settings` (see `crate::ddl_settings`), once admitted, as the role picked
/// for the origin's `role`; `object` is what the origin's event trigger named (the index,
/// schema-qualified).
pub fn run(
    kind: Kind,
    statement: &str,
    search_path: &str,
    role: &str,
    settings: &[(&str, &str)],
    object: &str,
) -> Result<(), TxnError> {
    // Admitted as any peer DDL is, and run as the role picked for it (src/peer_ddl.rs).
    let role = &in_transaction_coded(|| {
        let parsing = crate::ddl_settings::set_for_statement(settings);
        let refused = |r: crate::peer_ddl::Refusal| TxnError {
            code: Some(r.code()),
            message: format!("DDL from the peer refused: {r}"),
        };
        let run_as = crate::peer_ddl::run_as(role).map_err(refused)?;
        crate::sql::execute(
            "SELECT set_config('search_path', $1, true), set_config('role', $2, true)",
            &[Some(search_path), Some(&run_as)],
        )?;
        let admitted = crate::peer_ddl::admit(statement).map_err(refused);
        parsing.end();
        admitted?;
        Ok(run_as)
    })?;
    let exists = || -> Result<Option<bool>, String> {
        in_transaction(|| {
            let valid = crate::sql::value(
                "SELECT i.indisvalid FROM pg_catalog.pg_index i WHERE i.indexrelid = to_regclass($1)",
                &[Some(object)],
            )?;
            Ok(valid.map(|v| v == "t"))
        })
    };
    match (kind, exists()?) {
        (Kind::CreateIndex, Some(true)) | (Kind::DropIndex, None) => return Ok(()),
        (Kind::CreateIndex, Some(false)) => {
            // Object identities are quoted where needed ("My Schema".idx), as SQL takes them.
            let drop = format!("DROP INDEX CONCURRENTLY IF EXISTS {object}");
            toplevel(&drop, "", role, &[])?;
        }
        _ => {}
    }
    // Only where the index goes: lock_timeout would make these commands give up waiting for
    // transactions older than them (a `wait_sync` on this node among them), which they do not
    // hold up meanwhile, and start over at the next attempt; the other settings do not change
    // what they do.
    let settings: Vec<(&str, &str)> =
        settings.iter().copied().filter(|(name, _)| *name == "default_tablespace").collect();
    toplevel(statement, search_path, role, &settings)
}

/// Runs one statement the way a client's simple query runs it: a transaction of its own,
/// `PROCESS_UTILITY_TOPLEVEL`, so that commands which commit internally can do so.
fn toplevel(statement: &str, search_path: &str, role: &str, settings: &[(&str, &str)]) -> Result<(), TxnError> {
    let text = cstring(statement);
    // The parse tree must outlive the transactions the command commits itself: it is made in
    // the memory context current before the transaction starts (the worker loop's).
    // SAFETY: reads the current memory context.
    let outer = unsafe { pg_sys::CurrentMemoryContext };
    // SAFETY: starts a transaction in the worker, outside any other; settings are set for the
    // session (the command may commit and start transactions itself) and reset afterwards.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
    }
    let result = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
        // SAFETY: as above; the statement runs through a portal, as a client's simple query
        // does (PortalRun makes it the active portal, runs it at top level in the portal's
        // memory, which outlives the transactions the command commits itself, and manages the
        // snapshot); the parse tree is made in the memory context current before the
        // transaction started (the worker loop's) for the same reason.
        unsafe {
            pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
            crate::ddl_settings::set_for_session(settings);
            crate::sql::execute(
                "SELECT set_config('search_path', $1, false), set_config('role', $2, false)",
                &[Some(search_path), Some(if role.is_empty() { "none" } else { role })],
            )?;
            pg_sys::PopActiveSnapshot();
            let inner = pg_sys::MemoryContextSwitchTo(outer);
            let list = pg_sys::pg_parse_query(text.as_ptr());
            let planned = pg_sys::palloc0(std::mem::size_of::<pg_sys::PlannedStmt>()) as *mut pg_sys::PlannedStmt;
            pg_sys::MemoryContextSwitchTo(inner);
            if list.is_null() || (*list).length != 1 {
                return Err(TxnError::from("a replicated statement must be exactly one statement"));
            }
            let raw = (*(*list).elements).ptr_value as *mut pg_sys::RawStmt;
            (*planned).type_ = pg_sys::NodeTag::T_PlannedStmt;
            (*planned).commandType = pg_sys::CmdType::CMD_UTILITY;
            (*planned).canSetTag = true;
            (*planned).utilityStmt = (*raw).stmt;
            (*planned).stmt_location = (*raw).stmt_location;
            (*planned).stmt_len = (*raw).stmt_len;
            let portal = pg_sys::CreatePortal(c"".as_ptr(), true, true);
            (*portal).visible = false;
            let stmts = pg_sys::lappend(std::ptr::null_mut(), planned.cast());
            pg_sys::PortalDefineQuery(
                portal,
                std::ptr::null(),
                text.as_ptr(),
                pg_sys::CreateCommandTag((*raw).stmt),
                stmts,
                std::ptr::null_mut(),
            );
            pg_sys::PortalStart(portal, std::ptr::null_mut(), 0, std::ptr::null_mut());
            crate::pg_compat::portal_run(
                portal,
                std::ffi::c_long::MAX,
                true,
                pg_sys::None_Receiver,
                pg_sys::None_Receiver,
                std::ptr::null_mut(),
            );
            pg_sys::PortalDrop(portal, false);
            pg_sys::CommitTransactionCommand();
        }
        Ok(())
    }))
    .catch_others(|e| Err(caught(&e)))
    .execute();
    if result.is_err() {
        // SAFETY: rolls back whatever transaction state is left.
        unsafe { pg_sys::AbortCurrentTransaction() };
    }
    // The session's settings go back to the worker's own, whatever happened.
    let reset = in_transaction(|| {
        crate::ddl_settings::reset_session(settings);
        crate::sql::execute("SELECT set_config('role', 'none', false), set_config('search_path', '', false)", &[])
            .map(|_| ())
    });
    result.and(reset.map_err(TxnError::from))
}

fn caught(e: &CaughtError) -> TxnError {
    crate::worker::txn::error_of(e)
}
