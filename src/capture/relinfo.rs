//! What the capture trigger needs to know about a replicated table, computed once per table and
//! backend and dropped when PostgreSQL invalidates the table's relcache entry (after DDL).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CStr;

use pgrx::pg_sys;

use crate::error::TrompeError;

/// One column that is sent to peers.
pub struct Column {
    /// Its position in the table's tuple descriptor (0-based).
    pub index: usize,
    /// Its output function, allocated in the entry's memory context.
    pub output: *mut pg_sys::FmgrInfo,
    /// Whether its values may refer to large objects (an `oid` column outside the key).
    pub large_object: bool,
}

/// The replication view of one table.
pub struct RelInfo {
    /// Schema name.
    pub nsp: String,
    /// Table name.
    pub rel: String,
    /// Columns sent to peers: the primary key columns first (in key order), then every other
    /// column that is neither dropped nor generated, in table order.
    pub columns: Vec<Column>,
    /// How many of `columns` form the primary key.
    pub nkey: usize,
    /// The names of `columns`, in the same order.
    pub names: Vec<String>,
    /// How its row versions rank (its conflict rule), for the commit wait of local writes.
    pub ranking: trompe_core::conflict::Ranking,
    /// How its rows' versions are read.
    pub versions: crate::row_versions::TableVersions,
    /// Memory for everything above that PostgreSQL allocates.
    context: pg_sys::MemoryContext,
}

impl Drop for RelInfo {
    fn drop(&mut self) {
        // SAFETY: the context was created by `RelInfo::build` and nothing else frees it.
        unsafe { pg_sys::MemoryContextDelete(self.context) };
    }
}

thread_local! {
    static CACHE: RefCell<HashMap<pg_sys::Oid, std::rc::Rc<RelInfo>>> = RefCell::new(HashMap::new());
    static CALLBACK_REGISTERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The table whose entry is being built, and whether an invalidation concerned it
    /// meanwhile (any lock or catalog lookup the build makes may accept invalidations; the
    /// facts it read before may be out of date, so the entry is used once but not cached).
    static BUILDING: std::cell::Cell<Option<(pg_sys::Oid, bool)>> = const { std::cell::Cell::new(None) };
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn invalidate(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    if let Some((building, _)) = BUILDING.get() {
        if relid == pg_sys::InvalidOid || relid == building {
            BUILDING.set(Some((building, true)));
        }
    }
    CACHE.with(|c| {
        let mut cache = c.borrow_mut();
        if relid == pg_sys::InvalidOid {
            cache.clear();
        } else {
            cache.remove(&relid);
        }
    });
}

/// The cached replication view of an open relation, built on first use.
///
/// # Safety
/// `rel` must be an open relation.
pub unsafe fn relinfo(rel: pg_sys::Relation) -> Result<std::rc::Rc<RelInfo>, TrompeError> {
    if !CALLBACK_REGISTERED.get() {
        // SAFETY: registering a relcache callback once per backend, with a valid function.
        unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(invalidate), pg_sys::Datum::from(0)) };
        CALLBACK_REGISTERED.set(true);
    }
    let relid = (*rel).rd_id;
    if let Some(info) = CACHE.with(|c| c.borrow().get(&relid).cloned()) {
        return Ok(info);
    }
    BUILDING.set(Some((relid, false)));
    let built = RelInfo::build(rel);
    let invalidated = BUILDING.take().is_some_and(|(_, invalidated)| invalidated);
    let info = std::rc::Rc::new(built?);
    if !invalidated {
        CACHE.with(|c| c.borrow_mut().insert(relid, info.clone()));
    }
    Ok(info)
}

/// [`relinfo`] for the capture triggers: `None` if the table is not listed in `trompe.tables`
/// as of now (whatever the transaction's snapshot). Its triggers may come without that from a
/// dump restored into another database, which is a node of its own: they capture nothing until
/// `add_table` takes them over. Only listed tables are cached (`add_table` and `remove_table`
/// create and drop the triggers, which invalidates the entry).
///
/// # Safety
/// `rel` must be an open relation.
pub unsafe fn replicated_relinfo(rel: pg_sys::Relation) -> Result<Option<std::rc::Rc<RelInfo>>, TrompeError> {
    // SAFETY: rel is open (caller's contract).
    let relid = unsafe { (*rel).rd_id };
    if let Some(info) = CACHE.with(|c| c.borrow().get(&relid).cloned()) {
        return Ok(Some(info));
    }
    if !crate::catalog::listed_now(relid) {
        return Ok(None);
    }
    // SAFETY: as above.
    unsafe { relinfo(rel) }.map(Some)
}

