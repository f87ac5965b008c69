//! The TRUNCATE trigger: a statement-level trigger that logs each truncated replicated table
//! (all of them when one statement truncates several), with RESTART IDENTITY if given.

use pgrx::prelude::*;

use crate::capture::relinfo::qualified_name;
use crate::capture::row::text_datum;
use crate::capture::{applying_for_peer, log_slot_for_transaction, text_array};
use crate::error::{OrRaise, TrompeError};
use crate::log::writer::{append, Entry};

/// AFTER TRUNCATE ... FOR EACH STATEMENT trigger that logs the truncation.
#[pg_trigger]
fn capture_truncate<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, std::convert::Infallible> {
    if !applying_for_peer() {
        capture(trigger.trigger_data()).or_raise();
    }
    Ok(None)
}

fn capture(td: &pg_sys::TriggerData) -> Result<(), TrompeError> {
    let rel = td.tg_relation;
    let slot = log_slot_for_transaction()?;
    // SAFETY: rel is the open relation the trigger fired for.
    let (nsp, name) = unsafe {
        let form = (*rel).rd_rel;
        let nsp = pg_sys::get_namespace_name((*form).relnamespace);
        if nsp.is_null() {
            return Err(TrompeError::Internal(format!(
                "schema of {} not found",
                qualified_name(rel)
            )));
        }
        (
            std::ffi::CStr::from_ptr(nsp).to_string_lossy().into_owned(),
            std::ffi::CStr::from_ptr((*form).relname.data.as_ptr())
                .to_string_lossy()
                .into_owned(),
        )
    };
    let restart = if crate::capture::ddl::truncate_restarts_identity() {
        "restart"
    } else {
        "continue"
    };
    let entry = Entry {
        op: b'T',
        nsp: text_datum(&nsp),
        rel: text_datum(&name),
        cols: None,
        vals: Some(text_array(&[text_datum(restart)], None)),
        oldkey: None,
        old_xmin: None,
    };
    append(slot, &entry)
}
