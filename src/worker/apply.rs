//! Applying a peer's changes in-process, through SPI with saved plans and typed parameters
//! (values are converted with each column's input function, never spliced into SQL; names
//! are always quoted). Only tables replicated on this node are written.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::rc::Rc;

use pgrx::pg_sys;
use trompe_core::ident::{check_identifier, quote_ident, quote_qualified};
use trompe_core::logformat::Op;

/// One change from a peer's log.
#[derive(Debug)]
pub struct Change {
    /// The log id of the last change of its transaction.
    pub txn_last: i64,
    /// Commit time of its transaction at the origin (PostgreSQL TimestampTz).
    pub commit_us: i64,
    /// Its position in its transaction at the origin.
    pub id: i64,
    /// What kind of change.
    pub op: Op,
    /// Schema.
    pub nsp: String,
    /// Table.
    pub rel: String,
    /// Column names (primary key first).
    pub cols: Vec<String>,
    /// New values (I/U), options (T), statement parts (S).
    pub vals: Option<Vec<Option<String>>>,
    /// Old primary key (U/D).
    pub oldkey: Option<Vec<Option<String>>>,
    /// The row version this change replaced at the origin.
    pub old: trompe_core::changeset::OldVersion,
}

/// Why a change could not be applied; the message is shown in `trompe.status`.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A table the change is for does not exist here.
    #[error("table {0} does not exist on this node")]
    NoSuchTable(String),
    /// A table the change is for is not replicated here.
    #[error("table {0} is not replicated on this node")]
    NotReplicated(String),
    /// A column of the change does not exist here.
    #[error("column {column} of table {table} does not exist on this node")]
    NoSuchColumn {
        /// The table.
        table: String,
        /// The column.
        column: String,
    },
    /// The primary keys differ between the nodes.
    #[error("table {0} has a different primary key on this node than on the peer")]
    KeyMismatch(String),
    /// The change itself is malformed.
    #[error("malformed change {id}: {reason}")]
    Malformed {
        /// Its log id.
        id: i64,
        /// What is wrong.
        reason: String,
    },
    /// PostgreSQL raised an error while applying.
    #[error("{0}")]
    Postgres(String),
}

/// A column of a local table, with what converting text to its type needs.
struct Attr {
    typid: pg_sys::Oid,
    typmod: i32,
    /// The type's input function, allocated in the table's memory context.
    input: *mut pg_sys::FmgrInfo,
    ioparam: pg_sys::Oid,
    /// The array type over this type (0 if there is none, e.g. for array columns).
    array_type: pg_sys::Oid,
    typlen: i16,
    typbyval: bool,
    typalign: std::ffi::c_char,
}

impl Attr {
    /// Converts a text value with the type's input function (`None` is NULL), as COPY does;
    /// bad input raises a PostgreSQL error, caught by the caller's transaction.
    fn datum(&self, text: Option<&str>) -> (pg_sys::Datum, bool) {
        match text {
            None => (pg_sys::Datum::from(0), true),
            Some(t) => {
                let c = cstring(t);
                // SAFETY: the input function and its parameters come from the column's type.
                let d = unsafe {
                    pg_sys::InputFunctionCall(
                        self.input,
                        c.as_ptr() as *mut std::ffi::c_char,
                        self.ioparam,
                        self.typmod,
                    )
                };
                (d, false)
            }
        }
    }
}

/// What apply knows about a local table.
struct Table {
    qualified: String,
    replicated: bool,
    key: Vec<String>,
    attrs: HashMap<String, Attr>,
    context: pg_sys::MemoryContext,
}

impl Drop for Table {
    fn drop(&mut self) {
        // SAFETY: the context was created by load_table and is deleted only here.
        unsafe { pg_sys::MemoryContextDelete(self.context) };
    }
}

/// Where a statement parameter comes from.
#[derive(Clone, Copy)]
enum Source {
    Val(usize),
    OldKey(usize),
}

struct Statement {
    plan: pg_sys::SPIPlanPtr,
    params: Vec<(Source, String)>,
}

/// Plans and table facts kept across transactions; dropped when a table changes.
#[derive(Default)]
pub struct ApplyCache {
    tables: HashMap<(String, String), (pg_sys::Oid, Rc<Table>)>,
    statements: HashMap<String, (pg_sys::Oid, Statement)>,
}

