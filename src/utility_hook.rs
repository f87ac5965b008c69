//! trompe's ProcessUtility hook: remembers the exact text of each utility statement for DDL
//! capture, and the RESTART IDENTITY flag of TRUNCATE.

use pgrx::pg_sys;

use crate::capture::ddl::StatementScope;
use crate::error::OrRaise;
use crate::join::script::Statement;

static mut PREVIOUS_HOOK: pg_sys::ProcessUtility_hook_type = None;

/// Installs the hook (once per process).
pub fn install() {
    // SAFETY: hooks are installed from _PG_init, single-threaded, before any statement runs.
    unsafe {
        PREVIOUS_HOOK = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

/// The text of the statement `pstmt` inside the whole query string.
unsafe fn statement_text(pstmt: *mut pg_sys::PlannedStmt, query: *const std::ffi::c_char) -> String {
    if query.is_null() {
        return String::new();
    }
    let whole = std::ffi::CStr::from_ptr(query).to_string_lossy();
    let location = (*pstmt).stmt_location.max(0) as usize;
    let len = (*pstmt).stmt_len.max(0) as usize;
    let bytes = whole.as_bytes();
    if location >= bytes.len() {
        return whole.trim().to_string();
    }
    let end = if len == 0 { bytes.len() } else { (location + len).min(bytes.len()) };
    String::from_utf8_lossy(&bytes[location..end]).trim().to_string()
}

#[allow(clippy::too_many_arguments)]
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // A peer's schema dump may set column options this server refuses (see join::script).
    let (pstmt, read_only_tree) = match crate::join::script::without_internal_options(pstmt, read_only_tree) {
        Statement::Run { pstmt, read_only_tree } => (pstmt, read_only_tree),
        Statement::Skip => return,
    };
    let node = (*pstmt).utilityStmt;
    // BEGIN, COMMIT, SAVEPOINT and the like are never DDL: no statement to remember.
    if !node.is_null() && (*node).type_ == pg_sys::NodeTag::T_TransactionStmt {
        // A prepared transaction commits here, not through the commit callback of the session
        // that wrote it: announce it as that callback and the tombstone writers do (waking
        // pulls; what is cached about tombstones is rechecked). It may not have written any,
        // which costs a wake-up and a recheck.
        // SAFETY: a node tagged T_TransactionStmt is a TransactionStmt.
        let commits_prepared = (*(node as *mut pg_sys::TransactionStmt)).kind
            == pg_sys::TransactionStmtKind::TRANS_STMT_COMMIT_PREPARED
            && installed_here();
        if !commits_prepared {
            return run_previous(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc);
        }
        let _markers = crate::marker_writes::prepared_commit_starts();
        run_previous(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc);
        crate::shmem::announce_log_commit();
        return;
    }
    // Another database's worker steps out of DROP DATABASE's way whatever this one holds.
    crate::worker::dbguard::before_utility(node);
    // shared_preload_libraries loads trompe into every database of the cluster: one without
    // the extension runs its statements as if trompe were not there.
    if !installed_here() && !creates_extension(node) {
        return run_previous(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc);
    }
    let restart = !node.is_null()
        && (*node).type_ == pg_sys::NodeTag::T_TruncateStmt
        && (*(node as *mut pg_sys::TruncateStmt)).restart_seqs;
    // What the policy notes (and what keeping row versions caches) for the transaction is
    // forgotten when it ends.
    crate::capture::xact::ensure_xact_callback();
    crate::capture::ddl::note_index_drops(node);
    crate::row_versions::before_utility(node);
    let rename = crate::ddl_history::before_utility(node);
    let added = crate::capture::ddl_policy::before_utility(node).or_raise();
    let _privileges = crate::capture::privileges::before_utility(node);
    let _scope = StatementScope::enter(statement_text(pstmt, query_string), restart, node);
    run_previous(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc);
    if let Err(e) = crate::row_versions::after_utility() {
        pgrx::warning!("trompe: keeping the versions of rows this statement froze failed (the worker retries): {e}");
    }
    if let Some(added) = added {
        added.check().or_raise();
    }
    if let Some(rename) = rename {
        rename.record();
    }
}

/// Whether the extension is installed in the current database (also while its script runs).
fn installed_here() -> bool {
    // SAFETY: a catalog lookup; utility statements run inside a transaction.
    unsafe { pg_sys::get_extension_oid(c"trompe".as_ptr(), true) != pg_sys::InvalidOid }
}

/// Whether `node` is a `CREATE EXTENSION` (of any extension): it takes the usual path, as it
/// did before this database had trompe.
unsafe fn creates_extension(node: *mut pg_sys::Node) -> bool {
    // SAFETY: only the node's tag is read (caller passes a statement's node, or NULL).
    !node.is_null() && unsafe { (*node).type_ } == pg_sys::NodeTag::T_CreateExtensionStmt
}

/// Runs the statement through the hook installed before ours, or the standard one.
#[allow(clippy::too_many_arguments)]
unsafe fn run_previous(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    match PREVIOUS_HOOK {
        Some(previous) => previous(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc),
        None => {
            pg_sys::standard_ProcessUtility(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc)
        }
    }
}
