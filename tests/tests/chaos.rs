//! Faults while every node takes writes: nodes are killed -9 and restarted or restarted cleanly,
//! links are cut both ways or one way, peers are paused and resumed, columns and tables are
//! added. Afterwards nothing a client saw committed is missing, nothing it saw deleted is back,
//! all nodes are identical, every link is up and every log is pruned.
//!
//! `TROMPE_CHAOS_SEEDS` (default 7), `TROMPE_CHAOS_SECS` (default 60) and `TROMPE_CHAOS_NODES`
//! (default 3) choose the run.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use trompe_tests::{checksum, Cluster, Node, Rng};

const SYNC: Duration = Duration::from_secs(180);
/// Rows every node updates concurrently (conflicts during the faults).
const HOT_ROWS: i64 = 5;

/// What the clients know for sure about the rows they wrote.
#[derive(Default)]
struct Ledger {
    /// Inserted and seen committed.
    committed: Vec<i64>,
    /// Deleted and seen committed.
    deleted: Vec<i64>,
    /// Outcome unknown (the connection broke during the statement): not checked.
    unknown: Vec<i64>,
    /// Statements seen committed.
    ops: u64,
}

/// True for errors that leave a statement's outcome unknown or mean the node is going away:
/// the connection broke, or the server is shutting down, starting up or recovering.
fn node_went_away(e: &postgres::Error) -> bool {
    match e.as_db_error() {
        None => true,
        Some(db) => {
            let code = db.code().code();
            code.starts_with("57") || code.starts_with("08")
        }
    }
}

/// One client: inserts rows with ids only it uses, updates and deletes some of them, and
/// updates the shared hot rows, until `stop`. Reconnects whenever its node goes away.
fn client(node: &Node, id_base: i64, mut rng: Rng, stop: &AtomicBool) -> Ledger {
    let mut ledger = Ledger::default();
    let mut next = 0i64;
    let mut live: Vec<i64> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut c) = postgres::Client::connect(&node.conninfo(), postgres::NoTls) else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            let choice = rng.below(100);
            let (result, id) = if choice < 60 || live.is_empty() {
                next += 1;
                let id = id_base + next;
                (c.execute("INSERT INTO events (id, v) VALUES ($1, 0)", &[&id]), Some((id, false)))
            } else if choice < 75 {
                let id = live[rng.below(live.len() as u64) as usize];
                (c.execute("UPDATE events SET v = v + 1 WHERE id = $1", &[&id]), None)
            } else if choice < 85 {
                let i = rng.below(live.len() as u64) as usize;
                let id = live.swap_remove(i);
                (c.execute("DELETE FROM events WHERE id = $1", &[&id]), Some((id, true)))
            } else {
                let hot = rng.between(1, HOT_ROWS);
                let note = format!("{id_base}:{next}");
                (c.execute("UPDATE hot SET note = $2 WHERE id = $1", &[&hot, &note]), None)
            };
            match result {
                Ok(_) => {
                    ledger.ops += 1;
                    match id {
                        Some((id, false)) => {
                            ledger.committed.push(id);
                            live.push(id);
                        }
                        Some((id, true)) => ledger.deleted.push(id),
                        None => {}
                    }
                }
                Err(e) if node_went_away(&e) => {
                    if let Some((id, _)) = id {
                        ledger.unknown.push(id);
                    }
                    break;
                }
                Err(e) => panic!("client {id_base} on {}: {}", node.name, trompe_tests::describe_error(&e)),
            }
            if rng.chance(10) {
                std::thread::sleep(Duration::from_millis(rng.below(20)));
            }
        }
    }
    ledger
}

/// The kinds of fault, as counted in the summary.
const FAULTS: [&str; 7] = [
    "kill -9 and restart",
    "clean restart",
    "partition",
    "one-way cut",
    "pause peers",
    "add a column",
    "create a table",
];

