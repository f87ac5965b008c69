//! Randomized DDL racing randomized DML on three nodes whose clocks disagree (one 3 s ahead, one
//! 3 s behind, within `trompe.max_clock_skew`), under each conflict rule, with links paused and
//! resumed and a node killed: every run must end with the same schema and the same rows on every
//! node and no stream in error.
//!
//! DDL runs on a random node at a time, each statement reaching every node before the next (DDL
//! against DDL is not this test's subject); row changes run all the time, on every node, and
//! meet the DDL in flight. CI runs one short seed; a longer run:
//!
//! ```sh
//! TROMPE_SEEDS=11,12,13 TROMPE_FUZZ_DDL=100 cargo test -p trompe-tests --test ddl_fuzz -- --nocapture
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use trompe_tests::{checksum, dump_versions, Cluster, Node, Rng};

const SYNC: Duration = Duration::from_secs(180);

/// What DDL has made of the fuzzed table so far: the added columns that exist, and a counter
/// for new names.
#[derive(Default)]
struct Schema {
    columns: Vec<String>,
    indexes: Vec<String>,
    tables: Vec<String>,
    next: u32,
    text_type: bool,
}

/// One random DDL statement (and the schema it leaves), for table `f.d`.
fn random_ddl(rng: &mut Rng, s: &mut Schema) -> String {
    s.next += 1;
    let n = s.next;
    loop {
        match rng.below(12) {
            0 | 1 => {
                s.columns.push(format!("c{n}"));
                return format!("ALTER TABLE f.d ADD COLUMN c{n} int DEFAULT {n}");
            }
            2 if !s.columns.is_empty() => {
                let c = s.columns.remove(rng.below(s.columns.len() as u64) as usize);
                return format!("ALTER TABLE f.d DROP COLUMN {c}");
            }
            3 if !s.columns.is_empty() => {
                let i = rng.below(s.columns.len() as u64) as usize;
                let old = std::mem::replace(&mut s.columns[i], format!("r{n}"));
                return format!("ALTER TABLE f.d RENAME COLUMN {old} TO r{n}");
            }
            4 => {
                s.text_type = !s.text_type;
                return format!(
                    "ALTER TABLE f.d ALTER COLUMN v TYPE {}",
                    if s.text_type { "text" } else { "varchar(200)" }
                );
            }
            5 => return "VACUUM (FULL, FREEZE) f.d".to_string(),
            6 => return "CLUSTER f.d USING d_pkey".to_string(),
            7 => {
                s.indexes.push(format!("ix{n}"));
                return format!("CREATE INDEX CONCURRENTLY ix{n} ON f.d (v)");
            }
            8 if !s.indexes.is_empty() => {
                let ix = s.indexes.remove(rng.below(s.indexes.len() as u64) as usize);
                return format!("DROP INDEX CONCURRENTLY f.{ix}");
            }
            9 => {
                s.tables.push(format!("t{n}"));
                return format!("CREATE TABLE f.t{n} (id int PRIMARY KEY, v text)");
            }
            10 if !s.tables.is_empty() => {
                let t = s.tables.remove(rng.below(s.tables.len() as u64) as usize);
                return format!("DROP TABLE f.{t}");
            }
            11 => return "VACUUM FREEZE f.d".to_string(),
            _ => {}
        }
    }
}

/// One random row change, naming columns and tables DDL may have changed meanwhile.
fn random_dml(rng: &mut Rng, tag: &str, s: &Schema) -> String {
    let id = rng.between(1, 30);
    let col = s.columns.get(rng.below(s.columns.len().max(1) as u64) as usize).cloned();
    let table = s.tables.get(rng.below(s.tables.len().max(1) as u64) as usize).cloned();
    match rng.below(100) {
        0..=29 => {
            format!("INSERT INTO f.d (id, v) VALUES ({id}, '{tag}') ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v")
        }
        30..=49 => format!("UPDATE f.d SET v = '{tag}', n = n + 1 WHERE id = {id}"),
        50..=64 => match col {
            Some(c) => format!("UPDATE f.d SET {c} = {} WHERE id = {id}", rng.between(-99, 99)),
            None => format!("UPDATE f.d SET n = n + 1 WHERE id = {id}"),
        },
        65..=79 => format!("DELETE FROM f.d WHERE id = {id}"),
        80..=94 => match table {
            Some(t) => {
                format!("INSERT INTO f.{t} VALUES ({id}, '{tag}') ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v")
            }
            None => format!("INSERT INTO f.d (id, v) VALUES ({id}, '{tag}') ON CONFLICT DO NOTHING"),
        },
        _ => match table {
            Some(t) => format!("DELETE FROM f.{t} WHERE id = {id}"),
            None => format!("DELETE FROM f.d WHERE id = {id}"),
        },
    }
}

