//! The row trigger: every INSERT, UPDATE and DELETE on a replicated table is encoded into the
//! transaction's change buffer (written to the log at commit).

use pgrx::prelude::*;
use trompe_core::changeset::{ChangeWriter, OldVersion};
use trompe_core::logformat::Op;

use crate::capture::relinfo::{relinfo, replicated_relinfo, RelInfo};
use crate::capture::{local_writes, xact};
use crate::error::{OrRaise, TrompeError};
use crate::session::{applying_for_peer, CanonicalOutput};

/// AFTER INSERT OR UPDATE OR DELETE ... FOR EACH ROW trigger that captures the change.
#[pg_trigger]
fn capture_row<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, std::convert::Infallible> {
    if !applying_for_peer() {
        capture(trigger.trigger_data()).or_raise();
    }
    Ok(None)
}

fn capture(td: &pg_sys::TriggerData) -> Result<(), TrompeError> {
    let rel = td.tg_relation;
    // SAFETY: the trigger manager hands us an open relation.
    let Some(info) = (unsafe { replicated_relinfo(rel)? }) else { return Ok(()) };
    let (op, new, old) = match td.tg_event & pg_sys::TRIGGER_EVENT_OPMASK {
        pg_sys::TRIGGER_EVENT_INSERT => (Op::Insert, Some(td.tg_trigtuple), None),
        pg_sys::TRIGGER_EVENT_UPDATE => (Op::Update, Some(td.tg_newtuple), Some(td.tg_trigtuple)),
        pg_sys::TRIGGER_EVENT_DELETE => (Op::Delete, None, Some(td.tg_trigtuple)),
        other => return Err(TrompeError::Internal(format!("capture_row fired for unexpected event {other}"))),
    };
    // Keys print canonically from here on: the replaced row's kept version is found by its key's
    // canonical text, whatever this session's DateStyle or TimeZone.
    let _format = CanonicalOutput::enter();
    let old_version =
        old.map_or(OldVersion::Unknown, |t| info.versions.row_version(xmin_of(t), || key_texts(&info, rel, t)));
    // SAFETY: rel is open.
    let relid = unsafe { (*rel).rd_id };
    match (op, new, old) {
        (Op::Insert, Some(t), _) => local_writes::inserted(relid, &info.ranking, || key_texts(&info, rel, t))?,
        (Op::Delete, _, Some(t)) => {
            local_writes::replaced(&info.ranking, old_version);
            local_writes::deleted(relid, key_texts(&info, rel, t));
        }
        (Op::Update, Some(n), Some(o)) => {
            local_writes::replaced(&info.ranking, old_version);
            // SAFETY: both are tuples of rel, handed over by the trigger manager.
            let same_key_image = unsafe { same_key_image(&info, rel, o, n) };
            let (old_key, new_key) = if same_key_image {
                (Vec::new(), Vec::new())
            } else {
                (key_texts(&info, rel, o), key_texts(&info, rel, n))
            };
            if old_key != new_key {
                // The row moved to another key: the old one is deleted, the new one inserted.
                local_writes::deleted(relid, old_key);
                local_writes::inserted(relid, &info.ranking, || new_key)?;
            }
        }
        _ => {}
    }
    if crate::row_versions::rewritten_here(relid) {
        // This transaction rewrote the table: the rows it writes now have its own version.
        for t in [new, old].into_iter().flatten() {
            crate::row_versions::written_after_rewrite(relid, &key_texts(&info, rel, t))
                .map_err(TrompeError::Internal)?;
        }
    }
    xact::record(&info.nsp, &info.rel, |buf, seq| {
        let names = if op == Op::Delete { &info.names[..info.nkey] } else { &info.names[..] };
        let w = ChangeWriter::begin(buf, op, seq, info.nsp.as_bytes(), info.rel.as_bytes())
            .cols(names.iter().map(|n| n.as_bytes()));
        let w = match new {
            Some(t) => write_values(w, &info, rel, t, info.columns.len()),
            None => w.none(),
        };
        let w = match old {
            Some(t) => write_values(w, &info, rel, t, info.nkey),
            None => w.none(),
        };
        w.finish(old_version);
    })
}

