//! DDL capture. The event triggers (in `sql/finalize.sql`) decide whether a command touches
//! replicated objects; this module gives them the exact text of the statement being run (kept
//! by the ProcessUtility hook, so one statement of a multi-statement string is replayed, not
//! the whole string) and appends the `S` log entry.

use std::cell::RefCell;

use pgrx::prelude::*;

use trompe_core::changeset::{ChangeWriter, OldVersion};
use trompe_core::logformat::Op;

use crate::error::OrRaise;
use crate::session::{applying_for_peer, in_internal_operation};

/// The utility statement being executed at one nesting level.
struct Statement {
    text: String,
    search_path: String,
    role: String,
    truncate_restart_identity: bool,
    /// `standard_conforming_strings` as the statement was scanned, when it differs from the
    /// value in effect as it runs (a `SET` earlier in the same query string).
    scanned_standard_strings: Option<bool>,
}

thread_local! {
    static STATEMENTS: RefCell<Vec<Statement>> = const { RefCell::new(Vec::new()) };
    /// The table of each index the statement being run drops (their catalog rows are gone by
    /// the time the `sql_drop` event trigger decides whether to log the statement).
    static DROPPED_INDEXES: RefCell<Vec<(pg_sys::Oid, pg_sys::Oid)>> = const { RefCell::new(Vec::new()) };
}

/// Before a `DROP INDEX` runs: notes the table of each index it drops.
///
/// # Safety
/// `node` must be a utility statement's parse tree (or NULL).
pub unsafe fn note_index_drops(node: *mut pg_sys::Node) {
    if node.is_null() || (*node).type_ != pg_sys::NodeTag::T_DropStmt {
        return;
    }
    let stmt = node as *mut pg_sys::DropStmt;
    if (*stmt).removeType != pg_sys::ObjectType::OBJECT_INDEX || (*stmt).objects.is_null() {
        return;
    }
    let list = (*stmt).objects;
    let mut found = Vec::new();
    for i in 0..(*list).length as usize {
        // SAFETY: each element of a DROP INDEX's object list is a list of name strings; the
        // lookups return InvalidOid for what does not exist (DROP INDEX IF EXISTS).
        unsafe {
            let names = (*(*list).elements.add(i)).ptr_value as *mut pg_sys::List;
            let range = pg_sys::makeRangeVarFromNameList(names);
            let index = pg_sys::RangeVarGetRelidExtended(
                range,
                pg_sys::NoLock as pg_sys::LOCKMODE,
                pg_sys::RVROption::RVR_MISSING_OK,
                None,
                std::ptr::null_mut(),
            );
            if index != pg_sys::InvalidOid {
                let table = pg_sys::IndexGetRelation(index, true);
                if table != pg_sys::InvalidOid {
                    found.push((index, table));
                }
            }
        }
    }
    DROPPED_INDEXES.with(|d| *d.borrow_mut() = found);
}

/// The table of index `index`, which the statement being run drops (NULL if not known).
#[pg_extern(volatile, parallel_unsafe)]
fn _dropped_index_table(index: pg_sys::Oid) -> Option<pg_sys::Oid> {
    DROPPED_INDEXES.with(|d| d.borrow().iter().find(|(i, _)| *i == index).map(|(_, t)| *t))
}

/// While alive, `text` is the innermost utility statement being executed.
pub struct StatementScope(());

impl StatementScope {
    /// Records the statement the ProcessUtility hook is about to run (`tree`, its parse tree).
    ///
    /// # Safety
    /// `tree` must be the statement's parse tree (or NULL), not yet changed by running it.
    pub unsafe fn enter(text: String, truncate_restart_identity: bool, tree: *mut pg_sys::Node) -> Self {
        // SAFETY: as the caller promises.
        let scanned_standard_strings = unsafe { scanned_standard_strings(&text, tree) };
        // SAFETY: namespace_search_path is the search_path GUC's current string; GetUserId and
        // GetUserNameFromId read the current user (noerr: NULL if it vanished).
        let (search_path, role) = unsafe {
            let sp = pg_sys::namespace_search_path;
            let sp =
                if sp.is_null() { String::new() } else { std::ffi::CStr::from_ptr(sp).to_string_lossy().into_owned() };
            let name = pg_sys::GetUserNameFromId(pg_sys::GetUserId(), true);
            let role = if name.is_null() {
                String::new()
            } else {
                std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned()
            };
            (sp, role)
        };
        STATEMENTS.with(|s| {
            s.borrow_mut().push(Statement {
                text,
                search_path,
                role,
                truncate_restart_identity,
                scanned_standard_strings,
            })
        });
        StatementScope(())
    }
}