thread_local! {
    static STALE: std::cell::RefCell<HashSet<pg_sys::Oid>> = std::cell::RefCell::new(HashSet::new());
    static STALE_ALL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn invalidate(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    if relid == pg_sys::InvalidOid {
        STALE_ALL.set(true);
    } else {
        STALE.with(|s| s.borrow_mut().insert(relid));
    }
}

/// Registers the cache's invalidation callback; call once per worker.
pub fn register_invalidation() {
    // SAFETY: registering a relcache callback once per process.
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(invalidate), pg_sys::Datum::from(0)) };
}

impl ApplyCache {
    /// Forgets everything about tables that changed since the last call.
    pub fn purge_stale(&mut self) {
        if STALE_ALL.replace(false) {
            STALE.with(|s| s.borrow_mut().clear());
            self.clear();
            return;
        }
        let stale: HashSet<pg_sys::Oid> = STALE.with(|s| std::mem::take(&mut *s.borrow_mut()));
        if stale.is_empty() {
            return;
        }
        self.tables.retain(|_, (relid, _)| !stale.contains(relid));
        let dead: Vec<String> =
            self.statements.iter().filter(|(_, (relid, _))| stale.contains(relid)).map(|(k, _)| k.clone()).collect();
        for key in dead {
            if let Some((_, st)) = self.statements.remove(&key) {
                // SAFETY: the plan was kept by SPI_keepplan and is not in use now.
                unsafe { pg_sys::SPI_freeplan(st.plan) };
            }
        }
    }

    /// Forgets everything (after applying DDL).
    pub fn clear(&mut self) {
        self.tables.clear();
        for (_, (_, st)) in self.statements.drain() {
            // SAFETY: as in purge_stale.
            unsafe { pg_sys::SPI_freeplan(st.plan) };
        }
    }

    fn table(&mut self, nsp: &str, rel: &str) -> Result<(pg_sys::Oid, Rc<Table>), ApplyError> {
        let key = (nsp.to_string(), rel.to_string());
        if let Some((relid, table)) = self.tables.get(&key) {
            return Ok((*relid, table.clone()));
        }
        let (relid, table) = load_table(nsp, rel)?;
        let table = Rc::new(table);
        self.tables.insert(key, (relid, table.clone()));
        Ok((relid, table))
    }
}

fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', "")).unwrap_or_default()
}

