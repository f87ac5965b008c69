//! bench/bigtxn: one large transaction (BENCH_MB megabytes of rows that do not compress,
//! default 1024), from its commit at the origin to its rows being visible at the peer, and the
//! peak memory of the processes that carry it: the session writing it, the one serving it at
//! the origin and the one applying it at the peer. For trompe (a backend answering
//! `trompe.pull`, the trompe worker) and, in the same run on the same machine, for PostgreSQL's native logical
//! replication (the walsender, the logical replication apply worker; default subscription
//! settings).
//!
//! With BENCH_SAVEPOINTS=1 the transaction writes each row in a savepoint of its own (a PL/pgSQL
//! exception block), released.
//!
//! Memory is each process's private resident memory (RssAnon in /proc/PID/status) sampled
//! every 20 ms, so shared buffers a process touches do not count; the peak is reported as the
//! growth over the process's memory just before the transaction.

use std::time::{Duration, Instant};

use trompe_bench::memory::{pid_of, Sampler, NATIVE_APPLYING, NATIVE_SERVING, TROMPE_APPLYING, TROMPE_SERVING};
use trompe_bench::{env_count, native_pair};
use trompe_tests::system::{pg_bindir, pg_major};
use trompe_tests::{wait_for, Cluster, Node};

const TABLE: &str = "CREATE TABLE bench_big (id bigint PRIMARY KEY, payload text NOT NULL)";

/// Rows of 2 KB (64 md5 digests of the row's id: no compression, no duplicates).
const ROW_BYTES: i64 = 2048;

/// What one run measured.
struct Run {
    /// From the commit returning at the origin to the last row being visible at the peer.
    visible: Duration,
    /// How long the origin took to commit the transaction (the same work for both).
    write: Duration,
    /// Peak growth of private memory (MB): the writing session, the origin's serving process,
    /// the applying process.
    writer_mb: f64,
    origin_mb: f64,
    apply_mb: f64,
}

/// The transaction: one INSERT of every row, or (`savepoints`) one row per released savepoint,
/// as a PL/pgSQL exception block per row (what JDBC autosave and ORMs' nested savepoints do).
fn transaction(rows: i64, savepoints: bool) -> String {
    let payload =
        format!("(SELECT string_agg(md5(g::text || ':' || i), '') FROM generate_series(1, {}) i)", ROW_BYTES / 32);
    if savepoints {
        format!(
            "DO $$ BEGIN
                 FOR g IN 1..{rows} LOOP
                     BEGIN
                         INSERT INTO bench_big (id, payload) VALUES (g, {payload});
                     EXCEPTION WHEN unique_violation THEN NULL;
                     END;
                 END LOOP;
             END $$"
        )
    } else {
        format!("INSERT INTO bench_big (id, payload) SELECT g, {payload} FROM generate_series(1, {rows}) g")
    }
}

/// Writes the transaction on `origin` while the writing session and `pids` (origin's serving
/// process, peer's applying process) are sampled, and waits for its last row on `peer`.
fn measure(origin: &Node, peer: &Node, pids: [i64; 2], rows: i64, savepoints: bool) -> Run {
    let mut writer = origin.connect();
    let writer_pid: i32 = writer.query_one("SELECT pg_backend_pid()", &[]).expect("pid").get(0);
    let sampler = Sampler::start(vec![writer_pid as i64, pids[0], pids[1]]);
    let started = Instant::now();
    writer.batch_execute(&transaction(rows, savepoints)).expect("the transaction");
    let write = started.elapsed();
    let committed = Instant::now();
    let mut c = peer.connect();
    let probe = c.prepare("SELECT 1 FROM bench_big WHERE id = $1").unwrap();
    let ok = wait_for(Duration::from_secs(7200), || !c.query(&probe, &[&rows]).expect("probe").is_empty());
    assert!(ok, "the transaction never became visible on {}", peer.name);
    let visible = committed.elapsed();
    let peaks = sampler.finish();
    assert_eq!(peer.query_i64("SELECT count(*) FROM bench_big"), rows + 1);
    Run { visible, write, writer_mb: peaks[0], origin_mb: peaks[1], apply_mb: peaks[2] }
}

fn trompe_run(rows: i64, savepoints: bool) -> Run {
    let cluster = Cluster::builder("bench-bigtxn-trompe").nodes(2).setting("shared_buffers", "256MB").start();
    cluster.exec_all(&format!("{TABLE}; SELECT trompe.add_table('bench_big')"));
    let (a, b) = (cluster.node(0), cluster.node(1));
    // Directly, not through the harness's link proxy: the benchmark measures trompe alone.
    b.exec(&format!("SELECT trompe.add_peer('n1', '{}')", a.conninfo()));
    a.exec("INSERT INTO bench_big VALUES (0, 'warm-up')");
    assert!(wait_for(Duration::from_secs(60), || b.query_i64("SELECT count(*) FROM bench_big") == 1));
    let serving = pid_of(a, TROMPE_SERVING);
    let applying = pid_of(b, TROMPE_APPLYING);
    measure(a, b, [serving, applying], rows, savepoints)
}

fn native_run(rows: i64, savepoints: bool) -> Run {
    let cluster = native_pair("bench-bigtxn-native");
    cluster.exec_all(TABLE);
    let (a, b) = (cluster.node(0), cluster.node(1));
    a.exec("CREATE PUBLICATION bench FOR TABLE bench_big");
    b.exec(&format!(
        "CREATE SUBSCRIPTION bench CONNECTION '{}' PUBLICATION bench WITH (copy_data = false)",
        a.conninfo()
    ));
    a.exec("INSERT INTO bench_big VALUES (0, 'warm-up')");
    assert!(wait_for(Duration::from_secs(60), || b.query_i64("SELECT count(*) FROM bench_big") == 1));
    let serving = pid_of(a, NATIVE_SERVING);
    let applying = pid_of(b, NATIVE_APPLYING);
    measure(a, b, [serving, applying], rows, savepoints)
}

fn main() {
    let mb = env_count("BENCH_MB", 1024) as i64;
    let rows = mb * 1024 * 1024 / ROW_BYTES;
    let savepoints = std::env::var("BENCH_SAVEPOINTS").is_ok_and(|v| v == "1");
    println!(
        "bench/bigtxn: one transaction of {mb} MB ({rows} rows of {ROW_BYTES} bytes that do not compress{})",
        if savepoints { ", one released savepoint per row" } else { "" }
    );
    println!("PostgreSQL {}", pg_major(&pg_bindir()));
    let native = native_run(rows, savepoints);
    let trompe = trompe_run(rows, savepoints);
    println!(
        "commit at the origin to visible at the peer (writing it took {:.1} s / {:.1} s):",
        native.write.as_secs_f64(),
        trompe.write.as_secs_f64()
    );
    println!("  native logical replication: {:8.1} s", native.visible.as_secs_f64());
    println!("  trompe:                     {:8.1} s", trompe.visible.as_secs_f64());
    println!("  ratio trompe/native time:   {:8.2}", trompe.visible.as_secs_f64() / native.visible.as_secs_f64());
    println!("peak private memory growth (MB), writing session / serving process at the origin / applying process:");
    for (what, r) in [("native logical replication:", &native), ("trompe:", &trompe)] {
        println!("  {what:<27} {:8.0} / {:8.0} / {:8.0}", r.writer_mb, r.origin_mb, r.apply_mb);
    }
    println!(
        "  trompe applying memory per MB of transaction: {:.2} (native {:.2})",
        trompe.apply_mb / mb as f64,
        native.apply_mb / mb as f64
    );
}
