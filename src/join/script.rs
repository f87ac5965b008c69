//! Running the schema script of a peer's dump here (its undo or create part, see
//! `trompe_core::dump`): as pg_restore wrote it, its session settings put back afterwards, and
//! column options no server accepts back (`trompe_core::dump::is_internal_column_option`) left
//! out of its `ALTER TABLE` statements by the utility hook, on the parsed statement.

use std::cell::Cell;
use std::ffi::CStr;

use pgrx::pg_sys;
use trompe_core::dump::is_internal_column_option;

use crate::pg_list::pointers;
use crate::sql;

thread_local! {
    /// Whether a schema script is running in this process.
    static RUNNING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `script` in the current transaction. The settings it makes (pg_restore's `SET`
/// lines, `set_config(..., false)`) hold for the script only: it runs at a GUC nest level of
/// its own, closed as after an error, so that every value is put back (as PostgreSQL does
/// around index builds).
pub fn run(script: &str) -> Result<(), String> {
    struct Running {
        level: i32,
    }
    impl Drop for Running {
        fn drop(&mut self) {
            RUNNING.set(false);
            // SAFETY: closes the nest level opened below (also while an error unwinds, before the
            // transaction's abort), restoring every setting changed at it.
            unsafe { pg_sys::AtEOXact_GUC(false, self.level) };
        }
    }
    // SAFETY: opens a GUC nest level, which Running's drop (or the transaction's abort) closes.
    let _running = Running { level: unsafe { pg_sys::NewGUCNestLevel() } };
    RUNNING.set(true);
    sql::execute(script, &[]).map(|_| ())
}

/// What the utility hook does with a statement.
pub enum Statement {
    /// Runs it (possibly a copy with options left out; then its tree may be changed further).
    Run { pstmt: *mut pg_sys::PlannedStmt, read_only_tree: bool },
    /// Nothing is left of it to run.
    Skip,
}

/// While a schema script runs, leaves internal column options out of `ALTER TABLE ... ALTER
/// COLUMN ... SET (...)`; every other statement is run as it is.
///
/// # Safety
/// `pstmt` is the valid planned statement the utility hook received.
pub unsafe fn without_internal_options(pstmt: *mut pg_sys::PlannedStmt, read_only_tree: bool) -> Statement {
    let unchanged = Statement::Run { pstmt, read_only_tree };
    if !RUNNING.get() {
        return unchanged;
    }
    // SAFETY: the caller passes a valid statement; nodes are read by their tags, lists by
    // their lengths. A read-only tree is copied (in the current memory context) before it is
    // changed.
    unsafe {
        let node = (*pstmt).utilityStmt;
        if node.is_null() || (*node).type_ != pg_sys::NodeTag::T_AlterTableStmt {
            return unchanged;
        }
        if !commands(node.cast()).into_iter().any(|cmd| internal_options(cmd).1 > 0) {
            return unchanged;
        }
        let pstmt: *mut pg_sys::PlannedStmt =
            if read_only_tree { pg_sys::copyObjectImpl(pstmt.cast()).cast() } else { pstmt };
        let stmt = (*pstmt).utilityStmt as *mut pg_sys::AlterTableStmt;
        let mut kept_commands: *mut pg_sys::List = std::ptr::null_mut();
        for cmd in commands(stmt) {
            let (options, dropped) = internal_options(cmd);
            if dropped > 0 {
                if options.is_empty() {
                    continue;
                }
                let mut list: *mut pg_sys::List = std::ptr::null_mut();
                for def in options {
                    list = pg_sys::lappend(list, def.cast());
                }
                (*cmd).def = list.cast();
            }
            kept_commands = pg_sys::lappend(kept_commands, cmd.cast());
        }
        if kept_commands.is_null() {
            return Statement::Skip;
        }
        (*stmt).cmds = kept_commands;
        Statement::Run { pstmt, read_only_tree: false }
    }
}

/// The commands of an `ALTER TABLE`.
unsafe fn commands(stmt: *mut pg_sys::AlterTableStmt) -> Vec<*mut pg_sys::AlterTableCmd> {
    // SAFETY: cmds is a (possibly empty) list of AlterTableCmd nodes.
    unsafe { pointers((*stmt).cmds) }
}

/// For `SET (...)` of a column: its options other than internal ones, and how many internal
/// ones it has (0 for every other command).
unsafe fn internal_options(cmd: *mut pg_sys::AlterTableCmd) -> (Vec<*mut pg_sys::DefElem>, usize) {
    // SAFETY: the def of a SET (...) command is a list of DefElems.
    unsafe {
        if (*cmd).subtype != pg_sys::AlterTableType::AT_SetOptions || (*cmd).def.is_null() {
            return (Vec::new(), 0);
        }
        let all: Vec<*mut pg_sys::DefElem> = pointers((*cmd).def.cast());
        let kept: Vec<*mut pg_sys::DefElem> = all
            .iter()
            .copied()
            .filter(|def| {
                (**def).defname.is_null()
                    || !is_internal_column_option(&CStr::from_ptr((**def).defname).to_string_lossy())
            })
            .collect();
        let dropped = all.len() - kept.len();
        (kept, dropped)
    }
}
