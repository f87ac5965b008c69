//! Small SQL helpers for the worker (inside a transaction).

use pgrx::prelude::*;

/// Runs SQL that returns nothing of interest.
pub fn execute(sql: &str) -> Result<(), String> {
    Spi::run(sql).map_err(|e| e.to_string())
}

/// Runs SQL with text parameters `$1..`.
pub fn execute_with_text_args(sql: &str, args: &[&str]) -> Result<(), String> {
    let args: Vec<pgrx::datum::DatumWithOid> = args.iter().map(|a| (*a).into()).collect();
    Spi::run_with_args(sql, &args).map_err(|e| e.to_string())
}

/// Runs a query returning one boolean (NULL is false).
pub fn query_bool(sql: &str) -> Result<bool, String> {
    Spi::get_one::<bool>(sql)
        .map(|v| v.unwrap_or(false))
        .map_err(|e| e.to_string())
}