/// Injects one random fault and undoes it (a partition or pause lasts a moment). DDL runs on
/// a random node while the others write (`ddl` numbers the new objects).
fn inject(cluster: &Cluster, rng: &mut Rng, ddl: &mut u32) -> &'static str {
    let n = cluster.nodes().len();
    let a = rng.below(n as u64) as usize;
    let b = (a + 1 + rng.below(n as u64 - 1) as usize) % n;
    let kind = FAULTS[rng.below(FAULTS.len() as u64) as usize];
    let hold = Duration::from_millis(500 + rng.below(1500));
    match kind {
        "kill -9 and restart" => cluster.node(a).crash_and_restart(),
        "clean restart" => cluster.node(a).restart(),
        "partition" => {
            cluster.partition(a, b);
            std::thread::sleep(hold);
            cluster.heal_pair(a, b);
        }
        "one-way cut" => {
            cluster.cut(a, b);
            std::thread::sleep(hold);
            cluster.link(a, b).heal();
        }
        "add a column" => {
            *ddl += 1;
            cluster.node(a).exec(&format!("ALTER TABLE events ADD COLUMN c{ddl} int NOT NULL DEFAULT {ddl}"));
        }
        "create a table" => {
            *ddl += 1;
            cluster.node(a).exec(&format!(
                "CREATE TABLE app.t{ddl} (id int PRIMARY KEY, note text); INSERT INTO app.t{ddl} SELECT g, 'n{a}' FROM generate_series(1, 10) g"
            ));
        }
        _ => {
            let node = cluster.node(a);
            node.exec("SELECT trompe.pause_peer(name) FROM trompe.peers");
            std::thread::sleep(hold);
            node.exec("SELECT trompe.resume_peer(name) FROM trompe.peers");
        }
    }
    kind
}

