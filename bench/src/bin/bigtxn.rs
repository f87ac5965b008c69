//! bench/bigtxn: one large transaction (BENCH_MB megabytes of rows that do not compress,
//! default 1024), from its commit at the origin to its rows being visible at the peer, and the
//! peak memory of the two processes that carry it: the one serving it at the origin and the
//! one applying it at the peer. For trompe (a backend answering `trompe.pull`, the trompe
//! worker) and, in the same run on the same machine, for PostgreSQL's native logical
//! replication (the walsender, the logical replication apply worker; default subscription
//! settings).
//!
//! Memory is each process's private resident memory (RssAnon in /proc/PID/status) sampled
//! every 20 ms, so shared buffers a process touches do not count; the peak is reported as the
//! growth over the process's memory just before the transaction.

use std::time::{Duration, Instant};

use trompe_bench::env_count;
use trompe_bench::memory::{pid_of, Sampler, NATIVE_APPLYING, NATIVE_SERVING, TROMPE_APPLYING, TROMPE_SERVING};
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
    /// Peak growth of private memory (MB): the origin's serving process, the applying process.
    origin_mb: f64,
    apply_mb: f64,
}

/// Writes the transaction on `origin` while `pids` (origin's serving process, peer's applying
/// process) are sampled, and waits for its last row on `peer`.
fn measure(origin: &Node, peer: &Node, pids: [i64; 2], rows: i64) -> Run {
    let sampler = Sampler::start(pids.to_vec());
    let started = Instant::now();
    origin.exec(&format!(
        "INSERT INTO bench_big (id, payload)
         SELECT g, (SELECT string_agg(md5(g::text || ':' || i), '') FROM generate_series(1, {}) i)
           FROM generate_series(1, {rows}) g",
        ROW_BYTES / 32
    ));
    let write = started.elapsed();
    let committed = Instant::now();
    let mut c = peer.connect();
    let probe = c.prepare("SELECT 1 FROM bench_big WHERE id = $1").unwrap();
    let ok = wait_for(Duration::from_secs(7200), || !c.query(&probe, &[&rows]).expect("probe").is_empty());
    assert!(ok, "the transaction never became visible on {}", peer.name);
    let visible = committed.elapsed();
    let peaks = sampler.finish();
    assert_eq!(peer.query_i64("SELECT count(*) FROM bench_big"), rows + 1);
    Run { visible, write, origin_mb: peaks[0], apply_mb: peaks[1] }
}

fn trompe_run(rows: i64) -> Run {
    let cluster = Cluster::builder("bench-bigtxn-trompe").nodes(2).setting("shared_buffers", "256MB").start();
    cluster.exec_all(&format!("{TABLE}; SELECT trompe.add_table('bench_big')"));
    let (a, b) = (cluster.node(0), cluster.node(1));
    // Directly, not through the harness's link proxy: the benchmark measures trompe alone.
    b.exec(&format!("SELECT trompe.add_peer('n1', '{}')", a.conninfo()));
    a.exec("INSERT INTO bench_big VALUES (0, 'warm-up')");
    assert!(wait_for(Duration::from_secs(60), || b.query_i64("SELECT count(*) FROM bench_big") == 1));
    let serving = pid_of(a, TROMPE_SERVING);
    let applying = pid_of(b, TROMPE_APPLYING);
    measure(a, b, [serving, applying], rows)
}

fn native_run(rows: i64) -> Run {
    let cluster = Cluster::builder("bench-bigtxn-native")
        .nodes(2)
        .with_extension(false)
        .setting("wal_level", "logical")
        .setting("shared_buffers", "256MB")
        .start();
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
    measure(a, b, [serving, applying], rows)
}

fn main() {
    let mb = env_count("BENCH_MB", 1024) as i64;
    let rows = mb * 1024 * 1024 / ROW_BYTES;
    println!("bench/bigtxn: one transaction of {mb} MB ({rows} rows of {ROW_BYTES} bytes that do not compress)");
    println!("PostgreSQL {}", pg_major(&pg_bindir()));
    let native = native_run(rows);
    let trompe = trompe_run(rows);
    println!(
        "commit at the origin to visible at the peer (writing it took {:.1} s / {:.1} s):",
        native.write.as_secs_f64(),
        trompe.write.as_secs_f64()
    );
    println!("  native logical replication: {:8.1} s", native.visible.as_secs_f64());
    println!("  trompe:                     {:8.1} s", trompe.visible.as_secs_f64());
    println!("  ratio trompe/native time:   {:8.2}", trompe.visible.as_secs_f64() / native.visible.as_secs_f64());
    println!("peak private memory growth (MB), serving process at the origin / applying process:");
    println!("  native logical replication: {:8.0} / {:8.0}", native.origin_mb, native.apply_mb);
    println!("  trompe:                     {:8.0} / {:8.0}", trompe.origin_mb, trompe.apply_mb);
    println!(
        "  trompe applying memory per MB of transaction: {:.2} (native {:.2})",
        trompe.apply_mb / mb as f64,
        native.apply_mb / mb as f64
    );
}
