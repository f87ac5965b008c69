//! bench/apply: how fast a node catches up on a backlog, and how long a commit takes to become
//! visible on an idle peer, for trompe and, in the same run on the same machine, for
//! PostgreSQL's native logical replication.
//!
//! Backlog: the applying side is paused (trompe: pause_peer; native: subscription disabled)
//! while the origin commits BENCH_TXNS transactions of 10 rows; then it is resumed and timed
//! until every row is there. Latency: BENCH_COMMITS single-row commits on an idle pair, each
//! timed from the commit's return at the origin to the row being visible at the peer, once
//! autovacuum has finished with the backlog on both nodes. Update backlog: the same, with the
//! origin then updating every row of the backlog again (BENCH_TXNS transactions of 10
//! single-row UPDATEs by primary key) while the applying side is paused.
//!
//! On PostgreSQL 16 and later (the nodes run `TROMPE_PG_BIN`'s) it also measures native
//! *bidirectional* logical replication, the closest native counterpart of a trompe mesh: each
//! node publishes the table and subscribes to the other with `origin = none` (so neither sends
//! the other's changes back), the same backlog and latency measured on the same pair.

use std::time::{Duration, Instant};

use postgres::{Client, NoTls};
use trompe_bench::{env_count, median, native_pair, percentile};
use trompe_tests::system::{pg_bindir, pg_major};
use trompe_tests::{wait_for, Cluster, Node};

const TABLE: &str = "CREATE TABLE bench_rows (id bigint PRIMARY KEY, txn int NOT NULL, payload text NOT NULL, at timestamptz NOT NULL DEFAULT now())";
const FILL: &str = "CREATE PROCEDURE bench_fill(txns int) LANGUAGE plpgsql AS $$
    BEGIN
        FOR t IN 0 .. txns - 1 LOOP
            INSERT INTO bench_rows (id, txn, payload)
                SELECT t * 10 + g, t, md5((t * 10 + g)::text) FROM generate_series(0, 9) g;
            COMMIT;
        END LOOP;
    END $$";

/// Updates every row of the backlog again: `txns` transactions of 10 single-row UPDATEs.
const TOUCH: &str = "CREATE PROCEDURE bench_touch(txns int) LANGUAGE plpgsql AS $$
    BEGIN
        FOR t IN 0 .. txns - 1 LOOP
            FOR g IN 0 .. 9 LOOP
                UPDATE bench_rows SET payload = 'u' || payload WHERE id = t * 10 + g;
            END LOOP;
            COMMIT;
        END LOOP;
    END $$";

/// Times the catch-up of `node` on a backlog of `txns` transactions: from the first backlog
/// row becoming visible to the last (transactions are applied in order, so the last row
/// means all of them). Probing is by primary key, so it costs the node next to nothing.
/// Returns (time to the first row, time from the first to the last row).
fn time_catch_up(node: &Node, txns: i64, started: Instant) -> (Duration, Duration) {
    time_until(node, "SELECT 1 FROM bench_rows WHERE id = $1", txns, started)
}

/// [`time_catch_up`] for the update backlog: rows are probed for their updated payload.
fn time_update_catch_up(node: &Node, txns: i64, started: Instant) -> (Duration, Duration) {
    time_until(node, "SELECT 1 FROM bench_rows WHERE id = $1 AND payload LIKE 'u%'", txns, started)
}

fn time_until(node: &Node, probe: &str, txns: i64, started: Instant) -> (Duration, Duration) {
    let mut c = node.connect();
    let probe = c.prepare(probe).unwrap();
    let mut seen = |id: i64| !c.query(&probe, &[&id]).expect("probe").is_empty();
    let ok = wait_for(Duration::from_secs(900), || seen(0));
    assert!(ok, "node {} did not start applying", node.name);
    let first = started.elapsed();
    let ok = wait_for(Duration::from_secs(900), || seen(txns * 10 - 1));
    assert!(ok, "node {} did not catch up", node.name);
    (first, started.elapsed() - first)
}

/// Records, on the applying node, when each row arrives (a trigger that fires for replicated
/// changes too), so latency is measured without polling.
const ARRIVALS: &str = "CREATE TABLE arrivals (id bigint PRIMARY KEY, at timestamptz NOT NULL);
    CREATE FUNCTION note_arrival() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO public.arrivals VALUES (NEW.id, clock_timestamp());
        RETURN NULL;
    END $$;
    CREATE TRIGGER arrive AFTER INSERT ON bench_rows FOR EACH ROW EXECUTE FUNCTION note_arrival();
    ALTER TABLE bench_rows ENABLE ALWAYS TRIGGER arrive";

/// Waits (up to a minute) until neither node runs autovacuum: right after a backlog of a
/// million rows, vacuuming it competes for the CPU and the latency measured would be its.
fn settle(nodes: &[&Node]) {
    wait_for(Duration::from_secs(60), || {
        nodes
            .iter()
            .all(|n| n.query_i64("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'") == 0)
    });
}

