//! What apply knows about local tables (columns with their input functions, primary key,
//! unique constraints, whether the table is replicated here) and the plans it prepared for
//! them; forgotten when PostgreSQL invalidates a table's relcache entry (after DDL).

use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::hash::BuildHasherDefault;
use std::rc::Rc;

use pgrx::pg_sys;
use trompe_core::conflict::LocalVersion;
use trompe_core::ident::{check_identifier, quote_qualified, readable_qualified};

use super::error::ApplyError;
use crate::sql::cstring;

/// The cache's maps are looked up for every applied row and column: a fast hasher (the keys
/// are names and oids of local tables and columns, not chosen by an attacker).
type Map<K, V> = HashMap<K, V, BuildHasherDefault<rustc_hash::FxHasher>>;
type Set<K> = HashSet<K, BuildHasherDefault<rustc_hash::FxHasher>>;

/// A column of a local table, with what converting text to its type needs.
pub struct Attr {
    /// Its type.
    pub typid: pg_sys::Oid,
    typmod: i32,
    /// The type's input function, allocated in the table's memory context.
    input: *mut pg_sys::FmgrInfo,
    ioparam: pg_sys::Oid,
    /// The array type over this type (0 if there is none, e.g. for array columns).
    pub array_type: pg_sys::Oid,
    /// An identity column GENERATED ALWAYS: inserts override it, updates cannot set it.
    pub always_identity: bool,
    /// An `oid` column (or a domain over it): its values may refer to large objects.
    pub large_object: bool,
    typlen: i16,
    typbyval: bool,
    typalign: std::ffi::c_char,
    /// Its position in the table's tuple descriptor (0-based).
    pub index: usize,
}

/// A text value and what [`Attr::datum`] made of it.
pub type LastDatum<'t> = (Option<&'t str>, pg_sys::Datum, bool);

thread_local! {
    /// Reused for the NUL-terminated copy of each value handed to an input function.
    static INPUT_TEXT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Attr {
    /// Converts a text value with the type's input function (`None` is NULL), as COPY does;
    /// bad input raises a PostgreSQL error, caught by the caller's transaction.
    pub fn datum(&self, text: Option<&str>) -> (pg_sys::Datum, bool) {
        match text {
            None => (pg_sys::Datum::from(0), true),
            Some(t) => INPUT_TEXT.with(|buf| {
                // A NUL cannot be part of a value: it is dropped, as before.
                let mut buf = buf.borrow_mut();
                buf.clear();
                if t.contains('\0') {
                    buf.extend(t.bytes().filter(|&b| b != 0));
                } else {
                    buf.extend_from_slice(t.as_bytes());
                }
                buf.push(0);
                // SAFETY: the input function and its parameters come from the column's type;
                // it reads the NUL-terminated text and copies what it keeps.
                let d = unsafe {
                    pg_sys::InputFunctionCall(self.input, buf.as_mut_ptr().cast(), self.ioparam, self.typmod)
                };
                (d, false)
            }),
        }
    }

    /// Like [`Attr::datum`], reusing the previous conversion when `text` equals the text
    /// `last` was converted from: a run of one value in a column (a transaction's timestamp, a
    /// foreign key) is converted once. Callers copy the datum (into a tuple or an array).
    pub fn datum_reusing<'t>(&self, text: Option<&'t str>, last: &mut Option<LastDatum<'t>>) -> (pg_sys::Datum, bool) {
        let (d, n) = match *last {
            Some((t, d, n)) if t == text => (d, n),
            _ => self.datum(text),
        };
        *last = Some((text, d, n));
        (d, n)
    }

    /// An array of this type from text values, in the current memory context.
    pub fn array(&self, texts: &[Option<&str>]) -> pg_sys::Datum {
        let mut elems = Vec::with_capacity(texts.len());
        let mut nulls = Vec::with_capacity(texts.len());
        let mut last = None;
        for t in texts {
            let (d, n) = self.datum_reusing(*t, &mut last);
            elems.push(d);
            nulls.push(n);
        }
        let mut dims = [texts.len() as i32];
        let mut lbs = [1i32];
        // SAFETY: elems and nulls have texts.len() entries of this type.
        unsafe {
            pg_sys::Datum::from(pg_sys::construct_md_array(
                elems.as_mut_ptr(),
                nulls.as_mut_ptr(),
                1,
                dims.as_mut_ptr(),
                lbs.as_mut_ptr(),
                self.typid,
                self.typlen as i32,
                self.typbyval,
                self.typalign,
            ))
        }
    }
}

