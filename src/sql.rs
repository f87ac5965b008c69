//! Running SQL from inside the server through SPI, with text parameters and text results.
//!
//! trompe does not use pgrx's `Spi::get_one`/`run` helpers: they assign a transaction id to
//! every transaction that calls them (even for a SELECT), which would hold back vacuum while a
//! pull waits, and their read-only mode reuses the calling statement's snapshot. Every query
//! here runs with a fresh snapshot (in READ COMMITTED) and assigns no transaction id unless it
//! writes.

use std::ffi::{CStr, CString};

use pgrx::pg_sys;

/// A row of text values (`None` is NULL).
pub type Row = Vec<Option<String>>;

/// `s` as a C string (a NUL inside is dropped).
pub fn cstring(s: &str) -> CString {
    CString::new(s).unwrap_or_else(|e| {
        let mut bytes = e.into_vec();
        bytes.retain(|b| *b != 0);
        CString::new(bytes).unwrap_or_default()
    })
}

/// Text parameters `$1..` of one SPI call, as SPI takes them: types, datums and null flags.
struct TextParams {
    types: Vec<pg_sys::Oid>,
    values: Vec<pg_sys::Datum>,
    nulls: Vec<std::ffi::c_char>,
}

impl TextParams {
    /// Call with SPI connected: the datums are text values made in the SPI procedure context.
    fn new(args: &[Option<&str>]) -> TextParams {
        let values = args
            .iter()
            .map(|a| {
                a.map_or(pg_sys::Datum::from(0), |a| {
                    let c = cstring(a);
                    // SAFETY: copies the string into a text value in the current memory context.
                    pg_sys::Datum::from(unsafe { pg_sys::cstring_to_text(c.as_ptr()) })
                })
            })
            .collect();
        let nulls = args.iter().map(|a| if a.is_some() { b' ' } else { b'n' } as std::ffi::c_char).chain([0]).collect();
        TextParams { types: vec![pg_sys::TEXTOID; args.len()], values, nulls }
    }
}

/// The values of an SPI result row as text (`None` for NULL), each freed once copied.
///
/// # Safety
/// `tuple` must be a row of the current SPI result, described by `tupdesc`.
unsafe fn row_texts(tuple: pg_sys::HeapTuple, tupdesc: pg_sys::TupleDesc) -> Row {
    // SAFETY: the caller's contract; SPI_getvalue returns a palloc'd string or NULL.
    unsafe {
        (1..=(*tupdesc).natts)
            .map(|c| {
                let v = pg_sys::SPI_getvalue(tuple, tupdesc, c);
                if v.is_null() {
                    return None;
                }
                let text = CStr::from_ptr(v).to_string_lossy().into_owned();
                pg_sys::pfree(v.cast());
                Some(text)
            })
            .collect()
    }
}

/// Runs `sql` with text parameters `$1..` (cast them in the SQL: `$1::uuid`); returns the
/// rows as text and how many rows the statement processed.
pub fn run(sql: &str, args: &[Option<&str>]) -> Result<(Vec<Row>, u64), String> {
    let sql_c = cstring(sql);
    // SAFETY: SPI is connected and finished here; parameter datums are text values built in
    // the SPI procedure context; results are copied into Rust strings before SPI_finish.
    unsafe {
        pg_sys::SPI_connect();
        let mut params = TextParams::new(args);
        let rc = pg_sys::SPI_execute_with_args(
            sql_c.as_ptr(),
            args.len() as i32,
            params.types.as_mut_ptr(),
            params.values.as_mut_ptr(),
            params.nulls.as_ptr(),
            false,
            0,
        );
        if rc < 0 {
            pg_sys::SPI_finish();
            return Err(format!("SPI error {rc} running: {sql}"));
        }
        let processed = pg_sys::SPI_processed;
        let mut rows = Vec::new();
        let table = pg_sys::SPI_tuptable;
        if !table.is_null() && !(*table).tupdesc.is_null() {
            let tupdesc = (*table).tupdesc;
            for r in 0..processed as usize {
                rows.push(row_texts(*(*table).vals.add(r), tupdesc));
            }
        }
        pg_sys::SPI_finish();
        Ok((rows, processed))
    }
}

