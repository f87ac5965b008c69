//! bench/compare: how long `trompe.compare` takes on a large table, against what a DBA would
//! otherwise run by hand in the same run: a full ordered checksum of the table on both nodes
//! (`md5(string_agg(row, '' ORDER BY key))`), which finds *whether* the nodes differ but not
//! which rows. Measured with identical tables and with BENCH_DIFFS rows changed behind trompe's
//! back on one node; BENCH_ROWS rows (default 1,000,000).

use std::time::{Duration, Instant};

use trompe_bench::env_count;
use trompe_tests::{Cluster, Node};

const CHECKSUM: &str = "SELECT md5(string_agg(t::text, '' ORDER BY id)) FROM items t";

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let started = Instant::now();
    let out = f();
    (out, started.elapsed())
}

/// The by-hand baseline: the checksum on both nodes, one after the other.
fn by_hand(a: &Node, b: &Node) -> (bool, Duration) {
    let ((x, y), took) = timed(|| (a.query_text(CHECKSUM), b.query_text(CHECKSUM)));
    (x == y, took)
}

fn compare(b: &Node) -> (String, Duration) {
    timed(|| {
        b.query_text("SELECT only_here || '/' || only_there || '/' || different FROM trompe.compare('n1', 'items')")
            .unwrap_or_default()
    })
}

fn main() {
    let rows = env_count("BENCH_ROWS", 1_000_000);
    let diffs = env_count("BENCH_DIFFS", 100);
    println!("bench/compare: {rows} rows, {diffs} of them changed behind trompe's back");
    let cluster = Cluster::builder("bench-compare").nodes(2).setting("shared_buffers", "256MB").start();
    let (a, b) = (cluster.node(0), cluster.node(1));
    cluster.exec_all(&format!(
        "CREATE TABLE items (id bigint PRIMARY KEY, note text, qty int, at timestamptz);
         SELECT trompe.add_table('items');
         SET session_replication_role = replica;
         INSERT INTO items SELECT i, md5(i::text), i % 1000, '2026-01-01'::timestamptz + i * interval '1 second'
           FROM generate_series(1, {rows}) i;
         ANALYZE items;"
    ));
    b.exec(&format!("SELECT trompe.add_peer('n1', '{}')", a.conninfo()));
    // Warm both caches the same way.
    by_hand(a, b);

    let (same, hand) = by_hand(a, b);
    assert!(same, "the nodes start identical");
    let (found, took) = compare(b);
    assert_eq!(found, "0/0/0");
    println!("identical tables:");
    println!("  checksum on both nodes (by hand): {:>7.2} s", hand.as_secs_f64());
    println!(
        "  trompe.compare:                   {:>7.2} s   ratio {:.2}",
        took.as_secs_f64(),
        took.as_secs_f64() / hand.as_secs_f64()
    );

    let step = (rows / diffs.max(1)).max(1);
    b.exec(&format!(
        "SET session_replication_role = replica; UPDATE items SET qty = -1 WHERE id % {step} = 0 AND id <= {}",
        step * diffs
    ));
    let (same, hand) = by_hand(a, b);
    assert!(!same, "the checksums see a difference");
    let (found, took) = compare(b);
    assert_eq!(found, format!("0/0/{diffs}"));
    println!("{diffs} rows different:");
    println!("  checksum on both nodes (by hand): {:>7.2} s   (says only that they differ)", hand.as_secs_f64());
    println!(
        "  trompe.compare:                   {:>7.2} s   ratio {:.2} (names every row)",
        took.as_secs_f64(),
        took.as_secs_f64() / hand.as_secs_f64()
    );
    let (_, repair) = timed(|| b.query_text("SELECT updated FROM trompe.repair('n1', 'items')"));
    println!("  trompe.repair:                    {:>7.2} s", repair.as_secs_f64());
}
