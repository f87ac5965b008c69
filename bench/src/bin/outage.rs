//! bench/outage: a peer back from a long outage. The applying side is paused (trompe:
//! pause_peer; native: subscription disabled) while the origin commits BENCH_TXNS (default
//! 10,000,000) transactions of one small row; then it is resumed and timed: to the first
//! change visible, and through the backlog in tenths (the catch-up rate of each tenth shows
//! whether it runs at a steady rate from start to end), with the peak memory growth of the
//! origin's serving process and of the applying process, and the WAL the applying node writes
//! per row. For trompe and, in the same run on
//! the same machine, for PostgreSQL's native logical replication.

use std::time::{Duration, Instant};

use trompe_bench::memory::{pid_of, Sampler, NATIVE_APPLYING, NATIVE_SERVING, TROMPE_APPLYING, TROMPE_SERVING};
use trompe_bench::{env_count, native_pair};
use trompe_tests::system::{pg_bindir, pg_major};
use trompe_tests::{Cluster, Node};

const TABLE: &str = "CREATE TABLE bench_rows (id bigint PRIMARY KEY, payload text NOT NULL)";
const FILL: &str = "CREATE PROCEDURE bench_fill(txns int) LANGUAGE plpgsql AS $$
    BEGIN
        FOR t IN 1 .. txns LOOP
            INSERT INTO bench_rows VALUES (t, md5(t::text));
            COMMIT;
        END LOOP;
    END $$";

/// What one run measured.
struct Run {
    /// From resuming to the first backlog row visible.
    first: Duration,
    /// When each tenth of the backlog was visible, from resuming.
    tenths: Vec<Duration>,
    /// Peak growth of private memory (MB): the origin's serving process, the applying process.
    origin_mb: f64,
    apply_mb: f64,
    /// WAL the applying node wrote during the catch-up, per backlog row (bytes).
    wal_per_row: f64,
}

impl Run {
    /// Rows per second through each tenth of the backlog.
    fn rates(&self, txns: i64) -> Vec<f64> {
        let mut from = self.first;
        self.tenths
            .iter()
            .map(|t| {
                let rate = (txns as f64 / 10.0) / (*t - from).as_secs_f64().max(1e-6);
                from = *t;
                rate
            })
            .collect()
    }

    /// Rows per second from the first row to the last.
    fn rate(&self, txns: i64) -> f64 {
        txns as f64 / (*self.tenths.last().unwrap_or(&self.first) - self.first).as_secs_f64().max(1e-6)
    }
}

/// Resumes replication with `resume` and times the catch-up of `peer`, sampling the processes
/// `pids` finds once it is resumed (the origin's serving process, the applying process).
fn catch_up(peer: &Node, txns: i64, resume: impl FnOnce(), pids: impl FnOnce() -> [i64; 2]) -> Run {
    let wal_lsn = || peer.query_text("SELECT pg_current_wal_lsn()::text").expect("the applying node's WAL position");
    let wal_from = wal_lsn();
    let mut c = peer.connect();
    let probe = c.prepare("SELECT 1 FROM bench_rows WHERE id = $1").unwrap();
    let mut seen = |id: i64| !c.query(&probe, &[&id]).expect("probe").is_empty();
    let started = Instant::now();
    resume();
    let sampler = Sampler::start(pids().to_vec());
    let deadline = started + Duration::from_secs(7200);
    let mut wait = |id: i64, pause: Duration| {
        while !seen(id) {
            assert!(Instant::now() < deadline, "row {id} never arrived on {}", peer.name);
            std::thread::sleep(pause);
        }
        started.elapsed()
    };
    let first = wait(1, Duration::from_millis(1));
    let tenths = (1..=10).map(|k| wait(txns * k / 10, Duration::from_millis(20))).collect();
    let peaks = sampler.finish();
    let wal = peer.query_i64(&format!("SELECT pg_wal_lsn_diff('{}', '{wal_from}')::bigint", wal_lsn()));
    Run { first, tenths, origin_mb: peaks[0], apply_mb: peaks[1], wal_per_row: wal as f64 / txns as f64 }
}