fn load_table(nsp: &str, rel: &str) -> Result<(pg_sys::Oid, Table), ApplyError> {
    let qualified = quote_qualified(nsp, rel);
    for name in [nsp, rel] {
        check_identifier(name).map_err(|e| ApplyError::Malformed { id: 0, reason: e.to_string() })?;
    }
    let nsp_c = cstring(nsp);
    let rel_c = cstring(rel);
    // SAFETY: catalog lookups inside a transaction; the relation is opened with
    // AccessShareLock and closed before returning (apply statements take their own locks).
    unsafe {
        let nspoid = pg_sys::get_namespace_oid(nsp_c.as_ptr(), true);
        let relid = if nspoid == pg_sys::InvalidOid {
            pg_sys::InvalidOid
        } else {
            pg_sys::get_relname_relid(rel_c.as_ptr(), nspoid)
        };
        if relid == pg_sys::InvalidOid {
            return Err(ApplyError::NoSuchTable(qualified));
        }
        let relation = pg_sys::try_relation_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        if relation.is_null() {
            return Err(ApplyError::NoSuchTable(qualified));
        }
        let key: Vec<String> = crate::capture::relinfo::primary_key_columns(relation)
            .unwrap_or_default()
            .into_iter()
            .map(|i| {
                let att = &*(*(*relation).rd_att).attrs.as_ptr().add(i);
                CStr::from_ptr(att.attname.data.as_ptr()).to_string_lossy().into_owned()
            })
            .collect();
        let tupdesc = (*relation).rd_att;
        let context = pg_sys::AllocSetContextCreateInternal(
            pg_sys::TopMemoryContext,
            c"trompe apply table".as_ptr(),
            pg_sys::ALLOCSET_SMALL_MINSIZE as usize,
            pg_sys::ALLOCSET_SMALL_INITSIZE as usize,
            pg_sys::ALLOCSET_SMALL_MAXSIZE as usize,
        );
        let mut attrs = HashMap::new();
        for i in 0..(*tupdesc).natts as usize {
            let att = &*(*tupdesc).attrs.as_ptr().add(i);
            if att.attisdropped || att.attgenerated != 0 {
                continue;
            }
            let mut infunc = pg_sys::InvalidOid;
            let mut ioparam = pg_sys::InvalidOid;
            pg_sys::getTypeInputInfo(att.atttypid, &mut infunc, &mut ioparam);
            let input = pg_sys::MemoryContextAllocZero(context, std::mem::size_of::<pg_sys::FmgrInfo>())
                as *mut pg_sys::FmgrInfo;
            pg_sys::fmgr_info_cxt(infunc, input, context);
            let name = CStr::from_ptr(att.attname.data.as_ptr()).to_string_lossy().into_owned();
            let mut typlen = 0i16;
            let mut typbyval = false;
            let mut typalign: std::ffi::c_char = 0;
            pg_sys::get_typlenbyvalalign(att.atttypid, &mut typlen, &mut typbyval, &mut typalign);
            let array_type = pg_sys::get_array_type(att.atttypid);
            attrs.insert(
                name,
                Attr {
                    typid: att.atttypid,
                    typmod: att.atttypmod,
                    input,
                    ioparam,
                    array_type,
                    typlen,
                    typbyval,
                    typalign,
                },
            );
        }
        pg_sys::relation_close(relation, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let mut table = Table { qualified, replicated: false, key, attrs, context };
        table.replicated = crate::sql::flag(
            "SELECT EXISTS (SELECT 1 FROM trompe.tables WHERE relid = $1::oid)",
            &[Some(&relid.to_u32().to_string())],
        )
        .map_err(ApplyError::Postgres)?;
        Ok((relid, table))
    }
}

fn text_of(v: &Option<String>) -> Option<&str> {
    v.as_deref()
}

/// Applies the changes of one origin transaction inside the current transaction (SPI
/// connected), in order. Runs of inserts into one table become one statement; consecutive
/// truncations one TRUNCATE.
pub fn apply_transaction(cache: &mut ApplyCache, txn: &[Change]) -> Result<(), ApplyError> {
    let mut i = 0;
    while i < txn.len() {
        let change = &txn[i];
        match change.op {
            Op::Truncate => {
                let mut group = vec![change];
                while i + 1 < txn.len() && txn[i + 1].op == Op::Truncate && txn[i + 1].vals == change.vals {
                    i += 1;
                    group.push(&txn[i]);
                }
                apply_truncate(cache, &group)?;
            }
            Op::Ddl => apply_ddl(cache, change)?,
            Op::Insert => {
                let end = insert_run_end(cache, txn, i)?;
                if end - i < 2 || !bulk_upsert(cache, &txn[i..end])? {
                    for c in &txn[i..end] {
                        upsert(cache, c)?;
                    }
                }
                i = end;
                continue;
            }
            Op::Update | Op::Delete => {
                apply_change(cache, change)?;
            }
        }
        i += 1;
    }
    Ok(())
}

/// The end of the run of inserts starting at `start`: same table, same columns, distinct
/// keys (one statement cannot touch a row twice).
fn insert_run_end(cache: &mut ApplyCache, txn: &[Change], start: usize) -> Result<usize, ApplyError> {
    let first = &txn[start];
    let (_, table) = cache.table(&first.nsp, &first.rel)?;
    let nkey = table.key.len().min(first.cols.len());
    let mut keys = HashSet::new();
    keys.insert(first.vals.as_ref().map(|v| v[..nkey.min(v.len())].to_vec()));
    let mut end = start + 1;
    while end < txn.len() {
        let c = &txn[end];
        let same = c.op == Op::Insert && c.nsp == first.nsp && c.rel == first.rel && c.cols == first.cols;
        if !same || !keys.insert(c.vals.as_ref().map(|v| v[..nkey.min(v.len())].to_vec())) {
            break;
        }
        end += 1;
    }
    Ok(end)
}

/// Inserts (or updates, on a key conflict) a run of rows with one statement over arrays of
/// the column types; returns false if a column's type has no array type (array columns).
fn bulk_upsert(cache: &mut ApplyCache, run: &[Change]) -> Result<bool, ApplyError> {
    let first = &run[0];
    let (relid, table) = cache.table(&first.nsp, &first.rel)?;
    let cols = check_columns(&table, first, table.key.len())?;
    if cols.iter().any(|c| table.attrs[*c].array_type == pg_sys::InvalidOid) {
        return Ok(false);
    }
    let cache_key = format!("B\0{}\0{}\0{}", first.nsp, first.rel, cols.join("\0"));
    if !cache.statements.contains_key(&cache_key) {
        let col_list: Vec<String> = cols.iter().map(|c| quote_ident(c)).collect();
        let arrays: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "INSERT INTO {} ({}) SELECT * FROM unnest({}) {}",
            table.qualified,
            col_list.join(", "),
            arrays.join(", "),
            on_conflict(&table, &cols)
        );
        let params = cols.iter().enumerate().map(|(i, c)| (Source::Val(i), c.to_string())).collect::<Vec<_>>();
        let types = cols.iter().map(|c| table.attrs[*c].array_type).collect();
        prepare(cache, cache_key.clone(), relid, &sql, params, types)?;
    }
    let plan = cache.statements[&cache_key].1.plan;
    let mut values = Vec::with_capacity(cols.len());
    for (j, col) in cols.iter().enumerate() {
        let attr = &table.attrs[*col];
        let mut elems = Vec::with_capacity(run.len());
        let mut nulls = Vec::with_capacity(run.len());
        for c in run {
            let (d, n) = attr.datum(c.vals.as_ref().and_then(|v| v.get(j)).and_then(text_of));
            elems.push(d);
            nulls.push(n);
        }
        let mut dims = [run.len() as i32];
        let mut lbs = [1i32];
        // SAFETY: elems and nulls have run.len() entries of the column's type; the array is
        // built in the current (transaction) memory context.
        let array = unsafe {
            pg_sys::construct_md_array(
                elems.as_mut_ptr(),
                nulls.as_mut_ptr(),
                1,
                dims.as_mut_ptr(),
                lbs.as_mut_ptr(),
                attr.typid,
                attr.typlen as i32,
                attr.typbyval,
                attr.typalign,
            )
        };
        values.push(pg_sys::Datum::from(array));
    }
    let nulls = vec![false; values.len()];
    run_plan(plan, &mut values, &nulls, first.id)?;
    Ok(true)
}