/// The schema-qualified name of an open relation, for messages.
///
/// # Safety
/// `rel` must be an open relation.
pub unsafe fn qualified_name(rel: pg_sys::Relation) -> String {
    // SAFETY: rel is open (caller's contract); get_namespace_name returns a palloc'd copy or NULL.
    unsafe {
        let relname = CStr::from_ptr((*(*rel).rd_rel).relname.data.as_ptr()).to_string_lossy();
        let nsp = pg_sys::get_namespace_name((*(*rel).rd_rel).relnamespace);
        if nsp.is_null() {
            relname.into_owned()
        } else {
            format!("{}.{}", CStr::from_ptr(nsp).to_string_lossy(), relname)
        }
    }
}

impl RelInfo {
    unsafe fn build(rel: pg_sys::Relation) -> Result<RelInfo, TrompeError> {
        let key =
            crate::catalog::primary_key_columns(rel).ok_or_else(|| TrompeError::NoPrimaryKey(qualified_name(rel)))?;
        let ranking = crate::conflicts::ranking_of((*rel).rd_id).map_err(TrompeError::Internal)?;
        let versions = crate::row_versions::TableVersions::of(rel).map_err(TrompeError::Internal)?;
        // SAFETY: rel is open and its tuple descriptor valid for the duration of this call; all
        // allocations go to a context we own.
        unsafe {
            let context = pg_sys::AllocSetContextCreateInternal(
                pg_sys::CacheMemoryContext,
                c"trompe relinfo".as_ptr(),
                pg_sys::ALLOCSET_SMALL_MINSIZE as usize,
                pg_sys::ALLOCSET_SMALL_INITSIZE as usize,
                pg_sys::ALLOCSET_SMALL_MAXSIZE as usize,
            );
            let mut info = RelInfo {
                nsp: String::new(),
                rel: String::new(),
                columns: Vec::new(),
                nkey: key.len(),
                names: Vec::new(),
                ranking,
                versions,
                context,
            };
            let form = (*rel).rd_rel;
            info.rel = CStr::from_ptr((*form).relname.data.as_ptr()).to_string_lossy().into_owned();
            let nsp = pg_sys::get_namespace_name((*form).relnamespace);
            if nsp.is_null() {
                return Err(TrompeError::Internal(format!("schema of table {} not found", info.rel)));
            }
            info.nsp = CStr::from_ptr(nsp).to_string_lossy().into_owned();

            let tupdesc = (*rel).rd_att;
            let natts = (*tupdesc).natts as usize;
            let mut order: Vec<usize> = key.clone();
            for i in 0..natts {
                let att = &*crate::pg_compat::tuple_desc_attr(tupdesc, i);
                if att.attisdropped || att.attgenerated != 0 || key.contains(&i) {
                    continue;
                }
                order.push(i);
            }
            let old = pg_sys::MemoryContextSwitchTo(context);

            for &i in &order {
                let att = &*crate::pg_compat::tuple_desc_attr(tupdesc, i);
                let mut out_fn = pg_sys::InvalidOid;
                let mut varlena = false;
                pg_sys::getTypeOutputInfo(att.atttypid, &mut out_fn, &mut varlena);
                let finfo = pg_sys::palloc0(std::mem::size_of::<pg_sys::FmgrInfo>()) as *mut pg_sys::FmgrInfo;
                pg_sys::fmgr_info_cxt(out_fn, finfo, context);
                let large_object = !key.contains(&i) && crate::large_objects::holds_large_objects(att.atttypid);
                info.columns.push(Column { index: i, output: finfo, large_object });
                info.names.push(CStr::from_ptr(att.attname.data.as_ptr()).to_string_lossy().into_owned());
            }
            pg_sys::MemoryContextSwitchTo(old);
            Ok(info)
        }
    }
}
