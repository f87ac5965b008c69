//! Nodes of different PostgreSQL major versions in one mesh: a 15 and an 18 node (and a 16
//! one where that version is installed too) replicate, resolve conflicts alike and replicate
//! DDL that both accept; a node joins (`add_peer(..., sync => true)`) from a node of another
//! major version in either direction, its schema dumped by a `pg_dump` that can read the
//! source (the newer one).
//!
//! Each node runs its own installation (`TROMPE_PG15_BIN`, `TROMPE_PG18_BIN`,
//! `TROMPE_PG16_BIN`, each with trompe installed); `scripts/test` sets them. Every test's name
//! starts with `mixed_versions` (the single-version runs skip them).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use trompe_tests::system::{bindir_for_major, pg_major};
use trompe_tests::{checksum, Cluster, Node, Rng};

const SYNC: Duration = Duration::from_secs(300);

/// The bin directories of PostgreSQL 15 and 18, or why the test cannot run.
fn bindirs_15_and_18() -> (PathBuf, PathBuf) {
    let pg15 = bindir_for_major(15);
    let pg18 = bindir_for_major(18);
    match (pg15, pg18) {
        (Some(a), Some(b)) => (a, b),
        (a, b) => panic!(
            "the mixed-version tests need PostgreSQL 15 and 18 with trompe installed: set TROMPE_PG15_BIN and \
             TROMPE_PG18_BIN to their bin directories (scripts/test does); found 15: {a:?}, 18: {b:?}"
        ),
    }
}

/// Asserts each node runs the major version its index in `majors` says.
fn assert_versions(cluster: &Cluster, majors: &[u32]) {
    for (node, major) in cluster.nodes().iter().zip(majors) {
        let running = node.query_i64("SELECT current_setting('server_version_num')::int / 10000");
        assert_eq!(running, i64::from(*major), "node {} runs PostgreSQL {running}", node.name);
    }
}

/// The schema every test replicates: a table with an enum column, a secondary index and a
/// unique column; a replicated schema whose later tables replicate by themselves.
const SCHEMA: &str = "CREATE TYPE mood AS ENUM ('calm', 'busy');
     CREATE TABLE acct (id int PRIMARY KEY, balance int NOT NULL, note text, m mood DEFAULT 'calm',
                        code text UNIQUE);
     CREATE INDEX acct_balance ON acct (balance);
     SELECT trompe.add_table('acct');
     CREATE SCHEMA app;
     SELECT trompe.add_schema('app');";