/// Whether relation `qualified` (e.g. `trompe.retirements`) exists: what a library newer than
/// the database's schema checks before using what a later version added.
pub fn relation_exists(qualified: &str) -> Result<bool, String> {
    flag("SELECT to_regclass($1) IS NOT NULL", &[Some(qualified)])
}

/// Runs a query and returns its rows.
pub fn rows(sql: &str, args: &[Option<&str>]) -> Result<Vec<Row>, String> {
    run(sql, args).map(|(rows, _)| rows)
}

/// Runs a query and returns its first row, if any.
pub fn row(sql: &str, args: &[Option<&str>]) -> Result<Option<Row>, String> {
    rows(sql, args).map(|r| r.into_iter().next())
}

/// Runs a query and returns the first column of its first row (`None` for no row or NULL).
pub fn value(sql: &str, args: &[Option<&str>]) -> Result<Option<String>, String> {
    row(sql, args).map(|r| r.and_then(|r| r.into_iter().next().flatten()))
}

/// Runs a query returning one boolean (`false` for no row or NULL).
pub fn flag(sql: &str, args: &[Option<&str>]) -> Result<bool, String> {
    value(sql, args).map(|v| v.as_deref() == Some("t"))
}

/// Runs a query returning one integer (`0` for no row or NULL).
pub fn int(sql: &str, args: &[Option<&str>]) -> Result<i64, String> {
    value(sql, args).map(|v| v.and_then(|t| t.parse().ok()).unwrap_or(0))
}

/// Runs a statement; returns how many rows it processed.
pub fn execute(sql: &str, args: &[Option<&str>]) -> Result<u64, String> {
    run(sql, args).map(|(_, n)| n)
}

/// Runs query `sql` (text parameters as for [`run`]) through a cursor, handing each row to `each`
/// as it is fetched, `batch` rows at a time: memory holds one batch, however many rows the
/// query returns. Stops at the first error `each` returns.
pub fn for_each_row(
    sql: &str,
    args: &[Option<&str>],
    batch: i64,
    mut each: impl FnMut(&[Option<&str>]) -> Result<(), String>,
) -> Result<(), String> {
    let sql_c = cstring(sql);
    // SAFETY: SPI is connected and finished here; parameter datums are text values built in
    // the SPI procedure context; each batch's values are read before its tuple table is freed;
    // the cursor is closed before SPI_finish.
    unsafe {
        pg_sys::SPI_connect();
        let mut params = TextParams::new(args);
        let portal = pg_sys::SPI_cursor_open_with_args(
            std::ptr::null(),
            sql_c.as_ptr(),
            args.len() as i32,
            params.types.as_mut_ptr(),
            params.values.as_mut_ptr(),
            params.nulls.as_ptr(),
            false,
            0,
        );
        if portal.is_null() {
            pg_sys::SPI_finish();
            return Err(format!("cannot open a cursor for: {sql}"));
        }
        let mut result = Ok(());
        'fetch: loop {
            pg_sys::SPI_cursor_fetch(portal, true, batch.max(1) as _);
            let processed = pg_sys::SPI_processed as usize;
            let table = pg_sys::SPI_tuptable;
            if processed == 0 || table.is_null() || (*table).tupdesc.is_null() {
                break;
            }
            let tupdesc = (*table).tupdesc;
            for r in 0..processed {
                let texts = row_texts(*(*table).vals.add(r), tupdesc);
                let row: Vec<Option<&str>> = texts.iter().map(|t| t.as_deref()).collect();
                if let Err(e) = each(&row) {
                    result = Err(e);
                    pg_sys::SPI_freetuptable(table);
                    break 'fetch;
                }
            }
            pg_sys::SPI_freetuptable(table);
        }
        pg_sys::SPI_cursor_close(portal);
        pg_sys::SPI_finish();
        result
    }
}

/// This node's current snapshot, taken now.
pub fn snapshot_now() -> Result<trompe_core::snapshot::Snapshot, String> {
    value("SELECT pg_current_snapshot()", &[])?
        .ok_or("pg_current_snapshot() returned nothing")?
        .parse()
        .map_err(|e: trompe_core::snapshot::SnapshotError| e.to_string())
}
