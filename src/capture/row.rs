//! The row trigger: every INSERT, UPDATE and DELETE on a replicated table becomes one log entry
//! in the same transaction.

use std::ffi::CString;

use pgrx::prelude::*;

use crate::capture::relinfo::{relinfo, RelInfo};
use crate::capture::{applying_for_peer, log_slot_for_transaction, text_array, CanonicalOutput};
use crate::error::{OrRaise, TrompeError};
use crate::log::writer::{append, Entry};

/// AFTER INSERT OR UPDATE OR DELETE ... FOR EACH ROW trigger that logs the change.
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
    let info = unsafe { relinfo(rel)? };
    let slot = log_slot_for_transaction()?;
    let _format = CanonicalOutput::enter();
    let nsp = text_datum(&info.nsp);
    let relname = text_datum(&info.rel);
    let event = td.tg_event & pg_sys::TRIGGER_EVENT_OPMASK;
    let entry = match event {
        pg_sys::TRIGGER_EVENT_INSERT => Entry {
            op: b'I',
            nsp,
            rel: relname,
            cols: Some(info.names_array),
            vals: Some(row_text(&info, rel, td.tg_trigtuple, info.columns.len())),
            oldkey: None,
            old_xmin: None,
        },
        pg_sys::TRIGGER_EVENT_UPDATE => Entry {
            op: b'U',
            nsp,
            rel: relname,
            cols: Some(info.names_array),
            vals: Some(row_text(&info, rel, td.tg_newtuple, info.columns.len())),
            oldkey: Some(row_text(&info, rel, td.tg_trigtuple, info.nkey)),
            old_xmin: Some(xmin_of(td.tg_trigtuple)),
        },
        pg_sys::TRIGGER_EVENT_DELETE => Entry {
            op: b'D',
            nsp,
            rel: relname,
            cols: Some(info.key_names_array),
            vals: None,
            oldkey: Some(row_text(&info, rel, td.tg_trigtuple, info.nkey)),
            old_xmin: Some(xmin_of(td.tg_trigtuple)),
        },
        other => {
            return Err(TrompeError::Internal(format!(
                "capture_row fired for unexpected event {other}"
            )))
        }
    };
    append(slot, &entry)
}

/// A text datum in the current memory context.
pub fn text_datum(s: &str) -> pg_sys::Datum {
    let c = CString::new(s.replace('\0', "")).unwrap_or_default();
    // SAFETY: cstring_to_text copies the NUL-terminated string into a new text value.
    unsafe { pg_sys::Datum::from(pg_sys::cstring_to_text(c.as_ptr())) }
}

/// The transaction that wrote a row version (FrozenTransactionId if frozen).
fn xmin_of(tuple: pg_sys::HeapTuple) -> pg_sys::TransactionId {
    // SAFETY: the trigger manager hands us a valid tuple with a header.
    unsafe { pg_sys::HeapTupleHeaderGetXmin((*tuple).t_data) }
}

/// The first `count` replicated columns of `tuple` as a `text[]` in canonical text form.
fn row_text(
    info: &RelInfo,
    rel: pg_sys::Relation,
    tuple: pg_sys::HeapTuple,
    count: usize,
) -> pg_sys::Datum {
    // SAFETY: tuple belongs to rel, whose descriptor sizes the deform arrays; output functions
    // get non-null datums of their column's type.
    unsafe {
        let tupdesc = (*rel).rd_att;
        let natts = (*tupdesc).natts as usize;
        let mut values = vec![pg_sys::Datum::from(0); natts];
        let mut isnull = vec![false; natts];
        pg_sys::heap_deform_tuple(tuple, tupdesc, values.as_mut_ptr(), isnull.as_mut_ptr());
        let mut texts = Vec::with_capacity(count);
        let mut nulls = Vec::with_capacity(count);
        for col in &info.columns[..count] {
            if isnull[col.index] {
                texts.push(pg_sys::Datum::from(0));
                nulls.push(true);
            } else {
                let out = pg_sys::OutputFunctionCall(col.output, values[col.index]);
                texts.push(pg_sys::Datum::from(pg_sys::cstring_to_text(out)));
                pg_sys::pfree(out.cast());
                nulls.push(false);
            }
        }
        text_array(&texts, Some(&nulls))
    }
}