impl Drop for StatementScope {
    fn drop(&mut self) {
        STATEMENTS.with(|s| s.borrow_mut().pop());
    }
}

/// Whether queries analysed now run as they are (a client's query, or one run by `DO`, `CALL`,
/// `EXECUTE`, `EXPLAIN`, `PREPARE`, `DECLARE`, `COPY`) rather than being stored by the statement being run (a view, a rule, a
/// function body, `CREATE TABLE AS`).
pub fn queries_run_now() -> bool {
    STATEMENTS.with(|s| {
        s.borrow().last().is_none_or(|st| {
            let word: String = st.text.trim_start().chars().take_while(|c| c.is_ascii_alphabetic()).collect::<String>();
            ["do", "call", "execute", "explain", "prepare", "declare", "copy"]
                .iter()
                .any(|w| word.eq_ignore_ascii_case(w))
        })
    })
}

/// Whether the innermost TRUNCATE being run restarts identity sequences.
pub fn truncate_restarts_identity() -> bool {
    STATEMENTS.with(|s| s.borrow().last().is_some_and(|st| st.truncate_restart_identity))
}

/// The `standard_conforming_strings` statement `text` (parse tree `tree`) was scanned with, if
/// not the current one. All statements of a query string are scanned before the first runs, so
/// a `SET standard_conforming_strings` in the same string changes the setting but not how the
/// statements after it read. Only text with a backslash can read differently: it is parsed
/// again with the current value and, if that gives another tree, with the other one.
unsafe fn scanned_standard_strings(text: &str, tree: *mut pg_sys::Node) -> Option<bool> {
    if tree.is_null() || !text.contains('\\') {
        return None;
    }
    // SAFETY: reads the scanner's setting (a backend-local global).
    let current = unsafe { pg_sys::standard_conforming_strings };
    // SAFETY: the caller passes the statement's parse tree. Text that does not parse with the
    // current value (a backslash before the closing quote) was scanned with the other one too.
    if unsafe { parses_to(text, tree, current) } == Some(true) {
        return None;
    }
    // SAFETY: as above.
    (unsafe { parses_to(text, tree, !current) } == Some(true)).then_some(!current)
}

/// Whether `text`, scanned with `standard_conforming_strings = standard`, parses to `tree`
/// (locations aside); None if it does not parse that way.
unsafe fn parses_to(text: &str, tree: *mut pg_sys::Node, standard: bool) -> Option<bool> {
    /// Puts the scanner's setting back, also when parsing raises an error.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: restores a backend-local global.
            unsafe { pg_sys::standard_conforming_strings = self.0 };
        }
    }
    let c_text = std::ffi::CString::new(text.replace('\0', "")).unwrap_or_default();
    pgrx::PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
        // SAFETY: the raw parser only reads the text and this global, and allocates in the
        // current memory context; a syntax error is caught below (it holds no resources).
        unsafe {
            let _restore = Restore(pg_sys::standard_conforming_strings);
            pg_sys::standard_conforming_strings = standard;
            let list = pg_sys::raw_parser(c_text.as_ptr(), pg_sys::RawParseMode::RAW_PARSE_DEFAULT);
            if list.is_null() || (*list).length != 1 {
                return None;
            }
            let raw = (*(*list).elements).ptr_value as *mut pg_sys::RawStmt;
            Some(pg_sys::equal((*raw).stmt.cast(), tree.cast()))
        }
    }))
    .catch_others(|_| None)
    .execute()
}

