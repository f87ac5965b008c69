//! bench/mesh: how trompe's cost grows with the number of nodes and of replicated tables.
//!
//! For each table count (`MESH_TABLES`, default `5,50`) and mesh size (`MESH_NODES`, default
//! `2,3,5`): that many nodes with small settings (32 MB of shared buffers each), every one
//! holding the same tables `t1..tN (id bigint PRIMARY KEY, v bigint)`, 1,000 rows per node
//! each. Every node runs one pgbench client that updates a random row of a random table in its
//! own key range, unthrottled, for `MESH_SECONDS` (default 20):
//! - **alone** first, the baseline: the tables not replicated yet, so the rate these nodes
//!   commit on this machine without trompe;
//! - then, the rows reset and the tables replicated, **in a full mesh**: every node applying
//!   every other node's changes while it commits its own, its lag sampled twice a second
//!   (`trompe.status`, `max(behind_seconds)`); then the time until every node has everything
//!   (`trompe.wait_sync`).
//!
//! The sustained rate is what the mesh committed divided by the time until every node had all
//! of it (the run plus the catch-up); its ratio to the rate alone is what replication costs.
//! If capturing a change costs a node the share `c` of committing it and applying one peer's
//! stream the share `a`, the ratio is `1 / (1 + c + (nodes - 1) * a)`: the benchmark prints
//! `a` (the cost of one more peer, the least-squares slope over the mesh sizes) for each table count,
//! and draws the ratio over the number of nodes, one line per table count, to
//! `target/bench/mesh.png`. Every configuration ends with the nodes compared table by table.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use trompe_bench::plot::{line_chart, Chart};
use trompe_bench::{env_secs, pgbench_figure, run_pgbench};
use trompe_tests::system::{pg_bindir, pg_major};
use trompe_tests::{checksum, Cluster, Node};

/// Rows each node owns in every table.
const ROWS_PER_NODE: i64 = 1_000;

/// A list of numbers from the environment (`2,3,5`), with a default.
fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    match std::env::var(name) {
        Ok(v) => v.split(',').filter_map(|s| s.trim().parse().ok()).filter(|n| *n > 0).collect(),
        Err(_) => default.to_vec(),
    }
}

/// Runs `script` against `node` with one client in simple query mode (the script names its
/// table through a variable, which only simple mode substitutes) for `duration`; returns the
/// number of transactions committed.
fn pgbench_count(node: &Node, duration: Duration, script: &Path) -> u64 {
    let (secs, script) = (duration.as_secs().to_string(), script.to_string_lossy());
    let out = run_pgbench(node, &["-M", "simple", "-c", "1", "-j", "1", "-T", &secs, "-f", &script]);
    pgbench_figure(&out, "number of transactions actually processed: ") as u64
}