/// Random writes on one node until `stop`: updates of shared rows (so nodes conflict), inserts
/// of keys of this writer's own, deletes; returns how many statements committed.
fn writer(node: &Node, seed: u64, base: i64, stop: &AtomicBool) -> u64 {
    let mut client = node.connect();
    let mut rng = Rng::new(seed);
    let mut next_id = base;
    let mut done = 0;
    while !stop.load(Ordering::Relaxed) {
        let sql = match rng.below(10) {
            0..=5 => format!(
                "UPDATE acct SET balance = balance + {} WHERE id = {}",
                rng.between(-50, 50),
                rng.between(1, 2000)
            ),
            6..=8 => {
                next_id += 1;
                format!("INSERT INTO acct VALUES ({next_id}, {}, 'from {base}')", rng.below(1000))
            }
            _ => format!("DELETE FROM acct WHERE id = {}", rng.between(1, 2000)),
        };
        if client.batch_execute(&sql).is_ok() {
            done += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    done
}

/// Sets a flag when dropped, also while unwinding.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A 15 and an 18 node (and a 16 one if installed) in a full mesh: writes everywhere, every
/// kind of two-node conflict between the 15 and the 18 node, DDL from each.
#[test]
fn mixed_versions_mesh_replicates_resolves_conflicts_and_replicates_ddl() {
    let (pg15, pg18) = bindirs_15_and_18();
    let third = bindir_for_major(16).unwrap_or_else(|| pg18.clone());
    let majors = [15, 18, pg_major(&third)];
    println!("mesh of PostgreSQL {majors:?}");
    let cluster =
        Cluster::builder("mixed-mesh").nodes(3).node_bindir(0, pg15).node_bindir(1, pg18).node_bindir(2, third).start();
    assert_versions(&cluster, &majors);
    let (n15, n18, n3) = (cluster.node(0), cluster.node(1), cluster.node(2));
    cluster.exec_all(SCHEMA);
    cluster.mesh();

    // Writes on every node.
    n15.exec("INSERT INTO acct (id, balance, note) SELECT g, g, 'on 15' FROM generate_series(1, 1000) g");
    n18.exec("INSERT INTO acct (id, balance, note) SELECT g, g, 'on 18' FROM generate_series(1001, 2000) g");
    n3.exec("UPDATE acct SET m = 'busy', note = note || ', touched' WHERE id % 10 = 0");
    cluster.wait_sync(SYNC);
    assert_eq!(cluster.assert_same("SELECT count(*) FROM acct").as_deref(), Some("2000"));
    cluster.assert_same(&checksum("acct"));

    // Conflicts between the 15 and the 18 node, each side's writes while they cannot see each
    // other; the 18 node writes second, so its versions are the newer ones.
    cluster.partition(0, 1);
    for peer in ["n1", "n2"] {
        n3.exec(&format!("SELECT trompe.pause_peer('{peer}')"));
    }
    n15.exec(
        "UPDATE acct SET note = 'update on 15' WHERE id = 1;
         DELETE FROM acct WHERE id = 2;
         INSERT INTO acct (id, balance, note) VALUES (5000, 1, 'insert on 15');
         UPDATE acct SET note = 'update on 15' WHERE id = 3;
         UPDATE acct SET code = 'unique-1' WHERE id = 10;",
    );
    std::thread::sleep(Duration::from_millis(20));
    n18.exec(
        "UPDATE acct SET note = 'update on 18' WHERE id = 1;
         UPDATE acct SET note = 'update on 18' WHERE id = 2;
         INSERT INTO acct (id, balance, note) VALUES (5000, 2, 'insert on 18');
         DELETE FROM acct WHERE id = 3;
         UPDATE acct SET code = 'unique-1' WHERE id = 20;",
    );
    cluster.heal_pair(0, 1);
    for peer in ["n1", "n2"] {
        n3.exec(&format!("SELECT trompe.resume_peer('{peer}')"));
    }
    cluster.wait_sync(SYNC);
    cluster.wait_sync(SYNC);
    cluster.assert_same(&checksum("acct"));
    let expect = |sql: &str, want: &str| assert_eq!(cluster.assert_same(sql).as_deref(), Some(want), "{sql}");
    expect("SELECT note FROM acct WHERE id = 1", "update on 18");
    expect("SELECT note FROM acct WHERE id = 2", "update on 18");
    expect("SELECT note FROM acct WHERE id = 5000", "insert on 18");
    expect("SELECT count(*) FROM acct WHERE id = 3", "0");
    expect("SELECT string_agg(id::text, ',') FROM acct WHERE code = 'unique-1'", "20");
    for node in [n15, n18] {
        let kinds = node
            .query_text("SELECT string_agg(DISTINCT kind, ',' ORDER BY kind) FROM trompe.conflicts")
            .unwrap_or_default();
        for kind in ["insert_exists", "update_deleted", "update_update"] {
            assert!(kinds.contains(kind), "node {} recorded conflicts {kinds}, not {kind}", node.name);
        }
    }

    // DDL from the 18 node and from the 15 node, each needed by the other's later rows.
    n18.exec("ALTER TABLE acct ADD COLUMN tag text DEFAULT 'none'");
    n18.exec("CREATE TABLE app.events (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(), body jsonb)");
    n18.exec("INSERT INTO app.events VALUES (1, '2026-01-01 00:00:00+00', '{\"from\": 18}')");
    cluster.wait_sync(SYNC);
    n15.exec("UPDATE acct SET tag = 'set on 15' WHERE id <= 100");
    n15.exec("CREATE INDEX events_body ON app.events USING gin (body)");
    n15.exec("ALTER TABLE app.events ADD COLUMN origin int");
    n15.exec("INSERT INTO app.events VALUES (2, '2026-01-02 00:00:00+00', '{\"from\": 15}', 15)");
    n3.exec("INSERT INTO app.events VALUES (3, '2026-01-03 00:00:00+00', '{\"from\": \"third\"}', 3)");
    n18.exec("TRUNCATE acct");
    n18.exec("INSERT INTO acct (id, balance, note, tag) VALUES (1, 1, 'after truncate', 'on 18')");
    cluster.wait_sync(SYNC);
    cluster.wait_sync(SYNC);
    expect("SELECT count(*) FROM acct", "1");
    expect("SELECT count(*) FROM app.events", "3");
    expect("SELECT count(*) FROM pg_indexes WHERE indexname = 'events_body'", "1");
    cluster.assert_same(&checksum("acct"));
    cluster.assert_same(&checksum("app.events"));
    for node in cluster.nodes() {
        let errors =
            node.query_text("SELECT string_agg(last_error, '; ') FROM trompe.status WHERE last_error IS NOT NULL");
        assert_eq!(errors, None, "node {} shows errors in trompe.status", node.name);
    }
}

/// Nodes 0 and 1 (of versions `source` and `other`) run a mesh under write load while node 2
/// (of version `joiner`) joins through node 0; then every node is identical.
fn join_across_versions(name: &str, source: PathBuf, other: PathBuf, joiner: PathBuf, pg_dump_path: Option<PathBuf>) {
    let majors = [pg_major(&source), pg_major(&other), pg_major(&joiner)];
    println!("node 3 (PostgreSQL {}) joins from node 1 (PostgreSQL {})", majors[2], majors[0]);
    let cluster =
        Cluster::builder(name).nodes(3).node_bindir(0, source).node_bindir(1, other).node_bindir(2, joiner).start();
    assert_versions(&cluster, &majors);
    let (n1, n2, n3) = (cluster.node(0), cluster.node(1), cluster.node(2));
    for node in [n1, n2] {
        node.exec(SCHEMA);
    }
    cluster.add_peer(0, 1);
    cluster.add_peer(1, 0);
    n1.exec("CREATE TABLE app.items (id int PRIMARY KEY, v text, doc jsonb)");
    n1.exec("INSERT INTO acct (id, balance, note) SELECT g, g % 100, 'row ' || g FROM generate_series(1, 2000) g");
    n1.exec("INSERT INTO app.items SELECT g, 'v' || g, jsonb_build_object('g', g) FROM generate_series(1, 300) g");
    n2.exec("DELETE FROM acct WHERE id % 11 = 0");
    for node in [n1, n2] {
        assert_eq!(node.query_text("SELECT trompe.wait_sync('5 minutes')").as_deref(), Some("t"));
    }

    let stop = AtomicBool::new(false);
    let written = AtomicU64::new(0);
    std::thread::scope(|scope| {
        // The writers stop also when an assertion below fails (else the scope waits for them).
        let _stop_writers = StopOnDrop(&stop);
        for (node, seed, base) in [(n1, 7, 100_000i64), (n2, 8, 200_000)] {
            let (stop, written) = (&stop, &written);
            scope.spawn(move || written.fetch_add(writer(node, seed, base, stop), Ordering::Relaxed));
        }
        std::thread::sleep(Duration::from_millis(500));
        n3.exec(&format!("SELECT trompe.add_peer('n1', '{}', sync => true)", cluster.peer_conninfo(2, 0)));
        if let Some(dir) = &pg_dump_path {
            // The joining node's own pg_dump is older than the source: the copy fails, saying
            // what to do, until trompe.pg_dump_path names a newer one.
            let why = "SELECT last_error FROM trompe.status WHERE name = 'n1' AND last_error LIKE '%pg_dump%'";
            let seen = trompe_tests::wait_for(Duration::from_secs(60), || n3.query_text(why).is_some());
            let error = n3.query_text(why).unwrap_or_default();
            assert!(seen && error.contains(&format!("no pg_dump of PostgreSQL {}", majors[0])), "{error}");
            assert!(error.contains("trompe.pg_dump_path"), "{error}");
            n3.exec(&format!("ALTER SYSTEM SET trompe.pg_dump_path = '{}'", dir.display()));
            n3.exec("SELECT pg_reload_conf()");
        }
        n3.wait_for_value("SELECT sync_state FROM trompe.status WHERE name = 'n1'", "done", SYNC);
        cluster.add_peer(2, 1);
        cluster.add_peer(0, 2);
        cluster.add_peer(1, 2);
        let (stop, written) = (&stop, &written);
        scope.spawn(move || written.fetch_add(writer(n3, 99, 300_000, stop), Ordering::Relaxed));
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
    });
    assert!(written.load(Ordering::Relaxed) > 100, "the writers wrote");
    cluster.wait_sync(SYNC);
    cluster.wait_sync(SYNC);
    for table in ["acct", "app.items"] {
        cluster.assert_same(&checksum(table));
    }
    cluster.assert_same("SELECT string_agg(relid::text, ',' ORDER BY relid::text) FROM trompe.tables");
    assert!(n3.query_i64("SELECT count(*) FROM acct WHERE id > 300000") > 0, "n3's own writes arrived");
    assert!(n1.query_i64("SELECT count(*) FROM acct WHERE id > 300000") > 0, "n3's writes reached n1");
    // Schema beyond the tables came along: the enum, the indexes.
    assert_eq!(n3.query_i64("SELECT count(*) FROM pg_indexes WHERE indexname IN ('acct_balance', 'acct_code_key')"), 2);
    assert_eq!(n3.query_i64("SELECT count(*) FROM pg_type WHERE typname = 'mood'"), 1);
}

/// A PostgreSQL 15 node joins from an 18 node: its own pg_dump (15) cannot read 18, so the
/// copy waits, saying so, until `trompe.pg_dump_path` names 18's.
#[test]
fn mixed_versions_a_15_node_joins_from_an_18_node() {
    let (pg15, pg18) = bindirs_15_and_18();
    join_across_versions("mixed-join-15-from-18", pg18.clone(), pg15.clone(), pg15, Some(pg18));
}

/// A PostgreSQL 18 node joins from a 15 node, with its own pg_dump.
#[test]
fn mixed_versions_an_18_node_joins_from_a_15_node() {
    let (pg15, pg18) = bindirs_15_and_18();
    join_across_versions("mixed-join-18-from-15", pg15, pg18.clone(), pg18, None);
}

/// Inserts rows of its own into `ledger` on one node until `stop`, each in its own
/// transaction; returns the ids whose commit succeeded.
fn ledger_writer(node: &Node, base: i64, stop: &AtomicBool) -> Vec<i64> {
    let mut client = node.connect();
    let mut committed = Vec::new();
    let mut id = base;
    while !stop.load(Ordering::Relaxed) {
        id += 1;
        if client.batch_execute(&format!("INSERT INTO ledger VALUES ({id}, '{}')", node.name)).is_ok() {
            committed.push(id);
        }
        std::thread::sleep(Duration::from_millis(3));
    }
    committed
}

/// The major upgrade the README describes: a mesh of two PostgreSQL 15 nodes moves to two 18
/// nodes while clients keep writing on every node: the 18 nodes join, clients move to them, the
/// 15 nodes are taken out. Every committed row is on both 18 nodes exactly once, and they end
/// identical, with nothing of the 15 nodes left holding their logs.
#[test]
fn mixed_versions_zero_downtime_major_upgrade_from_15_to_18() {
    let (pg15, pg18) = bindirs_15_and_18();
    let cluster = Cluster::builder("mixed-upgrade")
        .nodes(4)
        .node_bindir(0, pg15.clone())
        .node_bindir(1, pg15)
        .node_bindir(2, pg18.clone())
        .node_bindir(3, pg18)
        .start();
    assert_versions(&cluster, &[15, 15, 18, 18]);
    let (old1, old2, new1, new2) = (cluster.node(0), cluster.node(1), cluster.node(2), cluster.node(3));
    for node in [old1, old2] {
        node.exec(SCHEMA);
        node.exec(
            "CREATE TABLE ledger (id bigint PRIMARY KEY, written_on text NOT NULL); SELECT trompe.add_table('ledger')",
        );
    }
    cluster.add_peer(0, 1);
    cluster.add_peer(1, 0);
    old1.exec("INSERT INTO acct (id, balance, note) SELECT g, g % 100, 'row ' || g FROM generate_series(1, 2000) g");
    cluster.node(0).query_text("SELECT trompe.wait_sync('5 minutes')");

    let stop_old = AtomicBool::new(false);
    let stop_new = AtomicBool::new(false);
    let committed = std::thread::scope(|scope| {
        let _stop_old = StopOnDrop(&stop_old);
        let _stop_new = StopOnDrop(&stop_new);
        let mut ledgers = Vec::new();
        let mut writers = Vec::new();
        for (node, seed, base) in [(old1, 11, 1_000_000i64), (old2, 12, 2_000_000)] {
            let stop = &stop_old;
            ledgers.push(scope.spawn(move || ledger_writer(node, base, stop)));
            writers.push(scope.spawn(move || writer(node, seed, base, stop)));
        }
        // 1. The 18 nodes join (each copies from a 15 node under load), then complete the mesh.
        std::thread::sleep(Duration::from_millis(500));
        for (i, source) in [(2usize, 0usize), (3, 1)] {
            let source_name = &cluster.node(source).name;
            cluster.node(i).exec(&format!(
                "SELECT trompe.add_peer('{source_name}', '{}', sync => true)",
                cluster.peer_conninfo(i, source)
            ));
            cluster.node(i).wait_for_value(
                &format!("SELECT sync_state FROM trompe.status WHERE name = '{source_name}'"),
                "done",
                SYNC,
            );
            for other in 0..4 {
                let linked = |from: usize, to: usize| {
                    cluster.node(from).query_i64(&format!(
                        "SELECT count(*) FROM trompe.peers WHERE name = '{}'",
                        cluster.node(to).name
                    )) > 0
                };
                if other != i && cluster.node(other).query_i64("SELECT count(*) FROM trompe.tables") > 0 {
                    if !linked(i, other) {
                        cluster.add_peer(i, other);
                    }
                    if !linked(other, i) {
                        cluster.add_peer(other, i);
                    }
                }
            }
        }
        // 2. Clients move: the 18 nodes take writes, for a while alongside the 15 nodes.
        for (node, seed, base) in [(new1, 13, 3_000_000i64), (new2, 14, 4_000_000)] {
            let stop = &stop_new;
            ledgers.push(scope.spawn(move || ledger_writer(node, base, stop)));
            writers.push(scope.spawn(move || writer(node, seed, base, stop)));
        }
        std::thread::sleep(Duration::from_secs(2));
        stop_old.store(true, Ordering::Relaxed);
        // 3. The 15 nodes go: once the 18 nodes have everything they committed, each 18 node
        //    stops pulling from them and each 15 node tells its peers to drop its position.
        for node in [new1, new2] {
            assert_eq!(node.query_text("SELECT trompe.wait_sync('5 minutes')").as_deref(), Some("t"));
        }
        for new in [new1, new2] {
            for old in [old1, old2] {
                new.exec(&format!("SELECT trompe.remove_peer('{}')", old.name));
            }
        }
        for old in [old1, old2] {
            let peers = old.query_text("SELECT string_agg(name, ',') FROM trompe.peers").unwrap_or_default();
            for peer in peers.split(',').filter(|p| !p.is_empty()) {
                old.exec(&format!("SELECT trompe.remove_peer('{peer}')"));
            }
        }
        std::thread::sleep(Duration::from_secs(1));
        stop_new.store(true, Ordering::Relaxed);
        let written: u64 = writers.into_iter().map(|w| w.join().expect("writer")).sum();
        assert!(written > 100, "the writers wrote ({written})");
        ledgers.into_iter().flat_map(|l| l.join().expect("ledger writer")).collect::<Vec<i64>>()
    });
    for node in [new1, new2] {
        assert_eq!(node.query_text("SELECT trompe.wait_sync('5 minutes')").as_deref(), Some("t"));
    }
    for node in [new1, new2] {
        assert_eq!(node.query_text("SELECT trompe.wait_sync('5 minutes')").as_deref(), Some("t"));
        let on_node = node.query_i64("SELECT count(*) FROM ledger");
        assert_eq!(on_node, committed.len() as i64, "node {}: every committed ledger row, once", node.name);
        let ids: Vec<String> = committed.iter().map(|id| id.to_string()).collect();
        let missing = node.query_i64(&format!(
            "SELECT count(*) FROM unnest('{{{}}}'::bigint[]) AS c(id) WHERE NOT EXISTS (SELECT 1 FROM ledger l WHERE l.id = c.id)",
            ids.join(",")
        ));
        assert_eq!(missing, 0, "node {}: committed ledger rows missing", node.name);
        assert_eq!(
            node.query_i64("SELECT count(*) FROM trompe.consumers"),
            1,
            "node {}: only the other 18 node pulls from it (the 15 nodes no longer hold its log)",
            node.name
        );
        let errors =
            node.query_text("SELECT string_agg(last_error, '; ') FROM trompe.status WHERE last_error IS NOT NULL");
        assert_eq!(errors, None, "node {} shows errors in trompe.status", node.name);
    }
    let pair = |sql: &str| {
        let (a, b) = (new1.query_text(sql), new2.query_text(sql));
        assert_eq!(a, b, "{sql}");
    };
    for table in ["acct", "app.items", "ledger"] {
        if new1.query_i64(&format!("SELECT count(*) FROM pg_class WHERE oid = to_regclass('{table}')")) > 0 {
            pair(&checksum(table));
        }
    }
    assert!(new2.query_i64("SELECT count(*) FROM ledger WHERE id > 3000000 AND id < 4000000") > 0);
    assert!(new1.query_i64("SELECT count(*) FROM ledger WHERE id > 4000000") > 0);
}