fn chaos(seed: u64, duration: Duration, nodes: usize) {
    println!("chaos: seed {seed}, {nodes} nodes (rerun with TROMPE_CHAOS_SEEDS={seed} TROMPE_CHAOS_NODES={nodes})");
    // Quick log rotation, so the test can see the logs pruned once everyone has caught up.
    let cluster =
        Cluster::builder(&format!("chaos-{seed}")).nodes(nodes).setting("trompe.log_rotation_interval", "'1s'").start();
    cluster.exec_all(&format!(
        "CREATE TABLE events (id bigint PRIMARY KEY, v int NOT NULL);
         CREATE TABLE hot (id bigint PRIMARY KEY, note text);
         INSERT INTO hot SELECT g, 'initial' FROM generate_series(1, {HOT_ROWS}) g;
         SELECT trompe.add_table('events'); SELECT trompe.add_table('hot');
         CREATE SCHEMA app; SELECT trompe.add_schema('app');"
    ));
    cluster.mesh();
    let mut rng = Rng::new(seed);
    let stop = Arc::new(AtomicBool::new(false));
    let ledgers = Arc::new(Mutex::new(Vec::new()));
    let faults = AtomicU64::new(0);
    let mut by_kind: BTreeMap<&str, u32> = BTreeMap::new();
    let mut last_fault_end = Instant::now();
    let max_lag_bits = AtomicU64::new(0);
    std::thread::scope(|s| {
        for (i, node) in cluster.nodes().iter().enumerate() {
            for k in 0..2 {
                let (rng, stop, ledgers) = (rng.fork(), stop.clone(), ledgers.clone());
                let id_base = ((i * 10 + k) as i64 + 1) * 1_000_000_000;
                s.spawn(move || {
                    let ledger = client(node, id_base, rng, &stop);
                    ledgers.lock().map(|mut l| l.push(ledger)).ok();
                });
            }
        }
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let seen = lag(&cluster);
                if seen > f64::from_bits(max_lag_bits.load(Ordering::Relaxed)) {
                    max_lag_bits.store(seen.to_bits(), Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let start = Instant::now();
        let mut ddl = 0;
        while start.elapsed() < duration {
            std::thread::sleep(Duration::from_millis(300 + rng.below(1200)));
            let kind = inject(&cluster, &mut rng, &mut ddl);
            *by_kind.entry(kind).or_default() += 1;
            faults.fetch_add(1, Ordering::Relaxed);
            last_fault_end = Instant::now();
        }
        stop.store(true, Ordering::Relaxed);
    });
    cluster.wait_sync(SYNC);
    let converge = last_fault_end.elapsed();
    let max_lag = f64::from_bits(max_lag_bits.load(Ordering::Relaxed));
    let ledgers: Vec<Ledger> = std::mem::take(&mut *ledgers.lock().expect("no client panicked holding the lock"));

    let mut committed: Vec<i64> = ledgers.iter().flat_map(|l| l.committed.iter().copied()).collect();
    let deleted: Vec<i64> = ledgers.iter().flat_map(|l| l.deleted.iter().copied()).collect();
    let unknown: Vec<i64> = ledgers.iter().flat_map(|l| l.unknown.iter().copied()).collect();
    let ops: u64 = ledgers.iter().map(|l| l.ops).sum();
    // A delete of unknown outcome may have removed its row.
    committed.retain(|id| !deleted.contains(id) && !unknown.contains(id));
    let unknown = unknown.len();
    let mut lost = 0i64;
    let mut back = 0i64;
    for node in cluster.nodes() {
        let mut c = node.connect();
        let present: i64 = c
            .query_one("SELECT count(*) FROM events WHERE id = ANY($1)", &[&committed])
            .map(|r| r.get(0))
            .unwrap_or_else(|e| panic!("{}: {}", node.name, trompe_tests::describe_error(&e)));
        lost += committed.len() as i64 - present;
        back += c
            .query_one("SELECT count(*) FROM events WHERE id = ANY($1)", &[&deleted])
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or_else(|e| panic!("{}: {}", node.name, trompe_tests::describe_error(&e)));
    }
    let mut tables = vec!["events".to_string(), "hot".to_string()];
    tables.extend(
        cluster
            .node(0)
            .query_text("SELECT string_agg(format('app.%I', tablename), ',') FROM pg_tables WHERE schemaname = 'app'")
            .unwrap_or_default()
            .split(',')
            .filter(|t| !t.is_empty())
            .map(str::to_string),
    );
    let sums: Vec<Vec<Option<String>>> =
        tables.iter().map(|t| cluster.nodes().iter().map(|n| n.query_text(&checksum(t))).collect()).collect();
    let divergent = sums.iter().filter(|s| s.iter().any(|x| x != &s[0])).count();
    let conflicts: i64 = cluster.nodes().iter().map(|n| n.query_i64("SELECT count(*) FROM trompe.conflicts")).sum();
    let kinds: Vec<String> = by_kind.iter().map(|(k, n)| format!("{k}: {n}")).collect();
    println!(
        "chaos seed {seed}: {ops} operations committed ({} inserts kept, {} deletes, {unknown} of unknown outcome), \
         {} faults ({}), {conflicts} conflicts resolved, {} tables compared, maximum lag seen {max_lag:.1} s, \
         converged {:.1} s after the last fault; lost: {lost}, deleted but back: {back}, divergent: {divergent}",
        committed.len(),
        deleted.len(),
        faults.load(Ordering::Relaxed),
        kinds.join(", "),
        tables.len(),
        converge.as_secs_f64()
    );
    // No worker is stuck: every link is connected again without an error, and every log is
    // pruned to nothing.
    for node in cluster.nodes() {
        node.wait_for_value(
            "SELECT count(*) FILTER (WHERE state <> 'connected' OR last_error IS NOT NULL) || '/' || count(*)
               FROM trompe.status",
            &format!("0/{}", nodes - 1),
            Duration::from_secs(60),
        );
        node.wait_for_value("SELECT count(*) FROM trompe.log", "0", Duration::from_secs(60));
    }
    assert!(ops > 500, "seed {seed}: too little work to prove anything ({ops})");
    assert_eq!(lost, 0, "seed {seed}: committed inserts missing");
    assert_eq!(back, 0, "seed {seed}: committed deletes undone");
    assert_eq!(divergent, 0, "seed {seed}: nodes differ: {sums:?}");
}

/// The largest replication lag (seconds) of any reachable node right now.
fn lag(cluster: &Cluster) -> f64 {
    cluster
        .nodes()
        .iter()
        .filter_map(|n| {
            let mut c = postgres::Client::connect(&n.conninfo(), postgres::NoTls).ok()?;
            let row = c.query_one("SELECT coalesce(max(behind_seconds), 0)::float8 FROM trompe.status", &[]).ok()?;
            Some(row.get::<_, f64>(0))
        })
        .fold(0.0, f64::max)
}

/// The seeds to run: `TROMPE_CHAOS_SEEDS` (comma-separated) or one for CI.
fn seeds() -> Vec<u64> {
    match std::env::var("TROMPE_CHAOS_SEEDS") {
        Ok(list) => list.split(',').filter_map(|s| s.trim().parse().ok()).collect(),
        Err(_) => vec![7],
    }
}

#[test]
fn nothing_is_lost_and_nodes_converge_under_faults() {
    let secs = std::env::var("TROMPE_CHAOS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let nodes = std::env::var("TROMPE_CHAOS_NODES").ok().and_then(|s| s.parse().ok()).unwrap_or(3).max(2);
    for seed in seeds() {
        chaos(seed, Duration::from_secs(secs), nodes);
    }
}