/// Every node runs its script for `duration` at once; returns the transactions each committed
/// and, if `sample_lag`, the worst `behind_seconds` each node's `trompe.status` showed.
fn run_all(cluster: &Cluster, scripts: &[PathBuf], duration: Duration, sample_lag: bool) -> (Vec<u64>, Vec<f64>) {
    let n = cluster.nodes().len();
    let worst = Mutex::new(vec![0.0f64; n]);
    let stop = AtomicBool::new(false);
    let counts = std::thread::scope(|s| {
        if sample_lag {
            s.spawn(|| {
                let mut clients: Vec<postgres::Client> = cluster.nodes().iter().map(|n| n.connect()).collect();
                while !stop.load(Ordering::Relaxed) {
                    for (i, c) in clients.iter_mut().enumerate() {
                        let lag = c
                            .query_one("SELECT coalesce(max(behind_seconds), 0)::float8 FROM trompe.status", &[])
                            .map(|r| r.get::<_, f64>(0));
                        if let (Ok(lag), Ok(mut w)) = (lag, worst.lock()) {
                            w[i] = w[i].max(lag);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            });
        }
        let runners: Vec<_> = cluster
            .nodes()
            .iter()
            .zip(scripts)
            .map(|(node, script)| s.spawn(move || pgbench_count(node, duration, script)))
            .collect();
        let counts: Vec<u64> = runners.into_iter().map(|h| h.join().expect("pgbench thread")).collect();
        stop.store(true, Ordering::Relaxed);
        counts
    });
    (counts, worst.into_inner().unwrap_or_default())
}

/// What one configuration measured.
struct Measured {
    nodes: usize,
    tables: usize,
    alone_tps: f64,
    mesh_tps: f64,
    catch_up_s: f64,
    sustained_tps: f64,
    /// Transactions per second each node committed in the mesh, and its worst lag.
    per_node: Vec<(f64, f64)>,
    identical: bool,
}

impl Measured {
    /// The sustained rate in the mesh relative to the rate alone.
    fn ratio(&self) -> f64 {
        self.sustained_tps / self.alone_tps
    }

    /// The worst lag any node showed.
    fn lag_max_s(&self) -> f64 {
        self.per_node.iter().map(|n| n.1).fold(0.0, f64::max)
    }
}

/// The least-squares slope of `points`, if they span more than one x.
fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    let (mx, my) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// Measures `nodes` nodes with `tables` tables: alone, then in a full mesh.
fn measure(nodes: usize, tables: usize, seconds: Duration, dir: &Path) -> Measured {
    let cluster = Cluster::builder(&format!("bench-mesh-{nodes}x{tables}"))
        .nodes(nodes)
        .setting("shared_buffers", "32MB")
        .setting("fsync", "on")
        .start();
    let rows = nodes as i64 * ROWS_PER_NODE;
    let mut ddl = String::new();
    for t in 1..=tables {
        ddl += &format!(
            "CREATE TABLE t{t} (id bigint PRIMARY KEY, v bigint NOT NULL DEFAULT 0);
             INSERT INTO t{t} (id) SELECT g FROM generate_series(1, {rows}) g;"
        );
    }
    cluster.exec_all(&ddl);
    cluster.exec_all("VACUUM ANALYZE");
    let scripts: Vec<PathBuf> = (0..nodes as i64)
        .map(|i| {
            let path = dir.join(format!("mesh-{nodes}x{tables}-n{}.sql", i + 1));
            let (lo, hi) = (i * ROWS_PER_NODE + 1, (i + 1) * ROWS_PER_NODE);
            std::fs::write(
                &path,
                format!(
                    "\\set tab random(1, {tables})\n\\set id random({lo}, {hi})\n\
                     UPDATE t:tab SET v = v + 1 WHERE id = :id;\n"
                ),
            )
            .expect("script written");
            path
        })
        .collect();
    let secs = seconds.as_secs_f64();

    let (alone, _) = run_all(&cluster, &scripts, seconds, false);
    let alone_tps = alone.iter().sum::<u64>() as f64 / secs;

    // The same rows everywhere again, then replicated.
    let mut replicate = String::new();
    for t in 1..=tables {
        replicate += &format!("UPDATE t{t} SET v = 0 WHERE v <> 0; SELECT trompe.add_table('t{t}');");
    }
    cluster.exec_all(&replicate);
    cluster.exec_all("VACUUM ANALYZE");
    cluster.mesh();
    cluster.wait_sync(Duration::from_secs(900));
    let (meshed, lag) = run_all(&cluster, &scripts, seconds, true);
    let caught_up = Instant::now();
    cluster.wait_sync(Duration::from_secs(900));
    let catch_up_s = caught_up.elapsed().as_secs_f64();
    let committed = meshed.iter().sum::<u64>() as f64;
    let identical = (1..=tables).all(|t| {
        let sums: Vec<_> = cluster.nodes().iter().map(|n| n.query_text(&checksum(&format!("t{t}")))).collect();
        sums.iter().all(|s| s == &sums[0])
    });
    Measured {
        nodes,
        tables,
        alone_tps,
        mesh_tps: committed / secs,
        catch_up_s,
        sustained_tps: committed / (secs + catch_up_s),
        per_node: meshed.iter().zip(&lag).map(|(&c, &l)| (c as f64 / secs, l)).collect(),
        identical,
    }
}

fn main() {
    let node_counts = env_list("MESH_NODES", &[2, 3, 5]);
    let table_counts = env_list("MESH_TABLES", &[5, 50]);
    let seconds = env_secs("MESH_SECONDS", 20);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench can be created");
    println!(
        "bench/mesh: PostgreSQL {}, one client per node updating its own rows of a random table, {}s alone \
         (baseline) then {}s in a full mesh",
        pg_major(&pg_bindir()),
        seconds.as_secs(),
        seconds.as_secs()
    );
    println!(
        "{:>5} {:>6} | {:>10} | {:>10} {:>9} {:>9} | {:>13} {:>8} | identical",
        "nodes", "tables", "alone tps", "mesh tps", "lag max", "catch-up", "sustained tps", "/ alone"
    );
    let mut all = Vec::new();
    for &tables in &table_counts {
        for &nodes in &node_counts {
            let m = measure(nodes, tables, seconds, &dir);
            println!(
                "{:>5} {:>6} | {:>10.0} | {:>10.0} {:>8.1}s {:>8.1}s | {:>13.0} {:>8.2} | {}",
                m.nodes,
                m.tables,
                m.alone_tps,
                m.mesh_tps,
                m.lag_max_s(),
                m.catch_up_s,
                m.sustained_tps,
                m.ratio(),
                m.identical
            );
            let nodes: Vec<String> = m
                .per_node
                .iter()
                .enumerate()
                .map(|(i, (t, l))| format!("n{} {t:.0} tps, lag {l:.1}s", i + 1))
                .collect();
            println!("{:>14} per node: {}", "", nodes.join("; "));
            all.push(m);
        }
    }
    println!("(sustained: committed in the mesh / (run + catch-up); alone: the same nodes without trompe)");
    for &tables in &table_counts {
        // 1 / ratio = 1 + c + (nodes - 1) * a: the slope over the mesh sizes, least squares.
        let points: Vec<(f64, f64)> =
            all.iter().filter(|m| m.tables == tables).map(|m| (m.nodes as f64, 1.0 / m.ratio())).collect();
        if let Some(a) = slope(&points) {
            println!(
                "{tables} tables: one more peer costs each node {a:.2} of what committing the same changes itself \
                 costs (least squares over {} mesh sizes)",
                points.len()
            );
        }
    }
    let series: Vec<(String, Vec<(f64, f64)>)> = table_counts
        .iter()
        .map(|&t| {
            let points = all.iter().filter(|m| m.tables == t).map(|m| (m.nodes as f64, m.ratio())).collect();
            (format!("{t} tables"), points)
        })
        .collect();
    let png = dir.join("mesh.png");
    let chart = Chart {
        title: "trompe mesh: sustained rate / rate without replication",
        x_label: "nodes",
        y_label: "sustained / alone",
        series: &series,
    };
    match line_chart(&chart, &png) {
        Ok(()) => println!("sustained / alone over the number of nodes: {}", png.display()),
        Err(e) => println!("no plot ({e})"),
    }
    assert!(all.iter().all(|m| m.identical), "every configuration ended with identical nodes");
}