/// The ON CONFLICT clause of an insert: the row's newer version replaces the existing one.
fn on_conflict(table: &Table, cols: &[&str]) -> String {
    let key_list: Vec<String> = table.key.iter().map(|c| quote_ident(c)).collect();
    let updates: Vec<String> = cols
        .iter()
        .filter(|c| !table.key.iter().any(|k| k == *c))
        .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(c)))
        .collect();
    if updates.is_empty() {
        format!("ON CONFLICT ({}) DO NOTHING", key_list.join(", "))
    } else {
        format!("ON CONFLICT ({}) DO UPDATE SET {}", key_list.join(", "), updates.join(", "))
    }
}

/// Applies one row change inside the current transaction (SPI connected).
pub fn apply_change(cache: &mut ApplyCache, change: &Change) -> Result<u64, ApplyError> {
    match change.op {
        Op::Insert => upsert(cache, change),
        Op::Update => update(cache, change),
        Op::Delete => delete(cache, change),
        Op::Truncate | Op::Ddl => Err(ApplyError::Malformed { id: change.id, reason: "not a row change".into() }),
    }
}

fn names(change: &Change) -> Result<Vec<&str>, ApplyError> {
    Ok(change.cols.iter().map(String::as_str).collect())
}

/// Checks that the change's columns exist here and its key is this table's key; returns the
/// column names.
fn check_columns<'c>(table: &Table, change: &'c Change, nkey: usize) -> Result<Vec<&'c str>, ApplyError> {
    let cols = names(change)?;
    if !table.replicated {
        return Err(ApplyError::NotReplicated(table.qualified.clone()));
    }
    for c in &cols {
        if !table.attrs.contains_key(*c) {
            return Err(ApplyError::NoSuchColumn { table: table.qualified.clone(), column: c.to_string() });
        }
    }
    if nkey > cols.len() {
        return Err(ApplyError::Malformed { id: change.id, reason: "key longer than the column list".into() });
    }
    let mut theirs: Vec<&str> = cols[..nkey].to_vec();
    let mut ours: Vec<&str> = table.key.iter().map(String::as_str).collect();
    theirs.sort_unstable();
    ours.sort_unstable();
    if theirs != ours {
        return Err(ApplyError::KeyMismatch(table.qualified.clone()));
    }
    Ok(cols)
}

fn nkey_of(change: &Change) -> Result<usize, ApplyError> {
    change
        .oldkey
        .as_ref()
        .map(|k| k.len())
        .ok_or(ApplyError::Malformed { id: change.id, reason: "missing old key".into() })
}

