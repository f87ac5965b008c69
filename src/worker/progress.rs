//! Storing a peer's position, in the same local transaction as the changes it covers, with a
//! plan prepared once.

use std::cell::Cell;
use std::ffi::CString;

use pgrx::pg_sys;
use trompe_core::position::Position;

thread_local! {
    static PLAN: Cell<Option<Plan>> = const { Cell::new(None) };
}

#[derive(Clone, Copy)]
struct Plan(pg_sys::SPIPlanPtr);

const SQL: &str = "UPDATE trompe.progress SET done = $2, cur = $3, after = $4, applied_txns = applied_txns + $5,
                          applied_changes = applied_changes + $6, updated_at = now()
                    WHERE node_id = $1::text::uuid";

fn plan() -> Result<Plan, String> {
    if let Some(p) = PLAN.get() {
        return Ok(p);
    }
    let sql = CString::new(SQL).map_err(|e| e.to_string())?;
    let mut types =
        [pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::INT8OID, pg_sys::INT8OID, pg_sys::INT8OID];
    // SAFETY: SPI is connected by the caller; the plan is kept for the worker's lifetime.
    let p = unsafe {
        let p = pg_sys::SPI_prepare(sql.as_ptr(), types.len() as i32, types.as_mut_ptr());
        if p.is_null() {
            return Err("cannot prepare the progress update".into());
        }
        pg_sys::SPI_keepplan(p);
        Plan(p)
    };
    PLAN.set(Some(p));
    Ok(p)
}

fn text(s: &str) -> pg_sys::Datum {
    let c = CString::new(s).unwrap_or_default();
    // SAFETY: copies the string into a text value in the current memory context.
    unsafe { pg_sys::Datum::from(pg_sys::cstring_to_text(c.as_ptr())) }
}

/// Stores `pos` as the position of peer `node` (inside the caller's transaction, SPI
/// connected), adding to its counters.
pub fn store(node: &str, pos: &Position, txns: i64, changes: i64) -> Result<(), String> {
    let plan = plan()?;
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
    ];
    let nulls: [std::ffi::c_char; 7] =
        [32, 32, if cur.is_some() { 32 } else { b'n' as std::ffi::c_char }, 32, 32, 32, 0];
    // SAFETY: values and nulls match the plan's six parameters.
    let rc = unsafe { pg_sys::SPI_execute_plan(plan.0, values.as_mut_ptr(), nulls.as_ptr(), false, 0) };
    if rc != pg_sys::SPI_OK_UPDATE as i32 {
        return Err(format!("storing the position failed (SPI code {rc})"));
    }
    Ok(())
}
