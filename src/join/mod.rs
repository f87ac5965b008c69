//! A node joining a running cluster: `trompe.add_peer(name, conninfo, sync => true)` on a new,
//! empty node. The source peer registers the new node with each of its own peers (so they keep
//! their log for it) and serves one snapshot; the new node's worker copies the schema, rows,
//! tombstones and large objects of that snapshot, each row with its original version, and then
//! pulls every node from exactly where that snapshot left it. See `sql/join.sql`.

pub mod copy;
pub mod schema;
pub mod script;
pub mod source;

/// True once this database's trompe has the tables joining needs (0.3.0 and later): the library
/// is replaced before `ALTER EXTENSION trompe UPDATE` runs, and must work with the older schema
/// meanwhile.
pub fn schema_installed() -> Result<bool, String> {
    crate::sql::flag(
        "SELECT to_regclass('trompe.syncs') IS NOT NULL AND to_regclass('trompe.start_positions') IS NOT NULL",
        &[],
    )
}
