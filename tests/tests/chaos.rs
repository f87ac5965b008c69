//! Faults while every node takes writes: nodes are killed -9 and restarted or restarted cleanly,
//! links are cut both ways or one way, peers are paused and resumed, columns and tables are
//! added. Afterwards nothing a client saw committed is missing, nothing it saw deleted is back,
//! all nodes are identical, every link is up and every log is pruned.
//!
//! `TROMPE_CHAOS_SEEDS` (default 7), `TROMPE_CHAOS_SECS` (default 60) and `TROMPE_CHAOS_NODES`
//! (default 3) choose the run.

use std::collections::{BTreeMap, BTreeSet};
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
    /// Inserted and seen committed, with when (seconds into the run).
    committed: Vec<(i64, f64)>,
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
fn client(node: &Node, id_base: i64, mut rng: Rng, stop: &AtomicBool, start: Instant) -> Ledger {
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
                            ledger.committed.push((id, start.elapsed().as_secs_f64()));
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
const FAULTS: [&str; 8] = [
    "kill -9 and restart",
    "clean restart",
    "partition",
    "one-way cut",
    "pause peers",
    "add a column",
    "create a table",
    "rewrite the hot rows",
];

/// Statements that rewrite the table of hot rows (every node writes them concurrently) without
/// changing its schema or values: replicated, run inside a savepoint or not (a `USING`
/// expression other than the column itself makes `ALTER TABLE` rewrite), or local to one node.
const REWRITES: [&str; 4] = [
    "ALTER TABLE hot ALTER COLUMN note TYPE text USING note || ''",
    "BEGIN; SAVEPOINT s; ALTER TABLE hot ALTER COLUMN note TYPE text USING note || ''; RELEASE SAVEPOINT s; COMMIT",
    "VACUUM FULL hot",
    "CLUSTER hot USING hot_pkey",
];

/// Injects one random fault and undoes it (a partition or pause lasts a moment). DDL runs on
/// a random node while the others write (`ddl` numbers the new objects). Returns its kind and
/// which nodes it hit. A node killed with -9 must not give out again a transaction id that a
/// peer's position on it counts as seen (that peer would skip the transaction that gets it):
/// each such kill is added to `reissued`.
fn inject(cluster: &Cluster, rng: &mut Rng, ddl: &mut u32, reissued: &mut Vec<String>) -> (&'static str, String) {
    let n = cluster.nodes().len();
    let a = rng.below(n as u64) as usize;
    let b = (a + 1 + rng.below(n as u64 - 1) as usize) % n;
    let kind = FAULTS[rng.below(FAULTS.len() as u64) as usize];
    let hold = Duration::from_millis(500 + rng.below(1500));
    let mut detail = String::new();
    match kind {
        "kill -9 and restart" => {
            let node = cluster.node(a);
            let id = node.query_text("SELECT trompe.node_id()::text").unwrap_or_default();
            // What the peers took from the node before it is killed (as far as they stored it).
            let seen = seen_on(cluster, &id);
            let last = node.query_i64("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::int8");
            node.crash_and_restart();
            // The next transaction id right after recovery (before any session took one): in
            // the end-of-recovery checkpoint.
            let next = node.query_i64(
                "SELECT (split_part(next_xid, ':', 1)::int8 << 32) + split_part(next_xid, ':', 2)::int8
                   FROM pg_control_checkpoint()",
            );
            detail =
                format!(": next transaction id {last} before, {next} after recovery; peers' positions up to {seen}");
            if seen > next {
                reissued.push(format!(
                    "{} restarted at transaction id {next}, but a peer's position on it counts ids below {seen} as seen",
                    node.name
                ));
            }
        }
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
        "rewrite the hot rows" => {
            let rewrite = REWRITES[rng.below(REWRITES.len() as u64) as usize];
            cluster.node(a).exec(rewrite);
            detail = format!(": {rewrite}");
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
    let (na, nb) = (&cluster.node(a).name, &cluster.node(b).name);
    let whom = match kind {
        "partition" => format!("{na} | {nb}"),
        "one-way cut" => format!("{na} -> {nb}"),
        "add a column" | "create a table" => format!("on {na}, c{ddl}/t{ddl}"),
        _ => na.to_string(),
    };
    (kind, whom + &detail)
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
    // Each fault: when it started and ended (seconds into the run), its kind and whom it hit.
    let mut fault_log: Vec<(f64, f64, &str, String)> = Vec::new();
    let run_started_at = cluster.node(0).query_text("SELECT clock_timestamp()::text").unwrap_or_default();
    let mut reissued: Vec<String> = Vec::new();
    let run_start = Instant::now();
    let mut by_kind: BTreeMap<&str, u32> = BTreeMap::new();
    let mut last_fault_end = Instant::now();
    let max_lag_bits = AtomicU64::new(0);
    std::thread::scope(|s| {
        for (i, node) in cluster.nodes().iter().enumerate() {
            for k in 0..2 {
                let (rng, stop, ledgers) = (rng.fork(), stop.clone(), ledgers.clone());
                let id_base = ((i * 10 + k) as i64 + 1) * ID_BLOCK;
                s.spawn(move || {
                    let ledger = client(node, id_base, rng, &stop, run_start);
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
            let began = run_start.elapsed().as_secs_f64();
            let (kind, whom) = inject(&cluster, &mut rng, &mut ddl, &mut reissued);
            fault_log.push((began, run_start.elapsed().as_secs_f64(), kind, whom));
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

    let mut committed_at: BTreeMap<i64, f64> = ledgers.iter().flat_map(|l| l.committed.iter().copied()).collect();
    let deleted: BTreeSet<i64> = ledgers.iter().flat_map(|l| l.deleted.iter().copied()).collect();
    let unknown: BTreeSet<i64> = ledgers.iter().flat_map(|l| l.unknown.iter().copied()).collect();
    let ops: u64 = ledgers.iter().map(|l| l.ops).sum();
    // A delete of unknown outcome may have removed its row.
    committed_at.retain(|id, _| !deleted.contains(id) && !unknown.contains(id));
    let committed: Vec<i64> = committed_at.keys().copied().collect();
    let deleted: Vec<i64> = deleted.into_iter().collect();
    let unknown = unknown.len();
    // Per node: the committed inserts it misses, the committed deletes it has back.
    let mut missing: Vec<Vec<i64>> = Vec::new();
    let mut returned: Vec<Vec<i64>> = Vec::new();
    for node in cluster.nodes() {
        let mut c = node.connect();
        let mut ids = |sql: &str, ids: &[i64]| -> Vec<i64> {
            c.query(sql, &[&ids])
                .map(|rows| rows.iter().map(|r| r.get(0)).collect())
                .unwrap_or_else(|e| panic!("{}: {}", node.name, trompe_tests::describe_error(&e)))
        };
        missing.push(ids("SELECT id FROM unnest($1::int8[]) id WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.id = id.id) ORDER BY id", &committed));
        returned.push(ids("SELECT id FROM events WHERE id = ANY($1) ORDER BY id", &deleted));
    }
    let lost = missing.iter().map(|m| m.len() as i64).sum::<i64>();
    let back = returned.iter().map(|m| m.len() as i64).sum::<i64>();
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
    let divergent_tables: Vec<&String> =
        tables.iter().zip(&sums).filter(|(_, s)| s.iter().any(|x| x != &s[0])).map(|(t, _)| t).collect();
    let divergent = divergent_tables.len();
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
    println!("chaos seed {seed}: faults (seconds into the run)");
    for (began, ended, kind, whom) in &fault_log {
        println!("  {began:7.2} - {ended:7.2}  {kind} ({whom})");
    }
    for line in &reissued {
        println!("chaos seed {seed}: {line}");
    }
    if lost + back > 0 || divergent > 0 {
        let rows = Diagnosis { cluster: &cluster, started_at: &run_started_at, committed_at: &committed_at };
        rows.report(&missing, &returned, &divergent_tables);
    }
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
    assert!(reissued.is_empty(), "seed {seed}: transaction ids given out again after a crash: {reissued:?}");
    assert_eq!(back, 0, "seed {seed}: committed deletes undone");
    assert_eq!(divergent, 0, "seed {seed}: nodes differ in {divergent_tables:?}: {sums:?}");
}

/// The highest transaction id (exclusive) that any node's position on node `id` counts as
/// seen or in its step (0 where a node cannot be asked).
fn seen_on(cluster: &Cluster, id: &str) -> i64 {
    let sql = format!(
        "SELECT coalesce(max(greatest(pg_snapshot_xmax(done::pg_snapshot), pg_snapshot_xmax(cur::pg_snapshot)))::text::int8, 0)
           FROM trompe.progress WHERE node_id = '{id}'"
    );
    cluster
        .nodes()
        .iter()
        .filter_map(|n| {
            let mut c = postgres::Client::connect(&n.conninfo(), postgres::NoTls).ok()?;
            c.query_one(&sql, &[]).ok().map(|r| r.get::<_, i64>(0))
        })
        .max()
        .unwrap_or(0)
}

/// The ids of each client are `ID_BLOCK * (node * 10 + client + 1)` upwards.
const ID_BLOCK: i64 = 1_000_000_000;

/// What the test prints when something is missing, back or different: for each such row
/// which node committed it and when (against the faults printed before), its transaction there, where it is
/// and is not, and whether each node's position on its origin counts that transaction as
/// applied; then every node's `trompe.status` and positions.
struct Diagnosis<'a> {
    cluster: &'a Cluster,
    /// When the run started, on the first node's clock (to read server logs against).
    started_at: &'a str,
    committed_at: &'a BTreeMap<i64, f64>,
}

impl Diagnosis<'_> {
    /// How many rows are described in detail at most.
    const ROWS: usize = 20;

    /// The first value `sql` returns on `node`; what went wrong instead of panicking, so that
    /// the diagnosis never hides the failure it explains.
    fn text(node: &Node, sql: &str) -> Option<String> {
        let result = postgres::Client::connect(&node.conninfo(), postgres::NoTls).and_then(|mut c| c.simple_query(sql));
        match result {
            Ok(rows) => rows.into_iter().find_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_string)),
                _ => None,
            })?,
            Err(e) => Some(format!("({})", trompe_tests::describe_error(&e))),
        }
    }

    fn report(&self, missing: &[Vec<i64>], returned: &[Vec<i64>], divergent: &[&String]) {
        let nodes = self.cluster.nodes();
        println!("===== diagnosis (the run started at {} on n1's clock)", self.started_at);
        for (node, ids) in nodes.iter().zip(missing) {
            if !ids.is_empty() {
                println!("===== {} misses {} committed inserts: {ids:?}", node.name, ids.len());
            }
        }
        for (node, ids) in nodes.iter().zip(returned) {
            if !ids.is_empty() {
                println!("===== {} has {} deleted rows back: {ids:?}", node.name, ids.len());
            }
        }
        println!("===== divergent tables: {divergent:?}");
        let mut ids: Vec<i64> = missing.iter().chain(returned).flatten().copied().collect();
        ids.sort_unstable();
        ids.dedup();
        for &id in ids.iter().take(Self::ROWS) {
            self.describe_row(id);
        }
        for node in nodes {
            println!(
                "===== {}: trompe.status
{}
----- trompe.progress
{}
----- trompe.consumers
{}
----- log rows: {:?}",
                node.name,
                Self::text(node, "SELECT string_agg(s::text, E'\\n') FROM trompe.status s").unwrap_or_default(),
                Self::text(
                    node,
                    "SELECT string_agg(format('%s (%s): done %s cur %s after %s', coalesce(p.name, pr.node_id::text),
                                              pr.node_id, pr.done, pr.cur, pr.after), E'\\n')
                       FROM trompe.progress pr LEFT JOIN trompe.peers p ON p.node_id = pr.node_id"
                )
                .unwrap_or_default(),
                Self::text(node, "SELECT string_agg(c::text, E'\\n') FROM trompe.consumers c").unwrap_or_default(),
                Self::text(node, "SELECT count(*)::text FROM trompe.log"),
            );
        }
    }

    /// Prints where row `id` is and where its origin's transaction stands on every node.
    fn describe_row(&self, id: i64) {
        let nodes = self.cluster.nodes();
        let origin = ((id / ID_BLOCK - 1) / 10) as usize;
        let when = self.committed_at.get(&id).map_or("deleted".to_string(), |t| format!("committed at {t:.2} s"));
        let Some(origin_node) = nodes.get(origin) else {
            println!("----- id {id}: no node {origin}");
            return;
        };
        let origin_id = Self::text(origin_node, "SELECT trompe.node_id()::text").unwrap_or_default();
        println!("----- id {id}: inserted on {} ({when})", origin_node.name);
        let mut xid = None;
        for node in nodes {
            let row = Self::text(node, &format!(
                "SELECT format('xmin %s committed %s from %s: %s', e.xmin, c.timestamp, coalesce(o.roname, 'local'), e::text)
                   FROM events e, pg_xact_commit_timestamp_origin(e.xmin) c
                   LEFT JOIN pg_replication_origin o ON o.roident = c.roident
                  WHERE e.id = {id}"
            ));
            if node.name == origin_node.name {
                xid = Self::text(node, &format!("SELECT xmin::text FROM events WHERE id = {id}"));
            }
            println!("    {}: {}", node.name, row.as_deref().unwrap_or("absent"));
        }
        let in_log = Self::text(
            origin_node,
            &format!(
                "SELECT string_agg(format('log id %s txid %s %s', id, txid, op), '; ')
               FROM trompe.log_changes() WHERE rel = 'events' AND vals[1] = '{id}'"
            ),
        );
        println!("    in {}'s log: {}", origin_node.name, in_log.as_deref().unwrap_or("no"));
        let Some(xid) = xid else { return };
        for node in nodes.iter().filter(|n| n.name != origin_node.name) {
            let seen = Self::text(
                node,
                &format!(
                    "SELECT format('position done %s (counts txid {xid} as applied: %s), cur %s, after %s',
                               done, pg_visible_in_snapshot('{xid}'::xid8, done::pg_snapshot), cur, after)
                   FROM trompe.progress WHERE node_id = '{origin_id}'"
                ),
            );
            println!("    {} on {}: {}", node.name, origin_node.name, seen.as_deref().unwrap_or("no position"));
        }
    }
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