fn trompe_run(txns: i64) -> Run {
    let cluster = Cluster::builder("bench-outage-trompe").nodes(2).setting("shared_buffers", "256MB").start();
    cluster.exec_all(&format!("{TABLE}; SELECT trompe.add_table('bench_rows'); {FILL}"));
    let (a, b) = (cluster.node(0), cluster.node(1));
    // Directly, not through the harness's link proxy: the benchmark measures trompe alone.
    b.exec(&format!("SELECT trompe.add_peer('n1', '{}')", a.conninfo()));
    a.exec("INSERT INTO bench_rows VALUES (0, 'warm-up')");
    assert!(trompe_tests::wait_for(Duration::from_secs(60), || b.query_i64("SELECT count(*) FROM bench_rows") == 1));
    b.exec("SELECT trompe.pause_peer('n1')");
    a.exec(&format!("CALL bench_fill({txns})"));
    a.exec("CHECKPOINT");
    b.exec("CHECKPOINT");
    let run = catch_up(
        b,
        txns,
        || b.exec("SELECT trompe.resume_peer('n1')"),
        || [pid_of(a, TROMPE_SERVING), pid_of(b, TROMPE_APPLYING)],
    );
    assert_eq!(b.query_i64("SELECT count(*) FROM bench_rows"), txns + 1);
    run
}

fn native_run(txns: i64) -> Run {
    let cluster = native_pair("bench-outage-native");
    cluster.exec_all(TABLE);
    let (a, b) = (cluster.node(0), cluster.node(1));
    a.exec(FILL);
    a.exec("CREATE PUBLICATION bench FOR TABLE bench_rows");
    b.exec(&format!(
        "CREATE SUBSCRIPTION bench CONNECTION '{}' PUBLICATION bench WITH (copy_data = false)",
        a.conninfo()
    ));
    a.exec("INSERT INTO bench_rows VALUES (0, 'warm-up')");
    assert!(trompe_tests::wait_for(Duration::from_secs(60), || b.query_i64("SELECT count(*) FROM bench_rows") == 1));
    b.exec("ALTER SUBSCRIPTION bench DISABLE");
    assert!(trompe_tests::wait_for(Duration::from_secs(60), || {
        a.query_i64("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'bench'") == 0
    }));
    a.exec(&format!("CALL bench_fill({txns})"));
    a.exec("CHECKPOINT");
    b.exec("CHECKPOINT");
    let run = catch_up(
        b,
        txns,
        || b.exec("ALTER SUBSCRIPTION bench ENABLE"),
        || [pid_of(a, NATIVE_SERVING), pid_of(b, NATIVE_APPLYING)],
    );
    assert_eq!(b.query_i64("SELECT count(*) FROM bench_rows"), txns + 1);
    run
}

fn main() {
    let txns = env_count("BENCH_TXNS", 10_000_000) as i64;
    println!("bench/outage: a backlog of {txns} one-row transactions, replayed after an outage");
    println!("PostgreSQL {}", pg_major(&pg_bindir()));
    // BENCH_ONLY=trompe skips native logical replication (for profiling trompe alone; no ratio).
    let only_trompe = std::env::var("BENCH_ONLY").is_ok_and(|v| v == "trompe");
    let native = (!only_trompe).then(|| native_run(txns));
    let trompe = trompe_run(txns);
    let show = |what: &str, r: &Run| {
        let rates: Vec<String> = r.rates(txns).iter().map(|v| format!("{v:.0}")).collect();
        println!(
            "  {what:<27} first change {:7.3} s, catch-up {:8.0} rows/s, memory growth {:5.0} / {:5.0} MB, \
             WAL {:4.0} bytes/row",
            r.first.as_secs_f64(),
            r.rate(txns),
            r.origin_mb,
            r.apply_mb,
            r.wal_per_row
        );
        println!("  {:<27} rows/s by tenth: {}", "", rates.join(" "));
    };
    println!("(memory: the origin's serving process / the applying process; WAL: written by the applying node)");
    show("trompe:", &trompe);
    let Some(native) = native else { return };
    show("native logical replication:", &native);
    println!("  ratio trompe/native catch-up rate: {:.2}", trompe.rate(txns) / native.rate(txns));
    let steady = |r: &Run| {
        let rates = r.rates(txns);
        rates.last().copied().unwrap_or(0.0) / rates.first().copied().unwrap_or(1.0).max(1e-6)
    };
    println!("  last tenth's rate / first tenth's: native {:.2}, trompe {:.2}", steady(&native), steady(&trompe));
}
