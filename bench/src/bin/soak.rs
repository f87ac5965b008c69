//! bench/soak: sustained load on a three-node mesh. Every node runs pgbench-style transactions
//! (update one of its own accounts, insert a history row) while it applies the other two
//! nodes' changes. First a short unthrottled probe measures how fast the nodes can go; short
//! trials then find the highest share of that rate (90%, 75%, 60%, ...) at which lag stays
//! bounded (or `SOAK_LOAD` sets it), and the soak runs every node at it for `SOAK_SECONDS`
//! (default 180) and samples each node's replication lag twice a second (the age, on that node,
//! of the newest heartbeat each other node committed; heartbeats are stamped ten times a
//! second). Prints the throughput each node sustained, lag max and
//! p99 per node, whether lag stayed bounded (the last third of the run is no worse than the
//! first third, within a second), and draws lag over time to `target/bench/soak-lag.png`.
//!
//! On PostgreSQL 16 and later (the nodes run `TROMPE_PG_BIN`'s) the same work then runs on a
//! mesh of PostgreSQL's own logical replication, every node publishing the tables and
//! subscribing to the two others with `origin = none`: an unthrottled probe, and the soak at
//! the rates trompe held, with its lag measured the same way (`SOAK_NATIVE=0` skips it).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use trompe_bench::plot::{line_chart, Chart};
use trompe_bench::{env_secs, percentile, pgbench_script};
use trompe_tests::system::{pg_bindir, pg_major};
use trompe_tests::{checksum, wait_for, Cluster};

/// Accounts per node.
const ACCOUNTS: i64 = 100_000;

/// The replication lag (seconds) of `node` right now: how old the newest heartbeat of its
/// most stale peer is here. Every node stamps its own heartbeat row with the time a few times
/// a second, in its own commit order with its writes, so this is the end-to-end delay from a
/// commit there to its application here.
/// Also returns what `trompe.status` says (`max(behind_seconds)`), to check the monitoring.
/// (Native replication has no such view: 0.)
fn lag_of(c: &mut postgres::Client, me: i32, native: bool) -> Option<(f64, f64)> {
    let reported =
        if native { "0::float8" } else { "(SELECT coalesce(max(behind_seconds), 0)::float8 FROM trompe.status)" };
    let row = c
        .query_one(
            &format!(
                "SELECT coalesce(max(extract(epoch FROM clock_timestamp() - at)), 0)::float8, {reported}
                   FROM heartbeat WHERE node <> $1"
            ),
            &[&me],
        )
        .ok()?;
    Some((row.get(0), row.get(1)))
}

/// Waits until every node has applied everything the others committed: `trompe.wait_sync`,
/// or for native replication a fresh heartbeat of every node seen on every node (each origin's
/// changes are applied in its commit order).
fn sync(cluster: &Cluster, native: bool) {
    if !native {
        cluster.wait_sync(Duration::from_secs(600));
        return;
    }
    for (i, node) in cluster.nodes().iter().enumerate() {
        let sql = format!("UPDATE heartbeat SET at = clock_timestamp() WHERE node = {} RETURNING at::text", i + 1);
        let marker = node.query_text(&sql).unwrap_or_default();
        let seen = format!("SELECT at::text FROM heartbeat WHERE node = {}", i + 1);
        for other in cluster.nodes() {
            let ok = wait_for(Duration::from_secs(600), || other.query_text(&seen).as_deref() == Some(marker.as_str()));
            assert!(ok, "{} never saw {}'s heartbeat {marker}", other.name, node.name);
        }
    }
}