/// What apply knows about a local table.
pub struct Table {
    /// Its oid.
    pub relid: pg_sys::Oid,
    /// Quoted, schema-qualified name.
    pub qualified: String,
    /// Schema-qualified name, quoted only where needed (for the conflict log).
    pub readable: String,
    /// Whether it is in `trompe.tables`.
    pub replicated: bool,
    /// Primary key columns, in key order.
    pub key: Vec<String>,
    /// Every other unique constraint or index over plain columns (no expressions, no
    /// predicate): what a row's values can collide on.
    pub uniques: Vec<Vec<String>>,
    /// Columns that can be written (not dropped, not generated), by name.
    pub attrs: Map<String, Attr>,
    /// Whether any of them may refer to large objects.
    pub has_large_objects: bool,
    /// How its row versions rank (its conflict rule).
    pub ranking: std::rc::Rc<trompe_core::conflict::Ranking>,
    /// How its rows' versions are read.
    pub versions: std::rc::Rc<crate::row_versions::TableVersions>,
    context: pg_sys::MemoryContext,
}

impl Drop for Table {
    fn drop(&mut self) {
        // SAFETY: the context was created by load_table and is deleted only here.
        unsafe { pg_sys::MemoryContextDelete(self.context) };
    }
}

unsafe fn attname(relation: pg_sys::Relation, attnum: i16) -> String {
    let att = &*crate::pg_compat::tuple_desc_attr((*relation).rd_att, (attnum - 1) as usize);
    CStr::from_ptr(att.attname.data.as_ptr()).to_string_lossy().into_owned()
}

