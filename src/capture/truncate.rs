//! The TRUNCATE trigger: a statement-level trigger that captures each truncated replicated
//! table (all of them when one statement truncates several), with RESTART IDENTITY if given.

use pgrx::prelude::*;
use trompe_core::changeset::{ChangeWriter, OldVersion};
use trompe_core::logformat::Op;

use crate::capture::relinfo::qualified_name;
use crate::capture::xact;
use crate::error::{OrRaise, TrompeError};
use crate::session::applying_for_peer;

/// AFTER TRUNCATE ... FOR EACH STATEMENT trigger that captures the truncation.
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
    // SAFETY: rel is the open relation the trigger fired for.
    let (nsp, name) = unsafe {
        let form = (*rel).rd_rel;
        let nsp = pg_sys::get_namespace_name((*form).relnamespace);
        if nsp.is_null() {
            return Err(TrompeError::Internal(format!("schema of {} not found", qualified_name(rel))));
        }
        (
            std::ffi::CStr::from_ptr(nsp).to_string_lossy().into_owned(),
            std::ffi::CStr::from_ptr((*form).relname.data.as_ptr()).to_string_lossy().into_owned(),
        )
    };
    let restart = if crate::capture::ddl::truncate_restarts_identity() { "restart" } else { "continue" };
    // SAFETY: rel is open (the trigger manager hands it over).
    let (relid, info) = unsafe { ((*rel).rd_id, crate::capture::relinfo::replicated_relinfo(rel)?) };
    let Some(info) = info else { return Ok(()) };
    crate::capture::local_writes::truncated(relid, &info.ranking);
    xact::record(&nsp, &name, |buf, seq| {
        ChangeWriter::begin(buf, Op::Truncate, seq, nsp.as_bytes(), name.as_bytes())
            .cols(std::iter::empty())
            .list(1)
            .value(Some(restart.as_bytes()))
            .none()
            .finish(OldVersion::Unknown);
    })?;
    // RESTART IDENTITY restarted the table's sequences at their start: back into this node's slot.
    if restart == "restart" {
        crate::sequences::adjust()?;
    }
    Ok(())
}