/// Errors a client expects while DDL runs: constraints, lock waits and deadlocks, names DDL
/// removed or renamed, a node restarting.
fn expected(e: &postgres::Error) -> bool {
    match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            code.starts_with("23") || code.starts_with("40") || ["42703", "42P01", "57P01", "55P03"].contains(&code)
        }
        None => true,
    }
}

fn client(node: &Node, mut rng: Rng, tag: String, schema: &Mutex<Schema>, hold: &AtomicBool, stop: &AtomicBool) -> u64 {
    let mut committed = 0;
    let mut conn: Option<postgres::Client> = None;
    while !stop.load(Ordering::Relaxed) {
        if hold.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let sql = {
            let s = schema.lock().expect("schema");
            format!("BEGIN; {}; {}; COMMIT", random_dml(&mut rng, &tag, &s), random_dml(&mut rng, &tag, &s))
        };
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match postgres::Client::connect(&node.conninfo(), postgres::NoTls) {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            },
        };
        match c.batch_execute(&sql) {
            Ok(()) => committed += 1,
            Err(e) if expected(&e) => {
                if c.batch_execute("ROLLBACK").is_err() {
                    conn = None;
                }
            }
            Err(e) => panic!("client {tag} on {}: {sql}\nfailed: {}", node.name, trompe_tests::describe_error(&e)),
        }
        std::thread::sleep(Duration::from_millis(rng.below(15)));
    }
    committed
}

/// Every peer link of the cluster pulls again.
fn resume_all(cluster: &Cluster) {
    for node in cluster.nodes() {
        for peer in cluster.nodes().iter().filter(|p| p.name != node.name) {
            node.exec(&format!("SELECT trompe.resume_peer('{}')", peer.name));
        }
    }
}

const RULES: [&str; 3] = ["last_update_wins", "first_update_wins", "node_priority"];