/// Commit-to-visible latency: single-row commits on `origin`, 5 ms apart; each one's latency
/// is its arrival time at `peer` minus its commit time at `origin` (one machine, one clock).
fn latencies(origin: &Node, peer: &Node, commits: usize, first_id: i64) -> Vec<f64> {
    let mut o = Client::connect(&origin.conninfo(), NoTls).expect("connect origin");
    let insert = o.prepare("INSERT INTO bench_rows (id, txn, payload) VALUES ($1, 0, 'x')").unwrap();
    for i in 0..commits as i64 {
        o.execute(&insert, &[&(first_id + i)]).expect("insert");
        std::thread::sleep(Duration::from_millis(5));
    }
    let last = first_id + commits as i64 - 1;
    assert!(
        wait_for(Duration::from_secs(60), || peer
            .query_i64(&format!("SELECT count(*) FROM arrivals WHERE id = {last}"))
            == 1),
        "the last row never arrived"
    );
    let committed: std::collections::HashMap<i64, f64> = o
        .query(
            "SELECT id, extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8 FROM bench_rows WHERE id >= $1",
            &[&first_id],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut p = Client::connect(&peer.conninfo(), NoTls).expect("connect peer");
    p.query("SELECT id, extract(epoch FROM at)::float8 FROM arrivals WHERE id >= $1", &[&first_id])
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, f64>(1) - committed[&r.get::<_, i64>(0)]) * 1000.0)
        .collect()
}

/// The catch-up times of the insert backlog, of the update backlog, and the latencies.
type Run = ((Duration, Duration), (Duration, Duration), Vec<f64>);

fn trompe_run(txns: i64, commits: usize) -> Run {
    let cluster = Cluster::builder("bench-apply-trompe").nodes(2).setting("shared_buffers", "256MB").start();
    cluster.exec_all(&format!("{TABLE}; SELECT trompe.add_table('bench_rows'); {FILL}; {TOUCH}"));
    let (a, b) = (cluster.node(0), cluster.node(1));
    // Directly, not through the harness's link proxy: the benchmark measures trompe alone.
    b.exec(&format!("SELECT trompe.add_peer('n1', '{}')", a.conninfo()));
    b.exec("SELECT trompe.pause_peer('n1')");
    a.exec(&format!("CALL bench_fill({txns})"));
    a.exec("CHECKPOINT");
    b.exec("CHECKPOINT");
    let started = Instant::now();
    b.exec("SELECT trompe.resume_peer('n1')");
    let took = time_catch_up(b, txns, started);
    assert_eq!(b.query_text("SELECT trompe.wait_sync('60 seconds')").as_deref(), Some("t"));
    assert_eq!(b.query_i64("SELECT count(*) FROM bench_rows"), txns * 10);
    b.exec("SELECT trompe.pause_peer('n1')");
    a.exec(&format!("CALL bench_touch({txns})"));
    a.exec("CHECKPOINT");
    b.exec("CHECKPOINT");
    let started = Instant::now();
    b.exec("SELECT trompe.resume_peer('n1')");
    let updates = time_update_catch_up(b, txns, started);
    assert_eq!(b.query_text("SELECT trompe.wait_sync('60 seconds')").as_deref(), Some("t"));
    settle(&[a, b]);
    if let Ok(secs) = std::env::var("BENCH_DEBUG_PAUSE") {
        eprintln!("PAUSE a={} b={}", a.conninfo(), b.conninfo());
        std::thread::sleep(Duration::from_secs(secs.parse().unwrap()));
    }
    b.exec(ARRIVALS);
    let lat = latencies(a, b, commits, 1_000_000_000);
    (took, updates, lat)
}