fn prepare(
    cache: &mut ApplyCache,
    cache_key: String,
    relid: pg_sys::Oid,
    sql: &str,
    params: Vec<(Source, String)>,
    mut types: Vec<pg_sys::Oid>,
) -> Result<(), ApplyError> {
    if cache.statements.contains_key(&cache_key) {
        return Ok(());
    }
    let sql_c = cstring(sql);
    // SAFETY: SPI is connected by the caller; the plan is kept until invalidated.
    let plan = unsafe {
        let plan = pg_sys::SPI_prepare(sql_c.as_ptr(), types.len() as i32, types.as_mut_ptr());
        if plan.is_null() {
            return Err(ApplyError::Postgres(format!("cannot prepare: {sql}")));
        }
        pg_sys::SPI_keepplan(plan);
        plan
    };
    cache.statements.insert(cache_key, (relid, Statement { plan, params }));
    Ok(())
}

/// The column types of statement parameters taken from the table's columns.
fn param_types(table: &Table, params: &[(Source, String)]) -> Vec<pg_sys::Oid> {
    params.iter().map(|(_, col)| table.attrs[col].typid).collect()
}

/// Runs a kept plan with the given parameter values; returns the rows it processed.
fn run_plan(
    plan: pg_sys::SPIPlanPtr,
    values: &mut [pg_sys::Datum],
    nulls: &[bool],
    what: i64,
) -> Result<u64, ApplyError> {
    let flags: Vec<std::ffi::c_char> =
        nulls.iter().map(|n| if *n { b'n' } else { b' ' } as std::ffi::c_char).chain([0]).collect();
    // SAFETY: values and nulls match the plan's parameter count; SPI is connected.
    unsafe {
        let rc = pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), flags.as_ptr(), false, 0);
        if rc < 0 {
            return Err(ApplyError::Postgres(format!("applying change {what} failed (SPI code {rc})")));
        }
        Ok(pg_sys::SPI_processed)
    }
}

/// Runs a prepared statement with the change's values; returns the rows it processed.
fn execute(cache: &ApplyCache, table: &Table, cache_key: &str, change: &Change) -> Result<u64, ApplyError> {
    let (_, st) = cache
        .statements
        .get(cache_key)
        .ok_or_else(|| ApplyError::Postgres(format!("statement for change {} vanished", change.id)))?;
    let mut values = Vec::with_capacity(st.params.len());
    let mut nulls = Vec::with_capacity(st.params.len());
    for (source, col) in &st.params {
        let text = match source {
            Source::Val(i) => change.vals.as_ref().and_then(|v| v.get(*i)).and_then(text_of),
            Source::OldKey(i) => change.oldkey.as_ref().and_then(|v| v.get(*i)).and_then(text_of),
        };
        let (d, n) = table.attrs[col].datum(text);
        values.push(d);
        nulls.push(n);
    }
    run_plan(st.plan, &mut values, &nulls, change.id)
}

fn upsert(cache: &mut ApplyCache, change: &Change) -> Result<u64, ApplyError> {
    let (relid, table) = cache.table(&change.nsp, &change.rel)?;
    let nkey = table.key.len();
    let cols = check_columns(&table, change, change.oldkey.as_ref().map_or(nkey, |k| k.len()))?;
    let cache_key = format!("I\0{}\0{}\0{}", change.nsp, change.rel, cols.join("\0"));
    if !cache.statements.contains_key(&cache_key) {
        let col_list: Vec<String> = cols.iter().map(|c| quote_ident(c)).collect();
        let placeholders: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "INSERT INTO {} ({}) VALUES ({}) {}",
            table.qualified,
            col_list.join(", "),
            placeholders.join(", "),
            on_conflict(&table, &cols)
        );
        let params = cols.iter().enumerate().map(|(i, c)| (Source::Val(i), c.to_string())).collect::<Vec<_>>();
        let types = param_types(&table, &params);
        prepare(cache, cache_key.clone(), relid, &sql, params, types)?;
    }
    execute(cache, &table, &cache_key, change)
}

