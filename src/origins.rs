//! The replication origins through which this database applies its peers' changes, one per peer:
//! each records the peer the applied rows came from (read back through commit timestamps) and
//! this database's position in the peer's log inside a step (see `worker::progress`).
//!
//! Replication origins belong to the whole cluster, so each name holds the database's oid
//! (`trompe_<peer>_<oid>`, `trompe_core::nodeid::origin_name`). trompe 0.4.0 named them
//! `trompe_<peer>` only, and two databases of one cluster pulling from the same peer shared one:
//! a position one of them stored moved the other's, which then skipped what it had not applied.
//! A database keeps using the old names until `ALTER EXTENSION trompe UPDATE` (its 0.4.0 SQL
//! functions read them); its worker then starts again, takes each old origin's position over,
//! and keeps the old origin for the rows it applied (their commit timestamps name it).

use pgrx::pg_sys;

use crate::sql;

fn database() -> u32 {
    // SAFETY: a backend-local global set at connection (the worker's too).
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

/// Whether this database's schema names origins per database (`trompe._origin_name`, 0.5.0;
/// read inside a transaction). Until `ALTER EXTENSION trompe UPDATE` it does not, and its SQL
/// functions read positions from the origins named the 0.4.0 way: the library uses those
/// names too until then.
pub fn per_database() -> bool {
    sql::flag("SELECT pg_catalog.to_regprocedure('trompe._origin_name(uuid)') IS NOT NULL", &[]).unwrap_or(true)
}

/// The name of this database's origin for peer `node` (inside a transaction: it reads the
/// catalog).
pub fn name(node: impl std::fmt::Display) -> String {
    if per_database() {
        trompe_core::nodeid::origin_name(node, database())
    } else {
        trompe_core::nodeid::legacy_origin_name(node)
    }
}

/// SQL for the name of this database's origin for the peer whose node id `node_expr` gives
/// (inside a transaction).
pub fn name_sql(node_expr: &str) -> String {
    if per_database() {
        format!("('trompe_' || {node_expr} || '_{}')", database())
    } else {
        format!("('trompe_' || {node_expr})")
    }
}

/// Creates the origin named `name` unless it exists; its id.
pub fn create(name: &str) -> Result<Option<u16>, String> {
    sql::execute(
        "SELECT pg_replication_origin_create($1) WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = $1)",
        &[Some(name)],
    )?;
    Ok(sql::value("SELECT roident FROM pg_replication_origin WHERE roname = $1", &[Some(name)])?
        .and_then(|v| v.parse::<u16>().ok()))
}

/// Creates the missing origins of this database's peers (after the update from 0.4.0, or a
/// restore). One whose peer has an origin named the 0.4.0 way starts at that origin's
/// position, where this database's position was kept until then.
pub fn create_for_peers() -> Result<(), String> {
    if !per_database() {
        sql::execute(
            &format!(
                "SELECT pg_replication_origin_create({name}) FROM trompe.peers p
                  WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = {name})",
                name = name_sql("p.node_id")
            ),
            &[],
        )?;
        return Ok(());
    }
    let missing = sql::rows(
        &format!(
            "SELECT {name}, pg_replication_origin_progress(o.roname, false)::text
               FROM trompe.peers p LEFT JOIN pg_replication_origin o ON o.roname = 'trompe_' || p.node_id
              WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = {name})",
            name = name_sql("p.node_id")
        ),
        &[],
    )?;
    for row in missing {
        let Some(name) = row.first().cloned().flatten() else { continue };
        create(&name)?;
        if let Some(lsn) = row.get(1).cloned().flatten().filter(|l| l != "0/0") {
            sql::execute("SELECT pg_replication_origin_advance($1, $2::pg_lsn)", &[Some(&name), Some(&lsn)])?;
        }
    }
    Ok(())
}

/// Drops the origins of databases that no longer exist (DROP DATABASE leaves them behind, and
/// each one with a position holds one of the cluster's `max_replication_slots` states).
pub fn drop_those_of_dropped_databases() -> Result<u64, String> {
    sql::execute(
        "SELECT pg_replication_origin_drop(o.roname) FROM pg_replication_origin o
          WHERE o.roname ~ '^trompe_[0-9a-f-]{36}_[0-9]+$'
            AND NOT EXISTS (SELECT 1 FROM pg_database d WHERE d.oid::text = substr(o.roname, 45))",
        &[],
    )
}

/// Drops every origin of this database (the extension is gone from it).
pub fn drop_this_databases() -> Result<u64, String> {
    sql::execute(
        "SELECT pg_replication_origin_drop(o.roname) FROM pg_replication_origin o
          WHERE o.roname ~ '^trompe_[0-9a-f-]{36}_[0-9]+$' AND substr(o.roname, 45) = $1",
        &[Some(&database().to_string())],
    )
}
