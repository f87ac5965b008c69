//! Storing a peer's position in the same local transaction as the changes it covers.
//!
//! Since 0.3.0 the table `trompe.progress` is written when a step starts or ends; inside a step,
//! each transaction commits its `after` into the peer's replication origin instead
//! (`trompe_core::position::in_origin`), which saves an UPDATE per applied transaction. A
//! database not updated to 0.3.0 yet (no `after_offset` column) gets the table written with
//! every transaction, as before.

use std::cell::Cell;
use std::ffi::CString;

use pgrx::pg_sys;
use trompe_core::position::Position;

thread_local! {
    static PLANS: Cell<[Option<Plan>; 2]> = const { Cell::new([None, None]) };
}

#[derive(Clone, Copy)]
struct Plan(pg_sys::SPIPlanPtr);

/// The position update; a schema older than 0.3.0 has no `after_offset`.
fn update_sql(legacy: bool) -> String {
    format!(
        "UPDATE trompe.progress SET done = $2, cur = $3, after = $4, applied_txns = applied_txns + $5,
                applied_changes = applied_changes + $6, updated_at = now(){}
          WHERE node_id = $1::text::uuid",
        if legacy { "" } else { ", after_offset = $7" }
    )
}

/// The advisory lock (`pg_advisory_lock(128034844536933)`, "trompe" in ASCII) every applying
/// transaction holds in share mode until it commits: a node that is being copied (a joining
/// node's sync) takes it exclusively while it takes its snapshot, so that the positions its
/// replication origins record match the snapshot.
pub const APPLY_LOCK_KEY: i64 = 0x7472_6f6d_7065;

/// Whether this database keeps `after` in replication origins (its schema is 0.3.0 or later).
pub fn origin_holds_after() -> Result<bool, String> {
    crate::sql::flag(
        "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'trompe.progress'::regclass
                          AND attname = 'after_offset' AND NOT attisdropped)",
        &[],
    )
}

/// The SQL for the applied `after` of `trompe.progress pr`.
pub fn after_sql(origin_holds_after: bool) -> &'static str {
    if origin_holds_after {
        "trompe._applied_after(pr.node_id, pr.cur, pr.after, pr.after_offset)"
    } else {
        "pr.after"
    }
}

/// Takes the apply lock in share mode until the end of the current transaction.
pub fn take_apply_lock() {
    let key = APPLY_LOCK_KEY as u64;
    // SAFETY: an advisory lock tag built as SET_LOCKTAG_ADVISORY does for a bigint key
    // (pg_advisory_xact_lock_shared), acquired in a transaction and released at its end.
    unsafe {
        let mut tag: pg_sys::LOCKTAG = std::mem::zeroed();
        tag.locktag_field1 = pg_sys::MyDatabaseId.to_u32();
        tag.locktag_field2 = (key >> 32) as u32;
        tag.locktag_field3 = key as u32;
        tag.locktag_field4 = 1;
        tag.locktag_type = pg_sys::LockTagType::LOCKTAG_ADVISORY as u8;
        tag.locktag_lockmethodid = pg_sys::USER_LOCKMETHOD as u8;
        pg_sys::LockAcquire(&tag, pg_sys::ShareLock as pg_sys::LOCKMODE, false, false);
    }
}

fn plan(legacy: bool) -> Result<Plan, String> {
    let index = usize::from(legacy);
    if let Some(p) = PLANS.get()[index] {
        return Ok(p);
    }
    let sql = CString::new(update_sql(legacy)).map_err(|e| e.to_string())?;
    let mut types = [
        pg_sys::TEXTOID,
        pg_sys::TEXTOID,
        pg_sys::TEXTOID,
        pg_sys::INT8OID,
        pg_sys::INT8OID,
        pg_sys::INT8OID,
        pg_sys::INT8OID,
    ];
    let nargs = if legacy { 6 } else { 7 };
    // SAFETY: SPI is connected by the caller; the plan is kept for the worker's lifetime.
    let p = unsafe {
        let p = pg_sys::SPI_prepare(sql.as_ptr(), nargs, types.as_mut_ptr());
        if p.is_null() {
            return Err("cannot prepare the progress update".into());
        }
        pg_sys::SPI_keepplan(p);
        Plan(p)
    };
    let mut plans = PLANS.get();
    plans[index] = Some(p);
    PLANS.set(plans);
    Ok(p)
}

fn text(s: &str) -> pg_sys::Datum {
    let c = CString::new(s).unwrap_or_default();
    // SAFETY: copies the string into a text value in the current memory context.
    unsafe { pg_sys::Datum::from(pg_sys::cstring_to_text(c.as_ptr())) }
}

/// Stores `pos` as the position of peer `node` (inside the caller's transaction, SPI
/// connected), adding to its counters; `offset` is the step's origin offset, `None` for a
/// schema older than 0.3.0.
pub fn store(node: &str, pos: &Position, txns: i64, changes: i64, offset: Option<i64>) -> Result<(), String> {
    let plan = plan(offset.is_none())?;
    let (cur, after) = match &pos.step {
        Some(s) => (Some(s.cur.to_string()), s.after),
        None => (None, 0),
    };
    let mut values = [
        text(node),
        text(&pos.done.to_string()),
        cur.as_deref().map_or(pg_sys::Datum::from(0), text),
        pg_sys::Datum::from(after),
        pg_sys::Datum::from(txns),
        pg_sys::Datum::from(changes),
        pg_sys::Datum::from(offset.unwrap_or(0)),
    ];
    let nulls: [std::ffi::c_char; 8] =
        [32, 32, if cur.is_some() { 32 } else { b'n' as std::ffi::c_char }, 32, 32, 32, 32, 0];
    // SAFETY: values and nulls cover the plan's six or seven parameters.
    let rc = unsafe { pg_sys::SPI_execute_plan(plan.0, values.as_mut_ptr(), nulls.as_ptr(), false, 0) };
    if rc != pg_sys::SPI_OK_UPDATE as i32 {
        return Err(format!("storing the position failed (SPI code {rc})"));
    }
    Ok(())
}
