//! Appends entries to the change log through saved SPI plans, one per log table, as the
//! extension's owner so that users who write to replicated tables need no right on the log.

use std::cell::RefCell;

use pgrx::pg_sys;

use crate::error::TrompeError;
use crate::log::LOG_SLOTS;

/// One change, ready to be written: text datums built by the capture code.
pub struct Entry {
    /// Kind of change: one of `I`, `U`, `D`, `T`, `S`.
    pub op: u8,
    /// Schema of the table (text datum).
    pub nsp: pg_sys::Datum,
    /// Table name (text datum).
    pub rel: pg_sys::Datum,
    /// Column names (`text[]`), if any.
    pub cols: Option<pg_sys::Datum>,
    /// Values (`text[]`), if any.
    pub vals: Option<pg_sys::Datum>,
    /// Old primary key (`text[]`), if any.
    pub oldkey: Option<pg_sys::Datum>,
    /// Transaction that wrote the old row version, if any.
    pub old_xmin: Option<pg_sys::TransactionId>,
}

thread_local! {
    static PLANS: RefCell<[Option<SavedPlan>; LOG_SLOTS]> = const { RefCell::new([None, None, None]) };
}

#[derive(Clone, Copy)]
struct SavedPlan(pg_sys::SPIPlanPtr);

const ARG_TYPES: [pg_sys::Oid; 7] = [
    pg_sys::CHAROID,
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
    pg_sys::TEXTARRAYOID,
    pg_sys::TEXTARRAYOID,
    pg_sys::TEXTARRAYOID,
    pg_sys::XIDOID,
];

fn plan_for(slot: usize) -> Result<SavedPlan, TrompeError> {
    if let Some(plan) = PLANS.with(|p| p.borrow()[slot]) {
        return Ok(plan);
    }
    let sql = format!(
        "INSERT INTO trompe.log_{slot} (id, txid, op, nsp, rel, cols, vals, oldkey, old_xmin) \
         VALUES (nextval('trompe.log_id_seq'), pg_current_xact_id(), $1, $2, $3, $4, $5, $6, $7)"
    );
    let sql = std::ffi::CString::new(sql).map_err(|e| TrompeError::Internal(e.to_string()))?;
    // SAFETY: called inside SPI_connect/SPI_finish by `append`; the plan is kept in
    // TopMemoryContext by SPI_keepplan and lives for the backend's lifetime.
    let plan = unsafe {
        let plan = pg_sys::SPI_prepare(
            sql.as_ptr(),
            ARG_TYPES.len() as i32,
            ARG_TYPES.as_ptr() as *mut pg_sys::Oid,
        );
        if plan.is_null() {
            return Err(TrompeError::Internal(
                "cannot prepare the log insert".into(),
            ));
        }
        pg_sys::SPI_keepplan(plan);
        SavedPlan(plan)
    };
    PLANS.with(|p| p.borrow_mut()[slot] = Some(plan));
    Ok(plan)
}

/// Runs `f` as the bootstrap superuser (restored afterwards, also on error), like a SECURITY
/// DEFINER function would.
pub fn as_extension_owner<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(pg_sys::Oid, i32);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: restores the user id and security context saved below.
            unsafe { pg_sys::SetUserIdAndSecContext(self.0, self.1) };
        }
    }
    let mut user = pg_sys::InvalidOid;
    let mut context = 0;
    // SAFETY: saving and switching the current user id, as SECURITY DEFINER functions do.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID),
            context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
    }
    let _restore = Restore(user, context);
    f()
}

/// Appends one entry to the log table `slot` in the current transaction.
pub fn append(slot: usize, entry: &Entry) -> Result<(), TrompeError> {
    let opt = |d: Option<pg_sys::Datum>| {
        (
            d.unwrap_or(pg_sys::Datum::from(0)),
            if d.is_some() { b' ' } else { b'n' },
        )
    };
    let (cols, cols_n) = opt(entry.cols);
    let (vals, vals_n) = opt(entry.vals);
    let (oldkey, oldkey_n) = opt(entry.oldkey);
    let (old_xmin, old_xmin_n) = opt(entry.old_xmin.map(pg_sys::Datum::from));
    let mut values = [
        pg_sys::Datum::from(entry.op as i8),
        entry.nsp,
        entry.rel,
        cols,
        vals,
        oldkey,
        old_xmin,
    ];
    let nulls = [b' ', b' ', b' ', cols_n, vals_n, oldkey_n, old_xmin_n, 0];
    as_extension_owner(|| {
        // SAFETY: SPI is connected and finished around the execution; values and nulls have the
        // plan's argument count.
        let rc = unsafe {
            pg_sys::SPI_connect();
            let rc = match plan_for(slot) {
                Ok(plan) => Ok(pg_sys::SPI_execute_plan(
                    plan.0,
                    values.as_mut_ptr(),
                    nulls.as_ptr() as *const std::ffi::c_char,
                    false,
                    1,
                )),
                Err(e) => Err(e),
            };
            pg_sys::SPI_finish();
            rc?
        };
        if rc != pg_sys::SPI_OK_INSERT as i32 {
            return Err(TrompeError::Internal(format!(
                "writing to the change log failed (SPI code {rc})"
            )));
        }
        crate::capture::note_log_write();
        Ok(())
    })
}