/// Native logical replication from node 1 to node 2; with `bidirectional`, node 1 also
/// subscribes to node 2, both subscriptions with `origin = none` (PostgreSQL 16 and later).
fn native_run(txns: i64, commits: usize, bidirectional: bool) -> Run {
    let cluster = native_pair(if bidirectional { "bench-apply-native-bidi" } else { "bench-apply-native" });
    cluster.exec_all(TABLE);
    let (a, b) = (cluster.node(0), cluster.node(1));
    a.exec(FILL);
    a.exec(TOUCH);
    a.exec("CREATE PUBLICATION bench FOR TABLE bench_rows");
    let origin = if bidirectional { ", origin = none" } else { "" };
    if bidirectional {
        b.exec("CREATE PUBLICATION bench_back FOR TABLE bench_rows");
        a.exec(&format!(
            "CREATE SUBSCRIPTION bench_back CONNECTION '{}' PUBLICATION bench_back WITH (copy_data = false{origin})",
            b.conninfo()
        ));
    }
    let mut sub = b.connect();
    sub.batch_execute(&format!(
        "CREATE SUBSCRIPTION bench CONNECTION '{}' PUBLICATION bench WITH (copy_data = false{origin})",
        a.conninfo()
    ))
    .expect("create subscription");
    // Make sure the subscription is streaming before the backlog is built.
    a.exec("INSERT INTO bench_rows VALUES (-1, -1, 'warm-up')");
    assert!(wait_for(Duration::from_secs(60), || b.query_i64("SELECT count(*) FROM bench_rows") == 1));
    let disable = |sub: &mut Client| {
        sub.batch_execute("ALTER SUBSCRIPTION bench DISABLE").unwrap();
        // The walsender serving b's subscription (named after it) has gone.
        assert!(wait_for(Duration::from_secs(60), || {
            a.query_i64("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'bench'") == 0
        }));
    };
    disable(&mut sub);
    a.exec(&format!("CALL bench_fill({txns})"));
    a.exec("CHECKPOINT");
    b.exec("CHECKPOINT");
    let started = Instant::now();
    sub.batch_execute("ALTER SUBSCRIPTION bench ENABLE").unwrap();
    let took = time_catch_up(b, txns, started);
    assert_eq!(b.query_i64("SELECT count(*) FROM bench_rows"), txns * 10 + 1);
    if bidirectional {
        // Nothing came back: a has exactly its own rows.
        assert!(wait_for(Duration::from_secs(60), || a.query_i64("SELECT count(*) FROM bench_rows") == txns * 10 + 1));
    }
    disable(&mut sub);
    a.exec(&format!("CALL bench_touch({txns})"));
    a.exec("CHECKPOINT");
    b.exec("CHECKPOINT");
    let started = Instant::now();
    sub.batch_execute("ALTER SUBSCRIPTION bench ENABLE").unwrap();
    let updates = time_update_catch_up(b, txns, started);
    settle(&[a, b]);
    b.exec(ARRIVALS);
    let lat = latencies(a, b, commits, 1_000_000_000);
    (took, updates, lat)
}

fn main() {
    let txns = env_count("BENCH_TXNS", 100_000) as i64;
    let commits = env_count("BENCH_COMMITS", 300);
    let rows = (txns * 10) as f64;
    println!("bench/apply: backlog of {txns} transactions x 10 rows; {commits} single-row commits for latency");
    let major = pg_major(&pg_bindir());
    println!("PostgreSQL {major}");
    let (native_t, native_u, native_lat) = native_run(txns, commits, false);
    let bidi = (major >= 16).then(|| native_run(txns, commits, true));
    let (trompe_t, trompe_u, trompe_lat) = trompe_run(txns, commits);
    let native_rate = rows / native_t.1.as_secs_f64();
    let trompe_rate = rows / trompe_t.1.as_secs_f64();
    println!("backlog catch-up (first row to last row; start-up delay after resume in brackets):");
    println!(
        "  native logical replication: {:7.2} s  {:9.0} rows/s  [{:.2} s]",
        native_t.1.as_secs_f64(),
        native_rate,
        native_t.0.as_secs_f64()
    );
    if let Some((bidi_t, _, _)) = &bidi {
        println!(
            "  native bidirectional:       {:7.2} s  {:9.0} rows/s  [{:.2} s]",
            bidi_t.1.as_secs_f64(),
            rows / bidi_t.1.as_secs_f64(),
            bidi_t.0.as_secs_f64()
        );
    }
    println!(
        "  trompe:                     {:7.2} s  {:9.0} rows/s  [{:.2} s]",
        trompe_t.1.as_secs_f64(),
        trompe_rate,
        trompe_t.0.as_secs_f64()
    );
    println!("  ratio trompe/native: {:.2}", trompe_rate / native_rate);
    if let Some((bidi_t, _, _)) = &bidi {
        println!("  ratio trompe/native bidirectional: {:.2}", trompe_rate / (rows / bidi_t.1.as_secs_f64()));
    }
    println!("update backlog catch-up (the same rows updated again, 10 single-row UPDATEs per transaction):");
    let updates = |label: &str, t: &(Duration, Duration)| {
        println!(
            "  {label:<27} {:7.2} s  {:9.0} rows/s  [{:.2} s]",
            t.1.as_secs_f64(),
            rows / t.1.as_secs_f64(),
            t.0.as_secs_f64()
        )
    };
    updates("native logical replication:", &native_u);
    if let Some((_, bidi_u, _)) = &bidi {
        updates("native bidirectional:", bidi_u);
    }
    updates("trompe:", &trompe_u);
    println!("  ratio trompe/native: {:.2}", native_u.1.as_secs_f64() / trompe_u.1.as_secs_f64());
    println!("commit-to-visible latency on an idle pair (ms):");
    println!(
        "  native logical replication: p50 {:6.2}  p99 {:6.2}",
        median(&native_lat),
        percentile(&native_lat, 99.0)
    );
    if let Some((_, _, bidi_lat)) = &bidi {
        println!("  native bidirectional:       p50 {:6.2}  p99 {:6.2}", median(bidi_lat), percentile(bidi_lat, 99.0));
    }
    println!(
        "  trompe:                     p50 {:6.2}  p99 {:6.2}",
        median(&trompe_lat),
        percentile(&trompe_lat, 99.0)
    );
}