fn fuzz(seed: u64, ddl_statements: usize) {
    let rule = RULES[(seed % 3) as usize];
    println!("DDL fuzz: seed {seed}, rule {rule} (rerun with TROMPE_SEEDS={seed})");
    let cluster =
        Cluster::builder(&format!("ddl-fuzz-{seed}")).nodes(3).clock_offset(1, "+3s").clock_offset(2, "-3s").start();
    cluster.exec_all("CREATE SCHEMA f; SELECT trompe.add_schema('f')");
    cluster.mesh();
    cluster.node(0).exec("CREATE TABLE f.d (id int PRIMARY KEY, v varchar(200), n int NOT NULL DEFAULT 0)");
    cluster.wait_sync(SYNC);
    let ids: Vec<String> =
        cluster.nodes().iter().map(|n| n.query_text("SELECT trompe.node_id()::text").unwrap_or_default()).collect();
    for node in cluster.nodes() {
        node.exec(&format!("SELECT trompe.set_conflict_rule('f.d', '{rule}')"));
        for (i, id) in ids.iter().enumerate() {
            node.exec(&format!("SELECT trompe.set_node_priority('{id}', {i})"));
        }
    }
    let mut rng = Rng::new(seed);
    let schema = Arc::new(Mutex::new(Schema::default()));
    let stop = Arc::new(AtomicBool::new(false));
    // Clients hold still while every node catches up between two DDL statements (under the
    // windowed rules a skewed node's writes wait up to a window plus the skew at commit, and
    // the worker waits for their locks: a mesh written without pause catches up only slowly).
    let hold = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let mut statements = 0;
    /// Stops the clients however the driver ends (a failed assertion too).
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    std::thread::scope(|s| {
        let _stop = StopOnDrop(stop.clone());
        for (i, node) in cluster.nodes().iter().enumerate() {
            let (rng, stop, committed, schema) = (rng.fork(), stop.clone(), committed.clone(), schema.clone());
            let hold = hold.clone();
            s.spawn(move || {
                let n = client(node, rng, format!("n{}", i + 1), &schema, &hold, &stop);
                committed.fetch_add(n, Ordering::Relaxed);
            });
        }
        let start = Instant::now();
        while statements < ddl_statements {
            // The last DDL has reached every node; a random link stops for a while, and the
            // next DDL meets the changes piling up behind it.
            hold.store(true, Ordering::Relaxed);
            resume_all(&cluster);
            cluster.wait_sync(SYNC);
            hold.store(false, Ordering::Relaxed);
            let (from, to) = (rng.below(3) as usize, rng.below(3) as usize);
            if from != to {
                cluster.node(from).exec(&format!("SELECT trompe.pause_peer('{}')", cluster.node(to).name));
            }
            std::thread::sleep(Duration::from_millis(50 + rng.below(250)));
            let node = cluster.node(rng.below(3) as usize);
            let ddl = random_ddl(&mut rng, &mut schema.lock().expect("schema"));
            println!("seed {seed}: {} {ddl}", node.name);
            node.exec(&ddl);
            statements += 1;
            std::thread::sleep(Duration::from_millis(50 + rng.below(250)));
            if statements == ddl_statements / 2 {
                let victim = cluster.node(rng.below(3) as usize);
                println!("seed {seed}: killing {}", victim.name);
                victim.crash_and_restart();
            }
        }
        stop.store(true, Ordering::Relaxed);
        println!("seed {seed}: {statements} DDL statements in {:?}", start.elapsed());
    });
    resume_all(&cluster);
    cluster.wait_sync(SYNC);
    let committed = committed.load(Ordering::Relaxed);
    println!("seed {seed}: {committed} transactions committed");
    assert!(committed > 50, "seed {seed}: too little work to prove anything ({committed} transactions)");
    let columns = "SELECT string_agg(c.relname || '.' || a.attname || ':' || format_type(a.atttypid, a.atttypmod), ' '
                          ORDER BY c.relname, a.attname)
                     FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
                    WHERE c.relnamespace = 'f'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped";
    cluster.assert_same(columns);
    cluster.assert_same("SELECT string_agg(indexname || ':' || indexdef, ' ' ORDER BY indexname) FROM pg_indexes WHERE schemaname = 'f'");
    let tables: Vec<String> = cluster
        .node(0)
        .query_text("SELECT string_agg(relname, ',' ORDER BY relname) FROM pg_class WHERE relnamespace = 'f'::regnamespace AND relkind = 'r'")
        .unwrap_or_default()
        .split(',')
        .map(str::to_string)
        .collect();
    for t in tables {
        let table = format!("f.{t}");
        let sums: Vec<Option<String>> = cluster.nodes().iter().map(|n| n.query_text(&checksum(&table))).collect();
        if sums.iter().any(|s| s != &sums[0]) {
            dump_versions(&cluster, &table);
        }
        cluster.assert_same(&checksum(&table));
    }
    for node in cluster.nodes() {
        assert_eq!(
            node.query_text(
                "SELECT string_agg(name || ': ' || last_error, '; ') FROM trompe.status WHERE state = 'error'"
            ),
            None,
            "seed {seed}: a stream of {} is stopped",
            node.name
        );
    }
}

fn seeds() -> Vec<u64> {
    match std::env::var("TROMPE_SEEDS") {
        Ok(list) => list.split(',').filter_map(|s| s.trim().parse().ok()).collect(),
        Err(_) => vec![1],
    }
}

#[test]
fn random_ddl_against_random_dml_under_clock_skew_converges() {
    let statements = std::env::var("TROMPE_FUZZ_DDL").ok().and_then(|s| s.parse().ok()).unwrap_or(16);
    for seed in seeds() {
        fuzz(seed, statements);
    }
}