extern "C-unwind" {
    /// utils/datum.h: whether two datums of one type have the same binary image.
    fn datum_image_eq(value1: pg_sys::Datum, value2: pg_sys::Datum, typ_by_val: bool, typ_len: i32) -> bool;
}

/// Whether the primary key columns of `a` and `b` hold binary-identical values (then the key
/// did not change; different images may still print the same, which the caller checks).
///
/// # Safety
/// `a` and `b` must be tuples of the open relation `rel`.
unsafe fn same_key_image(info: &RelInfo, rel: pg_sys::Relation, a: pg_sys::HeapTuple, b: pg_sys::HeapTuple) -> bool {
    // SAFETY: attributes of rel's tuples, read with rel's descriptor (1-based attribute
    // numbers); datum_image_eq gets each column's own by-value flag and length.
    unsafe {
        let tupdesc = (*rel).rd_att;
        info.columns[..info.nkey].iter().all(|col| {
            let att = &*crate::pg_compat::tuple_desc_attr(tupdesc, col.index);
            let (mut a_null, mut b_null) = (false, false);
            let va = pg_sys::heap_getattr(a, col.index as i32 + 1, tupdesc, &mut a_null);
            let vb = pg_sys::heap_getattr(b, col.index as i32 + 1, tupdesc, &mut b_null);
            match (a_null, b_null) {
                (true, true) => true,
                (false, false) => {
                    pg_sys::ffi::pg_guard_ffi_boundary(|| datum_image_eq(va, vb, att.attbyval, att.attlen as i32))
                }
                _ => false,
            }
        })
    }
}

/// The primary key values of `tuple` as canonical text, in key order.
fn key_texts(info: &RelInfo, rel: pg_sys::Relation, tuple: pg_sys::HeapTuple) -> Vec<Option<String>> {
    // SAFETY: as in write_values: attributes of rel's tuple, output functions of their types.
    unsafe {
        let tupdesc = (*rel).rd_att;
        info.columns[..info.nkey]
            .iter()
            .map(|col| {
                let mut isnull = false;
                let value = pg_sys::heap_getattr(tuple, col.index as i32 + 1, tupdesc, &mut isnull);
                (!isnull).then(|| {
                    let out = pg_sys::OutputFunctionCall(col.output, value);
                    let text = std::ffi::CStr::from_ptr(out).to_string_lossy().into_owned();
                    pg_sys::pfree(out.cast());
                    text
                })
            })
            .collect()
    }
}

/// The transaction that wrote a row version, also once vacuum froze it (freezing keeps the
/// transaction id in the header, as the `xmin` system column shows it): its commit time stays
/// known until PostgreSQL truncates its commit timestamps.
fn xmin_of(tuple: pg_sys::HeapTuple) -> pg_sys::TransactionId {
    // SAFETY: the trigger manager hands us a valid tuple with a header; t_xmin is the raw xmin
    // (HeapTupleHeaderGetRawXmin).
    unsafe { (*(*tuple).t_data).t_choice.t_heap.t_xmin }
}

thread_local! {
    /// Reused arrays for deforming tuples (no allocation per captured row).
    static DEFORM: std::cell::RefCell<(Vec<pg_sys::Datum>, Vec<bool>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// The global id to send instead of an oid column's value, if a large object has that oid.
fn large_object_reference(oid: &std::ffi::CStr) -> Option<String> {
    crate::large_objects::reference_for(&oid.to_string_lossy()).map_err(TrompeError::Internal).or_raise()
}

/// Writes the first `count` replicated columns of `tuple` in canonical text form: a few (the
/// old primary key) are read one by one, a whole row is deformed once.
fn write_values<'b>(
    w: ChangeWriter<'b>,
    info: &RelInfo,
    rel: pg_sys::Relation,
    tuple: pg_sys::HeapTuple,
    count: usize,
) -> ChangeWriter<'b> {
    let mut w = w.list(count);
    // SAFETY: tuple belongs to rel, whose descriptor sizes the deform arrays and is what
    // heap_getattr reads with (attribute numbers are 1-based); output functions get non-null
    // datums of their column's type and return palloc'd C strings.
    unsafe {
        let tupdesc = (*rel).rd_att;
        let write = |w: ChangeWriter<'b>, col: &crate::capture::relinfo::Column, value: pg_sys::Datum, isnull: bool| {
            if isnull {
                w.value(None)
            } else {
                let out = pg_sys::OutputFunctionCall(col.output, value);
                let text = std::ffi::CStr::from_ptr(out);
                let reference = if col.large_object { large_object_reference(text) } else { None };
                let w = w.value(Some(reference.as_ref().map_or(text.to_bytes(), |r| r.as_bytes())));
                pg_sys::pfree(out.cast());
                w
            }
        };
        if count < info.columns.len() {
            for col in &info.columns[..count] {
                let mut isnull = false;
                let value = pg_sys::heap_getattr(tuple, col.index as i32 + 1, tupdesc, &mut isnull);
                w = write(w, col, value, isnull);
            }
            return w;
        }
        DEFORM.with(|buffers| {
            let (values, nulls) = &mut *buffers.borrow_mut();
            let natts = (*tupdesc).natts as usize;
            values.resize(natts, pg_sys::Datum::from(0));
            nulls.resize(natts, false);
            pg_sys::heap_deform_tuple(tuple, tupdesc, values.as_mut_ptr(), nulls.as_mut_ptr());
            for col in &info.columns[..count] {
                w = write(w, col, values[col.index], nulls[col.index]);
            }
            w
        })
    }
}

