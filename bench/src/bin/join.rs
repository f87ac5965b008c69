//! bench/join: how long a node takes to join a cluster with `add_peer(..., sync => true)`,
//! against what a DBA would run by hand in the same run to seed a node: the schema through
//! `pg_dump --schema-only | psql`, then `COPY items TO STDOUT` on the source streamed into
//! `COPY items FROM STDIN` on the new node (which keeps no row versions and no position, so it
//! cannot join safely under load). BENCH_ROWS rows (default 1,000,000) written by one
//! transaction, then BENCH_VERSIONS of them (default 20,000) updated one transaction each, so
//! the copy has that many versions to keep.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use trompe_bench::env_count;
use trompe_tests::system::pg_bin;
use trompe_tests::{checksum, Cluster, Node};

/// The by-hand seeding of `to` from `from`: schema, then the rows.
fn by_hand(from: &Node, to: &Node) -> Duration {
    let started = Instant::now();
    let dump = Command::new(pg_bin("pg_dump"))
        .args(["--schema-only", "--exclude-schema=trompe", "--dbname", &from.conninfo()])
        .output()
        .expect("pg_dump runs");
    assert!(dump.status.success(), "pg_dump: {}", String::from_utf8_lossy(&dump.stderr));
    let mut psql = Command::new(pg_bin("psql"))
        .args(["-q", "-v", "ON_ERROR_STOP=0", "--dbname", &to.conninfo()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("psql runs");
    psql.stdin.take().expect("psql stdin").write_all(&dump.stdout).expect("schema sent");
    psql.wait().expect("psql ends");
    let mut source = from.connect();
    let mut target = to.connect();
    let mut reader = source.copy_out("COPY items TO STDOUT").expect("copy out");
    let mut writer = target.copy_in("COPY items FROM STDIN").expect("copy in");
    std::io::copy(&mut reader, &mut writer).expect("rows streamed");
    writer.finish().expect("copy in ends");
    started.elapsed()
}

fn main() {
    let rows = env_count("BENCH_ROWS", 1_000_000);
    let versions = env_count("BENCH_VERSIONS", 20_000);
    println!("bench/join: {rows} rows, {versions} of them last written by a transaction of their own");
    let cluster = Cluster::builder("bench-join").nodes(3).setting("shared_buffers", "256MB").start();
    let (source, manual, joining) = (cluster.node(0), cluster.node(1), cluster.node(2));
    source.exec(&format!(
        "CREATE TABLE items (id bigint PRIMARY KEY, note text, qty int, at timestamptz);
         SELECT trompe.add_table('items');
         INSERT INTO items SELECT i, md5(i::text), i % 1000, '2026-01-01'::timestamptz + i * interval '1 second'
           FROM generate_series(1, {rows}) i;
         CREATE PROCEDURE touch(n int) LANGUAGE plpgsql AS $$
         BEGIN
             FOR i IN 1..n LOOP
                 UPDATE items SET qty = -qty WHERE id = 1 + (i::bigint * 7919) % {rows};
                 COMMIT;
             END LOOP;
         END $$;"
    ));
    // Each on its own: a procedure commits only outside a multi-statement batch.
    source.exec(&format!("CALL touch({versions})"));
    source.exec("VACUUM ANALYZE items");
    let distinct = source.query_i64("SELECT count(DISTINCT pg_xact_commit_timestamp(xmin)) FROM items");
    println!("  versions in the table: {distinct}");

    let hand = by_hand(source, manual);
    assert_eq!(manual.query_i64("SELECT count(*) FROM items"), rows as i64, "the by-hand copy is complete");

    let started = Instant::now();
    joining.exec(&format!("SELECT trompe.add_peer('n1', '{}', sync => true)", source.conninfo()));
    joining.wait_for_value("SELECT sync_state FROM trompe.status WHERE name = 'n1'", "done", Duration::from_secs(3600));
    let join = started.elapsed();
    assert_eq!(joining.query_text(&checksum("items")), source.query_text(&checksum("items")), "the copy is exact");

    println!("  by hand (pg_dump | psql, COPY | COPY): {:>7.2} s", hand.as_secs_f64());
    println!(
        "  add_peer(..., sync => true):          {:>7.2} s   ratio {:.2}   {:.0} rows/s",
        join.as_secs_f64(),
        join.as_secs_f64() / hand.as_secs_f64(),
        rows as f64 / join.as_secs_f64()
    );
}
