//! Change capture: the row and TRUNCATE triggers and DDL capture (`row`, `truncate`, `ddl`),
//! the transaction's buffer of changes (`buffer`) written to the log when it ends (`xact`), and
//! what local writes do for conflict resolution (`local_writes`).

pub mod buffer;
pub mod ddl;
pub mod ddl_policy;
pub mod local_writes;
pub mod privileges;
pub mod relinfo;
pub mod row;
pub mod truncate;
pub mod version;
pub mod xact;
