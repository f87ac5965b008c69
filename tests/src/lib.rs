//! The multi-node test harness of trompe.
//!
//! Tests start real PostgreSQL 15 nodes (their own data directory, port and server log, run as
//! the `postgres` user) with the freshly installed extension preloaded, talk to them with a
//! client, crash and restart them, and cut the network between them through a proxy per
//! directed link. Everything is removed when the test ends; a failing test prints each node's
//! server log and keeps a copy.

pub mod cluster;
pub mod node;
pub mod proxy;
pub mod random;
pub mod system;
pub mod wait;

pub use cluster::Cluster;
pub use node::Node;
pub use random::Rng;
pub use wait::wait_for;

/// A PostgreSQL error with its SQLSTATE, message and detail, for assertions and panics.
pub fn describe_error(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(d) = db.detail() {
                s += &format!("\nDETAIL: {d}");
            }
            if let Some(h) = db.hint() {
                s += &format!("\nHINT: {h}");
            }
            s
        }
        None => e.to_string(),
    }
}

/// Runs `sql` on a client and returns the SQLSTATE and message it fails with; panics if it
/// succeeds.
pub fn expect_error(client: &mut postgres::Client, sql: &str) -> (String, String) {
    match client.batch_execute(sql) {
        Ok(()) => panic!("expected `{sql}` to fail, but it succeeded"),
        Err(e) => match e.as_db_error() {
            Some(db) => (db.code().code().to_string(), db.message().to_string()),
            None => panic!("expected a database error from `{sql}`, got {e}"),
        },
    }
}

/// A query returning an order-independent fingerprint of a table's whole contents (row count
/// and a hash of its rows in sorted order), to compare nodes with `Cluster::assert_same`. Rows
/// are compared as jsonb (columns by name), so columns added by concurrent DDL on different
/// nodes, which may end up in a different order, compare equal when their values are.
pub fn checksum(table: &str) -> String {
    format!(
        "SELECT count(*) || ':' || coalesce(md5(string_agg(to_jsonb(t)::text, ',' ORDER BY to_jsonb(t)::text)), '') FROM {table} t"
    )
}

/// Prints every node's rows of `table` with their versions, its tombstones and its conflicts,
/// to find out why nodes differ.
pub fn dump_versions(cluster: &Cluster, table: &str) {
    let readable = if table.contains('.') { table.to_string() } else { format!("public.{table}") };
    for node in cluster.nodes() {
        let rows = node.query_text(&format!(
            "SELECT string_agg(format('%s @ %s from %s', r::text, c.timestamp, coalesce(o.roname, 'local')), E'\\n' ORDER BY r::text)
             FROM {table} r, pg_xact_commit_timestamp_origin(r.xmin) c LEFT JOIN pg_replication_origin o ON o.roident = c.roident"
        ));
        let tombstones = node.query_text(&format!(
            "SELECT string_agg(format('%s @ %s', key, pg_xact_commit_timestamp(xmin)), E'\\n' ORDER BY key)
             FROM trompe.tombstones WHERE relid = '{table}'::regclass"
        ));
        let truncation = node.query_text(&format!(
            "SELECT pg_xact_commit_timestamp(xmin)::text FROM trompe.truncations WHERE relid = '{table}'::regclass"
        ));
        let conflicts = node.query_text(&format!(
            "SELECT string_agg(format('%s %s %s %s winner=%s local=%s@%s %s remote=%s@%s %s', id, at, kind, key, winner,
                                      local_origin, local_committed_at, local_row, remote_origin, remote_committed_at, remote_row),
                               E'\\n' ORDER BY id)
             FROM trompe.conflicts WHERE table_name = '{readable}'"
        ));
        let kept = node.query_text(&format!(
            "SELECT string_agg(format('%s xmin=%s @ %s from %s', key, row_xmin, committed_us, node_id), E'\\n' ORDER BY key)
             FROM trompe.row_versions WHERE relid = '{table}'::regclass"
        ));
        let rewrites = node.query_text(&format!(
            "SELECT string_agg(xid::text, ',') FROM trompe.rewrites WHERE relid = '{table}'::regclass"
        ));
        println!("===== {}: kept versions (rewrites {rewrites:?})\n{}", node.name, kept.unwrap_or_default());
        let path = cluster.keep_file(&format!("{}-{table}-conflicts.txt", node.name), &conflicts.unwrap_or_default());
        println!("conflicts of {} kept in {}", node.name, path.display());
        println!(
            "===== {} ({}): rows\n{}\n----- tombstones\n{}\n----- truncated at {truncation:?}",
            node.name,
            node.query_text("SELECT trompe.node_id()::text").unwrap_or_default(),
            rows.unwrap_or_default(),
            tombstones.unwrap_or_default()
        );
    }
}