/// The unique indexes of a relation other than its primary key, over plain columns.
unsafe fn unique_columns(relation: pg_sys::Relation) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let list = pg_sys::RelationGetIndexList(relation);
    if list.is_null() {
        return out;
    }
    for i in 0..(*list).length as usize {
        let oid = (*(*list).elements.add(i)).oid_value;
        let index = pg_sys::index_open(oid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let form = (*index).rd_index;
        let plain = (*index).rd_indexprs.is_null()
            && pg_sys::heap_attisnull(
                (*index).rd_indextuple,
                pg_sys::Anum_pg_index_indexprs as i32,
                std::ptr::null_mut(),
            )
            && pg_sys::heap_attisnull(
                (*index).rd_indextuple,
                pg_sys::Anum_pg_index_indpred as i32,
                std::ptr::null_mut(),
            );
        if (*form).indisunique && !(*form).indisprimary && plain {
            let nkeys = (*form).indnkeyatts as usize;
            let cols: Vec<String> =
                (*form).indkey.values.as_slice(nkeys).iter().map(|&a| attname(relation, a)).collect();
            out.push(cols);
        }
        pg_sys::index_close(index, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    }
    out
}

/// The oid of table `nsp.rel`, if it exists.
fn relid_of(nsp: &str, rel: &str) -> Result<Option<pg_sys::Oid>, ApplyError> {
    for name in [nsp, rel] {
        check_identifier(name).map_err(|e| ApplyError::Malformed { id: 0, reason: e.to_string() })?;
    }
    let (nsp_c, rel_c) = (cstring(nsp), cstring(rel));
    // SAFETY: syscache lookups inside a transaction, with NUL-terminated names.
    let relid = unsafe {
        let nspoid = pg_sys::get_namespace_oid(nsp_c.as_ptr(), true);
        if nspoid == pg_sys::InvalidOid {
            pg_sys::InvalidOid
        } else {
            pg_sys::get_relname_relid(rel_c.as_ptr(), nspoid)
        }
    };
    Ok((relid != pg_sys::InvalidOid).then_some(relid))
}

fn load_table(nsp: &str, rel: &str, relid: pg_sys::Oid) -> Result<Table, ApplyError> {
    let qualified = quote_qualified(nsp, rel);
    let readable = readable_qualified(nsp, rel);
    // SAFETY: catalog lookups inside a transaction; the relation is opened with
    // AccessShareLock and closed before returning (apply statements take their own locks).
    unsafe {
        let relation = pg_sys::try_relation_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        if relation.is_null() {
            return Err(ApplyError::NoSuchTable(qualified));
        }
        let key: Vec<String> = crate::catalog::primary_key_columns(relation)
            .unwrap_or_default()
            .into_iter()
            .map(|i| attname(relation, i as i16 + 1))
            .collect();
        let uniques = unique_columns(relation);
        let versions =
            std::rc::Rc::new(crate::row_versions::TableVersions::of(relation).map_err(ApplyError::Postgres)?);
        let tupdesc = (*relation).rd_att;
        let context = pg_sys::AllocSetContextCreateInternal(
            pg_sys::TopMemoryContext,
            c"trompe apply table".as_ptr(),
            pg_sys::ALLOCSET_SMALL_MINSIZE as usize,
            pg_sys::ALLOCSET_SMALL_INITSIZE as usize,
            pg_sys::ALLOCSET_SMALL_MAXSIZE as usize,
        );
        let mut attrs = Map::default();
        for i in 0..(*tupdesc).natts as usize {
            let att = &*crate::pg_compat::tuple_desc_attr(tupdesc, i);
            if att.attisdropped || att.attgenerated != 0 {
                continue;
            }
            let mut infunc = pg_sys::InvalidOid;
            let mut ioparam = pg_sys::InvalidOid;
            pg_sys::getTypeInputInfo(att.atttypid, &mut infunc, &mut ioparam);
            let input = pg_sys::MemoryContextAllocZero(context, std::mem::size_of::<pg_sys::FmgrInfo>())
                as *mut pg_sys::FmgrInfo;
            pg_sys::fmgr_info_cxt(infunc, input, context);
            let mut typlen = 0i16;
            let mut typbyval = false;
            let mut typalign: std::ffi::c_char = 0;
            pg_sys::get_typlenbyvalalign(att.atttypid, &mut typlen, &mut typbyval, &mut typalign);
            let array_type = pg_sys::get_array_type(att.atttypid);
            let name = CStr::from_ptr(att.attname.data.as_ptr()).to_string_lossy().into_owned();
            attrs.insert(
                name,
                Attr {
                    typid: att.atttypid,
                    typmod: att.atttypmod,
                    input,
                    ioparam,
                    array_type,
                    always_identity: att.attidentity as u8 == pg_sys::ATTRIBUTE_IDENTITY_ALWAYS,
                    large_object: crate::large_objects::holds_large_objects(att.atttypid),
                    typlen,
                    typbyval,
                    typalign,
                    index: i,
                },
            );
        }
        pg_sys::relation_close(relation, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let has_large_objects = attrs.values().any(|a| a.large_object);
        let mut table = Table {
            relid,
            qualified,
            readable,
            replicated: false,
            key,
            uniques,
            attrs,
            has_large_objects,
            ranking: Default::default(),
            versions,
            context,
        };
        table.replicated = crate::sql::flag(
            "SELECT EXISTS (SELECT 1 FROM trompe.tables WHERE relid = $1::oid)",
            &[Some(&relid.to_u32().to_string())],
        )
        .map_err(ApplyError::Postgres)?;
        table.ranking = std::rc::Rc::new(crate::conflicts::ranking_of(relid).map_err(ApplyError::Postgres)?);
        Ok(table)
    }
}

/// What protects a table against older changes: its last truncation, and whether any of its
/// rows has a tombstone.
#[derive(Clone, Copy)]
pub struct Guards {
    /// The version of the table's last truncation, if any.
    pub truncated: Option<LocalVersion>,
    /// Whether deleted rows of the table have tombstones.
    pub tombstones: bool,
    /// The tombstone generation read before these facts: if `tombstone_writers()` still
    /// equals it after a change, no tombstone can have been committed since.
    pub generation: u64,
}

impl Guards {
    /// Whether keys just inserted must be checked against tombstones again: the table has
    /// some, or a transaction may have committed some since the guards were read.
    pub fn recheck_needed(&self) -> bool {
        self.tombstones || crate::shmem::tombstone_writers() != self.generation
    }
}

/// A prepared statement and the sources of its parameters.
pub struct Statement {
    /// The kept plan.
    pub plan: pg_sys::SPIPlanPtr,
}

/// Plans and table facts kept across transactions; dropped when a table changes.
#[derive(Default)]
pub struct ApplyCache {
    /// By schema, then by name.
    tables: Map<String, Map<String, Rc<Table>>>,
    /// Tables locked by the current apply transaction (no DDL can change them until it ends).
    locked: Set<pg_sys::Oid>,
    statements: Map<String, (pg_sys::Oid, Statement)>,
    guards: Map<pg_sys::Oid, (u64, Guards)>,
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

/// A schema renamed or dropped: the names of every table in it may point elsewhere now.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn invalidate_schemas(_arg: pg_sys::Datum, _cacheid: std::ffi::c_int, _hash: u32) {
    STALE_ALL.set(true);
}

/// Registers the cache's invalidation callbacks; call once per worker.
pub fn register_invalidation() {
    // SAFETY: registering cache callbacks once per process, with valid functions.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(invalidate), pg_sys::Datum::from(0));
        pg_sys::CacheRegisterSyscacheCallback(
            pg_sys::SysCacheIdentifier::NAMESPACEOID as std::ffi::c_int,
            Some(invalidate_schemas),
            pg_sys::Datum::from(0),
        );
    }
}

impl ApplyCache {
    /// At the start of an apply transaction: forgets what changed since the last one, and
    /// which tables the last one had locked.
    pub fn begin_transaction(&mut self) {
        self.locked.clear();
        self.purge_stale();
    }

    /// Forgets everything about tables that changed since the last call.
    fn purge_stale(&mut self) {
        if STALE_ALL.replace(false) {
            STALE.with(|s| s.borrow_mut().clear());
            self.clear();
            return;
        }
        let stale: HashSet<pg_sys::Oid> = STALE.with(|s| std::mem::take(&mut *s.borrow_mut()));
        if stale.is_empty() {
            return;
        }
        for by_name in self.tables.values_mut() {
            by_name.retain(|_, t| !stale.contains(&t.relid));
        }
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
        self.locked.clear();
        self.guards.clear();
        for (_, (_, st)) in self.statements.drain() {
            // SAFETY: as in purge_stale.
            unsafe { pg_sys::SPI_freeplan(st.plan) };
        }
    }

    /// The local table `nsp.rel`, locked in ROW EXCLUSIVE mode (as the apply's writes need)
    /// before what is known about it is used: DDL that committed before the lock was granted
    /// has invalidated that by then, and no DDL can change the table until this transaction ends.
    pub fn table(&mut self, nsp: &str, rel: &str) -> Result<Rc<Table>, ApplyError> {
        self.table_locked(nsp, rel, pg_sys::RowExclusiveLock)
    }

    /// [`ApplyCache::table`] with the lock `mode` (a truncation takes ACCESS EXCLUSIVE at once).
    pub fn table_locked(&mut self, nsp: &str, rel: &str, mode: u32) -> Result<Rc<Table>, ApplyError> {
        if let Some(known) = self.cached(nsp, rel) {
            if mode == pg_sys::RowExclusiveLock && self.locked.contains(&known.relid) {
                return Ok(known);
            }
            // The name still leads to the table known under it unless DDL renamed or dropped
            // that table (a relcache invalidation of it) or its schema (a namespace one), and
            // DDL that committed before the lock is granted is seen once it is. (If it did,
            // the lock on the old oid is kept to the end of the transaction, harmlessly.)
            // SAFETY: takes a lock held until the end of the apply transaction; accepting the
            // invalidations that come with it runs the callbacks above.
            unsafe { pg_sys::LockRelationOid(known.relid, mode as pg_sys::LOCKMODE) };
            self.purge_stale();
            if self.cached(nsp, rel).is_some_and(|t| t.relid == known.relid) {
                self.locked.insert(known.relid);
                return Ok(known);
            }
        }
        let relid = relid_of(nsp, rel)?.ok_or_else(|| ApplyError::NoSuchTable(quote_qualified(nsp, rel)))?;
        // SAFETY: takes a lock held until the end of the apply transaction; accepting the
        // invalidations that come with it runs the relcache callback below.
        unsafe { pg_sys::LockRelationOid(relid, mode as pg_sys::LOCKMODE) };
        self.purge_stale();
        // The name may point to another table now (renamed while we waited for the lock).
        if relid_of(nsp, rel)? != Some(relid) {
            return Err(ApplyError::Postgres(format!(
                "table {} changed while being locked",
                quote_qualified(nsp, rel)
            )));
        }
        self.locked.insert(relid);
        if let Some(table) = self.cached(nsp, rel).filter(|t| t.relid == relid) {
            return Ok(table);
        }
        let table = Rc::new(load_table(nsp, rel, relid)?);
        self.tables.entry(nsp.to_string()).or_default().insert(rel.to_string(), table.clone());
        Ok(table)
    }

    /// What is known about the table last found under the name `nsp.rel`.
    fn cached(&self, nsp: &str, rel: &str) -> Option<Rc<Table>> {
        self.tables.get(nsp)?.get(rel).cloned()
    }

    /// Whether table `nsp.rel` exists here.
    pub fn exists(&self, nsp: &str, rel: &str) -> Result<bool, ApplyError> {
        Ok(relid_of(nsp, rel)?.is_some())
    }

    /// The guards of `relid`, read again only when some tombstone or truncation marker of
    /// this database changed.
    pub fn guards(&mut self, relid: pg_sys::Oid) -> Result<Guards, ApplyError> {
        // Lock the table first (the change is about to take this lock anyway): a local
        // TRUNCATE then either comes after this transaction, or has committed and announced
        // its marker (its commit callback runs before it releases its lock).
        // (Unless this transaction holds it already: `table` took it.)
        if !self.locked.contains(&relid) {
            // SAFETY: takes a lock held until the end of the apply transaction.
            unsafe { pg_sys::LockRelationOid(relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE) };
        }
        let generation = crate::shmem::tombstone_generation();
        if let Some((g, guards)) = self.guards.get(&relid) {
            if *g == generation {
                return Ok(*guards);
            }
        }
        let (truncation, tombstones) = crate::conflicts::table_markers(relid).map_err(ApplyError::Postgres)?;
        let truncated = truncation.map(crate::conflicts::local_version);
        let guards = Guards { truncated, tombstones, generation };
        self.guards.insert(relid, (generation, guards));
        Ok(guards)
    }

    /// The kept plan for `cache_key`, preparing `sql` with parameter `types` the first time.
    pub fn plan(
        &mut self,
        cache_key: &str,
        relid: pg_sys::Oid,
        types: impl FnOnce() -> Vec<pg_sys::Oid>,
        sql: impl FnOnce() -> String,
    ) -> Result<pg_sys::SPIPlanPtr, ApplyError> {
        if let Some((_, st)) = self.statements.get(cache_key) {
            return Ok(st.plan);
        }
        let sql = sql();
        let mut types = types();
        let sql_c = cstring(&sql);
        // SAFETY: SPI is connected by the caller; the plan is kept until invalidated.
        let plan = unsafe {
            let plan = pg_sys::SPI_prepare(sql_c.as_ptr(), types.len() as i32, types.as_mut_ptr());
            if plan.is_null() {
                return Err(ApplyError::Postgres(format!("cannot prepare: {sql}")));
            }
            pg_sys::SPI_keepplan(plan);
            plan
        };
        self.statements.insert(cache_key.to_string(), (relid, Statement { plan }));
        Ok(plan)
    }
}

/// Runs a kept plan with the given parameter values; returns the rows it processed and the
/// first column of the rows it returned, as text.
pub fn run_plan(
    plan: pg_sys::SPIPlanPtr,
    values: &mut [pg_sys::Datum],
    nulls: &[bool],
) -> Result<(u64, Vec<Option<String>>), ApplyError> {
    let flags: Vec<std::ffi::c_char> =
        nulls.iter().map(|n| if *n { b'n' } else { b' ' } as std::ffi::c_char).chain([0]).collect();
    // Kept plans look rows up by key: planned while the table was empty or tiny, as a
    // sequential scan, the plan would stay one while the table grows (a scan of the whole table
    // for every change). The setting holds while the statement runs (triggers it fires included)
    // and is planned; an error's abort ends it too.
    let settings = crate::ddl_settings::set_for_statement(&[("enable_seqscan", "off")]);
    let result = execute_plan(plan, values, &flags);
    settings.end();
    result
}

/// Runs a kept plan with `values` and null `flags` (SPI's form); returns the rows processed and
/// the first column of each row.
fn execute_plan(
    plan: pg_sys::SPIPlanPtr,
    values: &mut [pg_sys::Datum],
    flags: &[std::ffi::c_char],
) -> Result<(u64, Vec<Option<String>>), ApplyError> {
    // SAFETY: values and nulls match the plan's parameter count; SPI is connected; returned
    // values are copied into Rust strings before the next SPI call.
    unsafe {
        let rc = pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), flags.as_ptr(), false, 0);
        if rc < 0 {
            return Err(ApplyError::Postgres(format!("applying a change failed (SPI code {rc})")));
        }
        let processed = pg_sys::SPI_processed;
        let mut first = Vec::new();
        let table = pg_sys::SPI_tuptable;
        if !table.is_null() && !(*table).tupdesc.is_null() && (*(*table).tupdesc).natts > 0 {
            for r in 0..processed as usize {
                let v = pg_sys::SPI_getvalue(*(*table).vals.add(r), (*table).tupdesc, 1);
                first.push(if v.is_null() { None } else { Some(CStr::from_ptr(v).to_string_lossy().into_owned()) });
            }
        }
        Ok((processed, first))
    }
}
