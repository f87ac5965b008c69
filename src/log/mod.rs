//! The change log: appending entries (`writer`), serving them to the peers that pull them
//! (`serve`, in steps that end at `marks` when a consumer is far behind), choosing the table to append to and retiring tables that every peer has confirmed
//! (`rotation`).

pub mod marks;
pub mod rotation;
pub mod serve;
pub mod writer;

/// Number of log tables used in turn (`trompe.log_0` .. `trompe.log_2`).
pub const LOG_SLOTS: usize = 3;

/// A subquery of `columns` over the log's tables, for `FROM`: the rows are only ever in them
/// (the parent `trompe.log` refuses any), and a scan of the empty parent still costs a look at
/// its size on disk. The planner pushes conditions on it down to each table's index.
pub fn rows_sql(columns: &str) -> String {
    let parts: Vec<String> = (0..LOG_SLOTS).map(|s| format!("SELECT {columns} FROM trompe.log_{s}")).collect();
    format!("({})", parts.join(" UNION ALL "))
}