/// The text, search_path, role and scanned `standard_conforming_strings` (if not the current)
/// of the utility statement being executed, if the hook saw it.
fn current_statement() -> Option<(String, String, String, Option<bool>)> {
    STATEMENTS.with(|s| {
        s.borrow()
            .last()
            .map(|st| (st.text.clone(), st.search_path.clone(), st.role.clone(), st.scanned_standard_strings))
    })
}

/// True if DDL run now must not be captured: trompe's own commands, changes applied for a
/// peer, and extension scripts.
#[pg_extern(volatile, parallel_unsafe)]
fn _capture_skipped() -> bool {
    // SAFETY: reading a backend-local global.
    in_internal_operation() || applying_for_peer() || unsafe { pg_sys::creating_extension }
}

/// Appends the DDL statement being run to the change log, with the search_path, role and
/// session settings in effect (`crate::ddl_settings`), so peers replay it in order with the
/// surrounding changes, as it ran here.
#[pg_extern(volatile, parallel_unsafe)]
fn _log_ddl(command_tag: &str, object_schema: &str, object_name: &str) {
    let (statement, search_path, role, scanned_standard_strings) = current_statement().unwrap_or_else(|| {
        // Without the hook (library loaded by this very DDL), fall back to the client's query.
        // SAFETY: debug_query_string is the client's whole query string or NULL.
        let text = unsafe {
            if pg_sys::debug_query_string.is_null() {
                String::new()
            } else {
                std::ffi::CStr::from_ptr(pg_sys::debug_query_string).to_string_lossy().into_owned()
            }
        };
        let search_path =
            crate::sql::value("SELECT current_setting('search_path')", &[]).ok().flatten().unwrap_or_default();
        let role = crate::sql::value("SELECT current_user", &[]).ok().flatten().unwrap_or_default();
        (text, search_path, role, None)
    });
    // The settings are read here, not by the hook: nothing between the two changes them, and
    // only statements that are logged pay for reading them.
    let mut settings = crate::ddl_settings::current();
    if let Some(scanned) = scanned_standard_strings {
        for (name, value) in &mut settings {
            if *name == trompe_core::ddlsettings::STANDARD_STRINGS {
                *value = if scanned { "on" } else { "off" }.to_string();
            }
        }
    }
    // What peers would refuse to run fails here, before it reaches them. It is parsed as it was
    // scanned, as peers parse it (a SET earlier in the same query string changed nothing).
    let scanned: Vec<(&str, &str)> = settings
        .iter()
        .filter(|(name, _)| *name == trompe_core::ddlsettings::STANDARD_STRINGS)
        .map(|(name, value)| (*name, value.as_str()))
        .collect();
    let parsing = crate::ddl_settings::set_for_statement(&scanned);
    let checked = crate::peer_ddl::check_own(&statement);
    parsing.end();
    if let Err(refusal) = checked {
        crate::error::TrompeError::PeersRefuseDdl(refusal.to_string()).raise();
    }
    append(command_tag, object_schema, object_name, &statement, &search_path, &role, &settings).or_raise();
}

/// Appends a statement to the change log as DDL, to be replayed by peers with `search_path`,
/// `role` and `settings`.
pub fn append(
    command_tag: &str,
    object_schema: &str,
    object_name: &str,
    statement: &str,
    search_path: &str,
    role: &str,
    settings: &[(&'static str, String)],
) -> Result<(), crate::error::TrompeError> {
    crate::capture::xact::record(object_schema, object_name, |buf, seq| {
        let mut w = ChangeWriter::begin(buf, Op::Ddl, seq, object_schema.as_bytes(), object_name.as_bytes())
            .cols(std::iter::empty())
            .list(trompe_core::ddlsettings::FIRST + 2 * settings.len());
        for part in [statement, search_path, role, command_tag] {
            w = w.value(Some(part.as_bytes()));
        }
        for (name, value) in settings {
            w = w.value(Some(name.as_bytes())).value(Some(value.as_bytes()));
        }
        w.none().finish(OldVersion::Unknown);
    })
}