/// Logs, as a change of the current transaction, the delete of the row of `nsp.rel` whose
/// primary key columns `key_names` have the canonical text values `key`, replacing version
/// `old`. Apply uses it when resolving a unique collision removes a row: the removal then
/// reaches every node, also those where the two rows never met.
pub fn log_delete(
    nsp: &str,
    rel: &str,
    key_names: &[String],
    key: &[Option<&str>],
    old: OldVersion,
) -> Result<(), TrompeError> {
    xact::record(nsp, rel, |buf, seq| {
        let mut w = ChangeWriter::begin(buf, Op::Delete, seq, nsp.as_bytes(), rel.as_bytes())
            .cols(key_names.iter().map(|n| n.as_bytes()))
            .none()
            .list(key.len());
        for k in key {
            w = w.value(k.map(str::as_bytes));
        }
        w.finish(old);
    })
}

/// Logs every row of replicated table `relid` as an insert of the current transaction: the rows
/// of a table that only now becomes replicable, which its peers never saw. Memory stays flat
/// (the change buffer writes chunks as it fills; what each row's output functions allocate is
/// freed after it).
pub fn log_existing_rows(relid: pg_sys::Oid) -> Result<u64, TrompeError> {
    let mut logged = 0;
    // SAFETY: the relation is opened with AccessShareLock (the statement that made it
    // replicable holds a stronger lock) and closed at the end; the scan reads it under a
    // registered snapshot taken now (it sees the statement's own changes), unregistered after;
    // each tuple returned is a valid tuple of the relation until the next one is fetched.
    unsafe {
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let rel = pg_sys::table_open(relid, lock);
        let info = relinfo(rel)?;
        let _format = CanonicalOutput::enter();
        let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot());
        let scan = pg_sys::table_beginscan(rel, snapshot, 0, std::ptr::null_mut());
        // What the output functions allocate for a row (detoasted copies too) is freed after it.
        let per_row = pg_sys::AllocSetContextCreateInternal(
            pg_sys::CurrentMemoryContext,
            c"trompe existing rows".as_ptr(),
            pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        );
        let mut result = Ok(());
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let outer = pg_sys::MemoryContextSwitchTo(per_row);
            result = xact::record(&info.nsp, &info.rel, |buf, seq| {
                let w = ChangeWriter::begin(buf, Op::Insert, seq, info.nsp.as_bytes(), info.rel.as_bytes())
                    .cols(info.names.iter().map(|n| n.as_bytes()));
                write_values(w, &info, rel, tuple, info.columns.len()).none().finish(OldVersion::Unknown);
            });
            pg_sys::MemoryContextSwitchTo(outer);
            pg_sys::MemoryContextReset(per_row);
            if result.is_err() {
                break;
            }
            logged += 1;
        }
        pg_sys::MemoryContextDelete(per_row);
        pg_sys::table_endscan(scan);
        pg_sys::UnregisterSnapshot(snapshot);
        pg_sys::table_close(rel, lock);
        result?;
    }
    Ok(logged)
}