fn update(cache: &mut ApplyCache, change: &Change) -> Result<u64, ApplyError> {
    let nkey = nkey_of(change)?;
    let (relid, table) = cache.table(&change.nsp, &change.rel)?;
    let cols = check_columns(&table, change, nkey)?;
    let cache_key = format!("U\0{}\0{}\0{}\0{}", change.nsp, change.rel, nkey, cols.join("\0"));
    if !cache.statements.contains_key(&cache_key) {
        let sets: Vec<String> =
            cols.iter().enumerate().map(|(i, c)| format!("{} = ${}", quote_ident(c), i + 1)).collect();
        let wheres: Vec<String> = cols[..nkey]
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{} = ${}", quote_ident(c), cols.len() + i + 1))
            .collect();
        let sql = format!("UPDATE {} SET {} WHERE {}", table.qualified, sets.join(", "), wheres.join(" AND "));
        let mut params: Vec<(Source, String)> =
            cols.iter().enumerate().map(|(i, c)| (Source::Val(i), c.to_string())).collect::<Vec<_>>();
        params.extend(cols[..nkey].iter().enumerate().map(|(i, c)| (Source::OldKey(i), c.to_string())));
        let types = param_types(&table, &params);
        prepare(cache, cache_key.clone(), relid, &sql, params, types)?;
    }
    let done = execute(cache, &table, &cache_key, change)?;
    if done == 0 {
        // The row is missing here: the update carries the whole row, so it is inserted.
        return upsert(cache, change);
    }
    Ok(done)
}

fn delete(cache: &mut ApplyCache, change: &Change) -> Result<u64, ApplyError> {
    let nkey = nkey_of(change)?;
    let (relid, table) = cache.table(&change.nsp, &change.rel)?;
    let cols = check_columns(&table, change, nkey)?;
    let cache_key = format!("D\0{}\0{}\0{}", change.nsp, change.rel, cols[..nkey].join("\0"));
    if !cache.statements.contains_key(&cache_key) {
        let wheres: Vec<String> =
            cols[..nkey].iter().enumerate().map(|(i, c)| format!("{} = ${}", quote_ident(c), i + 1)).collect();
        let sql = format!("DELETE FROM {} WHERE {}", table.qualified, wheres.join(" AND "));
        let params =
            cols[..nkey].iter().enumerate().map(|(i, c)| (Source::OldKey(i), c.to_string())).collect::<Vec<_>>();
        let types = param_types(&table, &params);
        prepare(cache, cache_key.clone(), relid, &sql, params, types)?;
    }
    execute(cache, &table, &cache_key, change)
}

/// Truncates the tables of consecutive TRUNCATE changes in one statement (so tables that
/// reference each other can be truncated together).
pub fn apply_truncate(cache: &mut ApplyCache, changes: &[&Change]) -> Result<(), ApplyError> {
    let mut tables = Vec::new();
    let mut restart = false;
    for c in changes {
        let (_, table) = cache.table(&c.nsp, &c.rel)?;
        if !table.replicated {
            return Err(ApplyError::NotReplicated(table.qualified.clone()));
        }
        tables.push(table.qualified.clone());
        restart |= c.vals.as_ref().and_then(|v| v.first()).and_then(text_of) == Some("restart");
    }
    let sql = format!("TRUNCATE ONLY {}{}", tables.join(", "), if restart { " RESTART IDENTITY" } else { "" });
    crate::sql::execute(&sql, &[]).map(|_| ()).map_err(ApplyError::Postgres)
}

/// Replays a DDL statement with the search_path and role it ran with at the origin, then
/// starts replicating tables it created in replicated schemas.
pub fn apply_ddl(cache: &mut ApplyCache, change: &Change) -> Result<(), ApplyError> {
    let vals =
        change.vals.as_ref().ok_or(ApplyError::Malformed { id: change.id, reason: "DDL without statement".into() })?;
    let part = |i: usize| vals.get(i).and_then(text_of).unwrap_or_default().to_string();
    let (statement, search_path, role) = (part(0), part(1), part(2));
    if statement.trim().is_empty() {
        return Err(ApplyError::Malformed { id: change.id, reason: "empty DDL statement".into() });
    }
    crate::sql::execute(
        "SELECT set_config('search_path', $1, true), set_config('role', $2, true)",
        &[Some(&search_path), Some(if role.is_empty() { "none" } else { &role })],
    )
    .map_err(ApplyError::Postgres)?;
    crate::sql::execute(&statement, &[]).map_err(ApplyError::Postgres)?;
    crate::sql::execute("SELECT set_config('role', 'none', true), set_config('search_path', '', true)", &[])
        .map_err(ApplyError::Postgres)?;
    cache.clear();
    crate::tables::sync_schema_tables().map_err(|e| ApplyError::Postgres(e.to_string()))?;
    Ok(())
}