/// Runs every node's script at `rate` (None: as fast as it goes) for `duration`, sampling lag;
/// returns each node's TPS and lag series (seconds since start, lag).
fn run(
    cluster: &Cluster,
    native: bool,
    scripts: &[PathBuf],
    duration: Duration,
    rate: Option<&[f64]>,
) -> (Vec<f64>, Vec<Vec<(f64, f64)>>) {
    let n = cluster.nodes().len();
    // Fresh heartbeats everywhere before measuring.
    for (i, node) in cluster.nodes().iter().enumerate() {
        node.exec(&format!("UPDATE heartbeat SET at = clock_timestamp() WHERE node = {}", i + 1));
    }
    sync(cluster, native);
    let series = Mutex::new(vec![Vec::new(); n]);
    let status_max = Mutex::new(vec![0.0f64; n]);
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let tps = std::thread::scope(|s| {
        s.spawn(|| {
            let mut clients: Vec<postgres::Client> = cluster.nodes().iter().map(|n| n.connect()).collect();
            let mut next_sample = 0.0;
            while !stop.load(Ordering::Relaxed) {
                for (i, c) in clients.iter_mut().enumerate() {
                    let _ =
                        c.execute("UPDATE heartbeat SET at = clock_timestamp() WHERE node = $1", &[&(i as i32 + 1)]);
                }
                let t = start.elapsed().as_secs_f64();
                if t >= next_sample {
                    next_sample = t + 0.5;
                    for (i, c) in clients.iter_mut().enumerate() {
                        if let (Some((lag, reported)), Ok(mut all)) = (lag_of(c, i as i32 + 1, native), series.lock()) {
                            all[i].push((t, lag));
                            if let Ok(mut r) = status_max.lock() {
                                r[i] = r[i].max(reported);
                            }
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let runners: Vec<_> = cluster
            .nodes()
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let script = &scripts[i];
                let r = rate.map(|r| r[i]);
                s.spawn(move || pgbench_script(node, 2, duration, script, r))
            })
            .collect();
        let tps: Vec<f64> = runners.into_iter().map(|h| h.join().expect("pgbench thread")).collect();
        stop.store(true, Ordering::Relaxed);
        tps
    });
    let series = series.into_inner().unwrap_or_default();
    let status_max = status_max.into_inner().unwrap_or_default();
    let measured: Vec<String> =
        series.iter().map(|s| format!("{:.1}", s.iter().map(|p| p.1).fold(0.0, f64::max))).collect();
    let reported: Vec<String> = status_max.iter().map(|v| format!("{v:.1}")).collect();
    if native {
        println!("    (lag max per node, measured by heartbeat: {} s)", measured.join(" / "));
    } else {
        println!(
            "    (lag max per node, measured by heartbeat: {} s; reported by trompe.status: {} s)",
            measured.join(" / "),
            reported.join(" / ")
        );
    }
    (tps, series)
}

/// Whether lag stayed bounded over a run of `duration`: the worst of its last third is no
/// worse than the worst of its first third (at least 1 s) plus a second.
fn bounded(series: &[(f64, f64)], duration: Duration) -> bool {
    let third = duration.as_secs_f64() / 3.0;
    let first = series.iter().filter(|p| p.0 < third).map(|p| p.1).fold(0.0, f64::max);
    let last = series.iter().filter(|p| p.0 >= 2.0 * third).map(|p| p.1).fold(0.0, f64::max);
    last <= first.max(1.0) + 1.0
}

/// Three nodes with the soak's tables, replicating in a full mesh: trompe's, or PostgreSQL's
/// own (`origin = none` subscriptions to both other nodes; history keys kept apart by each
/// node's sequence increment, as trompe's sequence slots do).
fn start_mesh(native: bool) -> Cluster {
    let mut builder = Cluster::builder(if native { "bench-soak-native" } else { "bench-soak" })
        .nodes(3)
        .setting("fsync", "on")
        .setting("full_page_writes", "on");
    if native {
        builder = builder.with_extension(false).setting("wal_level", "logical");
    }
    let cluster = builder.start();
    cluster.exec_all(&format!(
        "CREATE TABLE accounts (aid bigint PRIMARY KEY, bal bigint NOT NULL DEFAULT 0);
         INSERT INTO accounts (aid) SELECT g FROM generate_series(1, {}) g;
         CREATE TABLE history (id bigserial PRIMARY KEY, aid bigint NOT NULL, delta int NOT NULL, at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE heartbeat (node int PRIMARY KEY, at timestamptz NOT NULL);
         INSERT INTO heartbeat SELECT g, now() FROM generate_series(1, 3) g;",
        3 * ACCOUNTS
    ));
    for (i, node) in cluster.nodes().iter().enumerate() {
        if native {
            node.exec(&format!("ALTER SEQUENCE history_id_seq INCREMENT BY 16 RESTART WITH {}", i + 1));
            node.exec("CREATE PUBLICATION soak FOR TABLE accounts, history, heartbeat");
        } else {
            node.exec(
                "SELECT trompe.add_table('accounts'); SELECT trompe.add_table('history');
                 SELECT trompe.add_table('heartbeat');",
            );
            node.exec(&format!("SELECT trompe.set_sequence_slot({}, 16)", i + 1));
        }
        node.exec("VACUUM ANALYZE");
    }
    if native {
        for (i, node) in cluster.nodes().iter().enumerate() {
            for (j, peer) in cluster.nodes().iter().enumerate().filter(|(j, _)| *j != i) {
                // Not inside a transaction block: each statement on its own connection call.
                node.exec(&format!(
                    "CREATE SUBSCRIPTION soak_{}_{} CONNECTION '{}' PUBLICATION soak WITH (copy_data = false, origin = none)",
                    i + 1,
                    j + 1,
                    peer.conninfo()
                ));
            }
        }
    } else {
        cluster.mesh();
    }
    cluster
}

fn main() {
    let soak = env_secs("SOAK_SECONDS", 180);
    let probe = env_secs("SOAK_PROBE_SECONDS", 30);
    let load: Option<f64> = std::env::var("SOAK_LOAD").ok().and_then(|v| v.parse().ok());
    let major = pg_major(&pg_bindir());
    let with_native = major >= 16 && std::env::var("SOAK_NATIVE").map_or(true, |v| v != "0");
    let cluster = start_mesh(false);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench can be created");
    let scripts: Vec<PathBuf> = (0..3)
        .map(|i| {
            let path = dir.join(format!("soak-n{}.sql", i + 1));
            let (lo, hi) = (i * ACCOUNTS + 1, (i + 1) * ACCOUNTS);
            std::fs::write(
                &path,
                format!(
                    "\\set aid random({lo}, {hi})\n\\set delta random(-5000, 5000)\nBEGIN;\n\
                     UPDATE accounts SET bal = bal + :delta WHERE aid = :aid;\n\
                     INSERT INTO history (aid, delta) VALUES (:aid, :delta);\nEND;\n"
                ),
            )
            .expect("script written");
            path
        })
        .collect();

    println!(
        "bench/soak: PostgreSQL {major}, 3 nodes, 2 clients each on its own accounts, every node applying the other two"
    );
    let (probe_tps, probe_lag) = run(&cluster, false, &scripts, probe, None);
    let probe_max = probe_lag.iter().flatten().map(|p| p.1).fold(0.0, f64::max);
    println!(
        "probe, unthrottled for {}s: {} tps; lag reached {probe_max:.1} s",
        probe.as_secs(),
        probe_tps.iter().map(|t| format!("{t:.0}")).collect::<Vec<_>>().join(" / ")
    );
    let synced = std::time::Instant::now();
    cluster.wait_sync(Duration::from_secs(600));
    println!("  (caught up {:.1} s after the probe)", synced.elapsed().as_secs_f64());

    // The highest share of the probe rate at which lag stays bounded: SOAK_LOAD, or the first
    // of a descending list that holds for a short trial.
    let load = match load {
        Some(l) => l,
        None => {
            let trial = env_secs("SOAK_TRIAL_SECONDS", 30);
            let mut chosen = 0.1;
            for candidate in [0.9, 0.75, 0.6, 0.45, 0.3, 0.2, 0.15, 0.1] {
                let rates: Vec<f64> = probe_tps.iter().map(|t| (t * candidate).max(1.0)).collect();
                let (_, lag) = run(&cluster, false, &scripts, trial, Some(&rates));
                let held = lag.iter().all(|s| bounded(s, trial));
                let worst = lag.iter().flatten().map(|p| p.1).fold(0.0, f64::max);
                println!(
                    "  trial at {:.0}% for {}s: lag max {worst:.1} s, {}",
                    candidate * 100.0,
                    trial.as_secs(),
                    if held { "bounded" } else { "growing" }
                );
                cluster.wait_sync(Duration::from_secs(600));
                if held {
                    chosen = candidate;
                    break;
                }
            }
            chosen
        }
    };
    let rates: Vec<f64> = probe_tps.iter().map(|t| (t * load).max(1.0)).collect();
    let (tps, lag) = run(&cluster, false, &scripts, soak, Some(&rates));
    cluster.wait_sync(Duration::from_secs(600));
    let same = ["accounts", "history"].iter().all(|t| {
        let sums: Vec<_> = cluster.nodes().iter().map(|n| n.query_text(&checksum(t))).collect();
        sums.iter().all(|s| s == &sums[0])
    });
    println!("soak at {:.0}% of the probe rate for {}s:", load * 100.0, soak.as_secs());
    let mut all_bounded = true;
    for (i, series) in lag.iter().enumerate() {
        let values: Vec<f64> = series.iter().map(|p| p.1).collect();
        let ok = bounded(series, soak);
        all_bounded &= ok;
        // Clients that cannot keep to their schedule (a saturated machine) commit less than the
        // target: the share of the probe rate actually held is what counts.
        println!(
            "  n{}: {:.0} tps sustained (target {:.0}; {:.2} of the probe rate); lag max {:.2} s, p99 {:.2} s, p50 {:.2} s{}",
            i + 1,
            tps[i],
            rates[i],
            tps[i] / probe_tps[i].max(1.0),
            values.iter().copied().fold(0.0, f64::max),
            percentile(&values, 99.0),
            percentile(&values, 50.0),
            if ok { "" } else { "  (growing)" }
        );
    }
    println!(
        "  total {:.0} tps committed on the mesh, {:.0} rows/s applied per node",
        tps.iter().sum::<f64>(),
        2.0 * 2.0 * tps.iter().sum::<f64>() / 3.0
    );
    let png = dir.join("soak-lag.png");
    let named: Vec<(String, Vec<(f64, f64)>)> =
        lag.into_iter().enumerate().map(|(i, s)| (format!("n{}", i + 1), s)).collect();
    let title = format!("trompe soak: 3 nodes at {:.0}% of the probe rate", load * 100.0);
    let chart = Chart { title: &title, x_label: "seconds", y_label: "lag (s)", series: &named };
    let plotted = match line_chart(&chart, &png) {
        Ok(()) => format!("plot: {}", png.display()),
        Err(e) => format!("no plot ({e})"),
    };
    println!(
        "lag {}; nodes identical afterwards: {same}; {plotted}",
        if all_bounded { "stayed bounded" } else { "kept growing" }
    );
    drop(cluster);
    if with_native {
        native_soak(&scripts, probe, soak, &probe_tps, &rates, all_bounded);
    }
}

/// The same work on a mesh of PostgreSQL's own bidirectional logical replication: an
/// unthrottled probe (trompe's probe rate relative to it), then the soak at the rates trompe
/// held, its lag measured by the same heartbeats.
fn native_soak(
    scripts: &[PathBuf],
    probe: Duration,
    soak: Duration,
    trompe_probe: &[f64],
    rates: &[f64],
    trompe_bounded: bool,
) {
    let cluster = start_mesh(true);
    println!("native bidirectional logical replication (origin = none), the same work:");
    let (probe_tps, probe_lag) = run(&cluster, true, scripts, probe, None);
    let probe_max = probe_lag.iter().flatten().map(|p| p.1).fold(0.0, f64::max);
    let (native_sum, trompe_sum) = (probe_tps.iter().sum::<f64>(), trompe_probe.iter().sum::<f64>());
    println!(
        "probe, unthrottled for {}s: {} tps; lag reached {probe_max:.1} s; trompe's probe rate / native: {:.2}",
        probe.as_secs(),
        probe_tps.iter().map(|t| format!("{t:.0}")).collect::<Vec<_>>().join(" / "),
        trompe_sum / native_sum
    );
    sync(&cluster, true);
    let (tps, lag) = run(&cluster, true, scripts, soak, Some(rates));
    sync(&cluster, true);
    let same = ["accounts", "history"].iter().all(|t| {
        let sums: Vec<_> = cluster.nodes().iter().map(|n| n.query_text(&checksum(t))).collect();
        sums.iter().all(|s| s == &sums[0])
    });
    println!("native soak at the rates trompe held, for {}s:", soak.as_secs());
    let mut all_bounded = true;
    for (i, series) in lag.iter().enumerate() {
        let values: Vec<f64> = series.iter().map(|p| p.1).collect();
        let ok = bounded(series, soak);
        all_bounded &= ok;
        println!(
            "  n{}: {:.0} tps sustained (target {:.0}); lag max {:.2} s, p99 {:.2} s, p50 {:.2} s{}",
            i + 1,
            tps[i],
            rates[i],
            values.iter().copied().fold(0.0, f64::max),
            percentile(&values, 99.0),
            percentile(&values, 50.0),
            if ok { "" } else { "  (growing)" }
        );
    }
    println!(
        "native lag {}, trompe's {}; nodes identical afterwards: {same}",
        if all_bounded { "stayed bounded" } else { "kept growing" },
        if trompe_bounded { "stayed bounded" } else { "kept growing" }
    );
}
