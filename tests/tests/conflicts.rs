//! Conflicts between real nodes: whatever the interleaving, every node ends with the same data,
//! decided by the same rule, and each conflict is on record.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use trompe_tests::{checksum, dump_versions, expect_error, Cluster, Node, Rng};

const SYNC: Duration = Duration::from_secs(120);

/// `t`: a UNIQUE column besides the key; `t2`: a composite key, for truncations.
const SCHEMA: &str = "CREATE TABLE t (id int PRIMARY KEY, v text, u int UNIQUE);
    CREATE TABLE t2 (a int, b int, note text, PRIMARY KEY (a, b));";

fn replicate_schema(cluster: &Cluster) {
    cluster.exec_all(&format!("{SCHEMA} SELECT trompe.add_table('t'); SELECT trompe.add_table('t2');"));
}

/// The value of `t.v` for `id` on `node`, or None if the row does not exist.
fn v_of(node: &Node, id: i32) -> Option<String> {
    node.query_text(&format!("SELECT coalesce((SELECT v FROM t WHERE id = {id}), '<none>')")).filter(|v| v != "<none>")
}

/// The winners recorded on `node` for conflicts of `kind` on `table`'s row `key` (JSON object).
fn recorded(node: &Node, table: &str, kind: &str, key: &str) -> String {
    node.query_text(&format!(
        "SELECT coalesce(string_agg(winner, ',' ORDER BY id), '') FROM trompe.conflicts
         WHERE table_name = '{table}' AND kind = '{kind}' AND key @> '{key}'::jsonb"
    ))
    .unwrap_or_default()
}

/// Every kind of two-node conflict at once: the nodes are partitioned, each writes (node 2
/// always after node 1, so its commits are the later ones), then the partition heals.
#[test]
fn concurrent_changes_resolve_the_same_way_everywhere_and_are_recorded() {
    let cluster = Cluster::start("conflict-kinds", 2);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    cluster.exec_all(SCHEMA);
    // Row 6 exists on node 1 only, from before the table was replicated.
    n1.exec("INSERT INTO t VALUES (6, 'n1 only', NULL)");
    cluster.exec_all(
        "SELECT trompe.add_table('t'); SELECT trompe.add_table('t2');
         CREATE TABLE parent (id int PRIMARY KEY); CREATE TABLE child (id int PRIMARY KEY, parent int REFERENCES parent);
         SELECT trompe.add_table('parent'); SELECT trompe.add_table('child')",
    );
    cluster.mesh();
    n1.exec(
        "INSERT INTO t VALUES (1, 'base', NULL), (3, 'base', NULL), (4, 'base', NULL), (5, 'base', NULL);
         INSERT INTO t2 VALUES (1, 1, 'before the truncate');
         INSERT INTO parent VALUES (1); INSERT INTO child VALUES (1, 1)",
    );
    // A key deleted, inserted and deleted again in one transaction (two tombstones for one
    // key) and inserted once more: the row exists everywhere.
    n1.exec(
        "INSERT INTO t VALUES (9, 'first', NULL);
         BEGIN; DELETE FROM t WHERE id = 9; INSERT INTO t VALUES (9, 'again', NULL); DELETE FROM t WHERE id = 9;
         INSERT INTO t VALUES (9, 'final', NULL); COMMIT",
    );
    // A delete or truncation rolled back to a savepoint leaves no tombstone or marker.
    n1.exec(
        "INSERT INTO t VALUES (10, 'kept', NULL);
         BEGIN; SAVEPOINT a; DELETE FROM t WHERE id = 10; TRUNCATE parent, child; ROLLBACK TO a; COMMIT",
    );
    assert_eq!(
        n1.query_i64(
            "SELECT (SELECT count(*) FROM trompe.tombstones WHERE key = '{10}') + (SELECT count(*) FROM trompe.truncations)"
        ),
        0
    );
    cluster.wait_sync(SYNC);
    assert_eq!(v_of(n2, 9).as_deref(), Some("final"));
    assert_eq!(v_of(n2, 10).as_deref(), Some("kept"));

    cluster.partition(0, 1);
    // Node 1 writes first ...
    n1.exec(
        "UPDATE t SET v = 'n1' WHERE id = 1;
         INSERT INTO t VALUES (2, 'n1', NULL);
         UPDATE t SET v = 'n1' WHERE id = 3;
         DELETE FROM t WHERE id = 5;
         UPDATE t SET v = 'n1 updated' WHERE id = 6;
         INSERT INTO t VALUES (7, 'n1', 70);
         INSERT INTO t2 VALUES (2, 2, 'n1, before the truncate');
         TRUNCATE t2;
         TRUNCATE parent, child",
    );
    // ... node 2 later.
    n2.exec(
        "UPDATE t SET v = 'n2' WHERE id = 1;
         INSERT INTO t VALUES (2, 'n2', NULL);
         DELETE FROM t WHERE id = 3;
         DELETE FROM t WHERE id = 5;
         INSERT INTO t VALUES (8, 'n2', 70);
         INSERT INTO t2 VALUES (3, 3, 'n2, after the truncate');
         DELETE FROM t2 WHERE a = 1;
         INSERT INTO child VALUES (2, 1)",
    );
    // Node 1 again, last: an update newer than node 2's delete of row 4.
    n2.exec("DELETE FROM t WHERE id = 4");
    n1.exec("UPDATE t SET v = 'n1 after the delete' WHERE id = 4");
    cluster.heal_pair(0, 1);
    cluster.wait_sync(SYNC);

    cluster.assert_same(&checksum("t"));
    cluster.assert_same(&checksum("t2"));
    // A delete newer than the truncation keeps its tombstone everywhere.
    assert_eq!(
        cluster
            .assert_same("SELECT string_agg(key::text, ',') FROM trompe.tombstones WHERE relid = 't2'::regclass")
            .as_deref(),
        Some("{1,1}")
    );
    // The truncation of two tables linked by a foreign key, one of which has a newer row on
    // node 2: the older rows go everywhere, the newer child stays (foreign keys are not checked
    // during apply, as in pglogical).
    assert_eq!(cluster.assert_same(&checksum("parent")).as_deref(), Some("0:"));
    assert_eq!(cluster.assert_same("SELECT string_agg(id::text, ',') FROM child").as_deref(), Some("2"));
    for node in cluster.nodes() {
        assert_eq!(v_of(node, 1).as_deref(), Some("n2"), "update/update: the later update wins");
        assert_eq!(v_of(node, 2).as_deref(), Some("n2"), "insert/insert: the later insert wins");
        assert_eq!(v_of(node, 3), None, "a delete newer than an update wins");
        assert_eq!(v_of(node, 4).as_deref(), Some("n1 after the delete"), "an update newer than a delete wins");
        assert_eq!(v_of(node, 5), None, "delete/delete");
        assert_eq!(v_of(node, 6).as_deref(), Some("n1 updated"), "an update of a missing row inserts it");
        assert_eq!(v_of(node, 7), None, "the older row of a unique collision is removed");
        assert_eq!(v_of(node, 8).as_deref(), Some("n2"), "the newer row of a unique collision stays");
        assert_eq!(
            node.query_text("SELECT string_agg(note, ',' ORDER BY a) FROM t2").as_deref(),
            Some("n2, after the truncate"),
            "a truncate removes exactly the rows older than itself"
        );
    }

    // Each node recorded its side of every conflict, with the same winner.
    for node in cluster.nodes() {
        println!(
            "conflicts on {}:\n{}",
            node.name,
            node.query_text(
                "SELECT string_agg(format('%s %s %s %s local=%s remote=%s', table_name, kind, key, winner, local_row, remote_row), E'\n' ORDER BY id) FROM trompe.conflicts"
            )
            .unwrap_or_default()
        );
    }
    assert_eq!(recorded(n1, "public.t", "update_update", r#"{"id":"1"}"#), "remote");
    assert_eq!(recorded(n2, "public.t", "update_update", r#"{"id":"1"}"#), "local");
    assert_eq!(recorded(n1, "public.t", "insert_exists", r#"{"id":"2"}"#), "remote");
    assert_eq!(recorded(n2, "public.t", "insert_exists", r#"{"id":"2"}"#), "local");
    assert_eq!(recorded(n1, "public.t", "delete_update", r#"{"id":"3"}"#), "remote");
    assert_eq!(recorded(n2, "public.t", "update_deleted", r#"{"id":"3"}"#), "local");
    assert_eq!(recorded(n2, "public.t", "update_deleted", r#"{"id":"4"}"#), "remote");
    assert_eq!(recorded(n2, "public.t", "update_missing", r#"{"id":"6"}"#), "remote");
    assert_eq!(recorded(n1, "public.t", "unique_violation", r#"{"id":"8"}"#), "remote");
    assert_eq!(recorded(n2, "public.t", "unique_violation", r#"{"id":"7"}"#), "local");
    assert!(
        n2.query_i64("SELECT count(*) FROM trompe.conflicts WHERE table_name = 'public.t2' AND kind = 'truncated'")
            >= 1,
        "the insert older than the truncate is recorded"
    );
    let row = n1.query_row(
        "SELECT local_row->>'v', remote_row->>'v', local_origin = trompe.node_id(), remote_committed_at > local_committed_at
         FROM trompe.conflicts WHERE kind = 'update_update'",
    );
    assert_eq!(
        row,
        vec![Some("n1".into()), Some("n2".into()), Some("t".into()), Some("t".into())],
        "both versions are kept"
    );

    // Expired conflicts and tombstones are pruned by the worker.
    assert!(n1.query_i64("SELECT count(*) FROM trompe.tombstones") > 0, "deletes keep tombstones");
    n1.exec("ALTER SYSTEM SET trompe.conflict_retention = '1s'");
    n1.exec("ALTER SYSTEM SET trompe.tombstone_retention = '1s'");
    n1.exec("SELECT pg_reload_conf()");
    n1.wait_for_value(
        "SELECT (SELECT count(*) FROM trompe.conflicts) + (SELECT count(*) FROM trompe.tombstones)",
        "0",
        Duration::from_secs(30),
    );
}

#[test]
fn only_convergent_rules_can_be_chosen() {
    let cluster = Cluster::start("conflict-rules", 1);
    let node = cluster.node(0);
    node.exec(&format!("{SCHEMA} SELECT trompe.add_table('t')"));
    assert_eq!(
        node.query_text("SELECT trompe.set_conflict_rule('t', 'last_update_wins')").as_deref(),
        Some("last_update_wins")
    );
    for rule in ["first_update_wins", "node_priority", "last_update_wins"] {
        let set = node.query_text(&format!("SELECT trompe.set_conflict_rule('t', '{rule}')"));
        assert_eq!(set.as_deref(), Some(rule));
    }
    let mut c = node.connect();
    for rule in ["keep_local", "apply_remote"] {
        let (state, message) = expect_error(&mut c, &format!("SELECT trompe.set_conflict_rule('t', '{rule}')"));
        assert_eq!(state, "22023", "{message}");
        assert!(message.contains(rule) && message.contains("converge"), "{message}");
    }
    let (state, message) = expect_error(&mut c, "SELECT trompe.set_conflict_rule('t', 'whatever')");
    assert_eq!(state, "22023", "{message}");
    let (state, message) = expect_error(&mut c, "SELECT trompe.set_conflict_rule('t2', 'last_update_wins')");
    assert_eq!(state, "55000", "{message}");
    assert!(message.contains("t2"), "{message}");
    assert_eq!(
        node.query_text("SELECT conflict_rule FROM trompe.tables WHERE relid = 't'::regclass").as_deref(),
        Some("last_update_wins")
    );
}

/// What one randomized run does.
struct Workload {
    seed: u64,
    clients_per_node: usize,
    duration: Duration,
}

/// One client's random statement: small key spaces, so nodes conflict all the time.
fn random_statement(rng: &mut Rng, tag: &str) -> String {
    let id = rng.between(1, 25);
    let u = if rng.chance(30) { "NULL".to_string() } else { rng.between(1, 30).to_string() };
    let (a, b) = (rng.between(1, 5), rng.between(1, 5));
    match rng.below(100) {
        0..=29 => format!("INSERT INTO t VALUES ({id}, '{tag}', {u})"),
        30..=54 => format!("UPDATE t SET v = '{tag}', u = {u} WHERE id = {id}"),
        55..=64 => format!("UPDATE t SET id = {} WHERE id = {id}", rng.between(1, 25)),
        65..=79 => format!("DELETE FROM t WHERE id = {id}"),
        80..=89 => {
            format!("INSERT INTO t2 VALUES ({a}, {b}, '{tag}') ON CONFLICT (a, b) DO UPDATE SET note = EXCLUDED.note")
        }
        90..=97 => format!("DELETE FROM t2 WHERE a = {a}"),
        98 => "TRUNCATE t2".to_string(),
        _ => "TRUNCATE t".to_string(),
    }
}

/// Errors a client expects from its own node (its own constraints, lock waits), as opposed to
/// trompe failing.
fn expected_local_error(e: &postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        let code = db.code().code();
        code.starts_with("23") || code.starts_with("40")
    })
}

/// Runs random transactions on `node` until `stop`, counting those that commit in `committed`.
fn client(node: &Node, mut rng: Rng, tag: String, stop: &AtomicBool, committed: &AtomicU64) {
    let mut c = node.connect();
    while !stop.load(Ordering::Relaxed) {
        let statements: Vec<String> = (0..rng.between(1, 3)).map(|_| random_statement(&mut rng, &tag)).collect();
        let sql = format!("BEGIN; {}; COMMIT", statements.join("; "));
        match c.batch_execute(&sql) {
            Ok(()) => {
                committed.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if expected_local_error(&e) => {
                let _ = c.batch_execute("ROLLBACK");
            }
            Err(e) => panic!("client {tag} on {}: {sql}\nfailed: {}", node.name, trompe_tests::describe_error(&e)),
        }
        if rng.chance(20) {
            std::thread::sleep(Duration::from_millis(rng.below(30)));
        }
    }
}

/// Three nodes, several clients each, random conflicting writes, a partition and a one-way cut
/// in the middle; afterwards every table is identical everywhere.
fn converges(mut w: Workload) {
    println!("randomized convergence: seed {} (rerun with TROMPE_SEEDS={})", w.seed, w.seed);
    // Every fourth seed (CI: seed 3) skews two clocks, within trompe.max_clock_skew.
    let skewed = w.seed % 4 == 3;
    let mut builder = Cluster::builder(&format!("converge-{}", w.seed)).nodes(3);
    if skewed {
        builder = builder.clock_offset(1, "+3s").clock_offset(2, "-3s");
        println!("seed {}: n2's clock 3 s ahead, n3's 3 s behind", w.seed);
    }
    let cluster = builder.start();
    replicate_schema(&cluster);
    if w.seed % 3 == 2 {
        // Every third seed runs the windowed rules (node 3 outranks node 1, which outranks node 2).
        use_windowed_rules(&cluster, [(2, 7), (0, 3)]);
        println!("seed {}: t under node_priority, t2 under first_update_wins", w.seed);
        // Their commit waits (up to a window per transaction) leave less done per second.
        w.duration *= 2;
    }
    cluster.mesh();
    let mut rng = Rng::new(w.seed);
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let mut healed_at = String::new();
    std::thread::scope(|s| {
        for (i, node) in cluster.nodes().iter().enumerate() {
            for k in 0..w.clients_per_node {
                let (rng, stop, committed) = (rng.fork(), stop.clone(), committed.clone());
                s.spawn(move || client(node, rng, format!("n{}c{k}", i + 1), &stop, &committed));
            }
        }
        let start = Instant::now();
        let third = w.duration / 3;
        std::thread::sleep(third.mul_f64(0.5 + rng.below(100) as f64 / 100.0));
        cluster.partition(0, 1);
        cluster.cut(2, 0);
        std::thread::sleep(third);
        cluster.heal_pair(0, 1);
        cluster.link(2, 0).heal();
        healed_at = cluster.node(0).query_text("SELECT now()::text").unwrap_or_default();
        std::thread::sleep(w.duration.saturating_sub(start.elapsed()));
        // On a busy machine the clients go on until they did enough to prove something.
        while committed.load(Ordering::Relaxed) < MIN_COMMITTED && start.elapsed() < w.duration * 6 {
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::Relaxed);
    });
    let committed = committed.load(Ordering::Relaxed);
    cluster.wait_sync(SYNC);
    let conflicts: i64 = cluster.nodes().iter().map(|n| n.query_i64("SELECT count(*) FROM trompe.conflicts")).sum();
    println!("seed {}: {committed} transactions committed, {conflicts} conflicts resolved", w.seed);
    assert!(committed >= MIN_COMMITTED, "seed {}: too little work to prove anything ({committed})", w.seed);
    assert!(conflicts > 0, "seed {}: the workload produced no conflict", w.seed);
    for table in ["t", "t2"] {
        let sums: Vec<Option<String>> = cluster.nodes().iter().map(|n| n.query_text(&checksum(table))).collect();
        if sums.iter().any(|s| s != &sums[0]) {
            dump_versions(&cluster, table);
        }
        cluster.assert_same(&checksum(table));
    }
    for node in cluster.nodes() {
        let errors = node.query_text(&format!(
            "SELECT string_agg(name || ': ' || last_error, '; ') FROM trompe.status
             WHERE last_error_at > '{healed_at}'::timestamptz + interval '2 seconds'"
        ));
        assert_eq!(errors, None, "seed {}: {} reported errors after the links healed", w.seed, node.name);
    }
}

/// Transactions the random clients must commit in all for a run to prove anything.
const MIN_COMMITTED: u64 = 150;

/// The seeds to run: `TROMPE_SEEDS` (comma-separated) or a fixed set for CI.
fn seeds() -> Vec<u64> {
    match std::env::var("TROMPE_SEEDS") {
        Ok(list) => list.split(',').filter_map(|s| s.trim().parse().ok()).collect(),
        Err(_) => vec![1, 2, 3],
    }
}

#[test]
fn random_concurrent_writes_on_three_nodes_converge() {
    let secs = std::env::var("TROMPE_CONVERGE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    for seed in seeds() {
        converges(Workload { seed, clients_per_node: 2, duration: Duration::from_secs(secs) });
    }
}

/// DDL on one node while the other writes the table: each node replays the other's changes in
/// its origin order, rows written without the new column get its default, and both converge.
#[test]
fn ddl_against_concurrent_dml_converges() {
    let cluster = Cluster::start("conflict-ddl", 2);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    cluster.exec_all("CREATE TABLE d (id int PRIMARY KEY, v text); SELECT trompe.add_table('d')");
    cluster.mesh();
    n1.exec("INSERT INTO d VALUES (1, 'base'), (2, 'base')");
    cluster.wait_sync(SYNC);
    cluster.partition(0, 1);
    n1.exec("ALTER TABLE d ADD COLUMN c int NOT NULL DEFAULT 7; INSERT INTO d VALUES (3, 'n1', 3); UPDATE d SET c = 1 WHERE id = 1");
    n2.exec(
        "INSERT INTO d VALUES (4, 'n2'); UPDATE d SET v = 'n2' WHERE id = 2; UPDATE d SET v = 'n2 later' WHERE id = 1",
    );
    cluster.heal_pair(0, 1);
    cluster.wait_sync(SYNC);
    let sum = cluster.assert_same(&checksum("d"));
    assert_eq!(
        cluster.assert_same("SELECT string_agg(format('%s:%s:%s', id, v, c), ' ' ORDER BY id) FROM d").as_deref(),
        Some("1:n2 later:7 2:n2:7 3:n1:3 4:n2:7"),
        "{sum:?}"
    );
}

/// Pauses or resumes (`what`) every link of the cluster.
fn every_link(cluster: &Cluster, what: &str) {
    for node in cluster.nodes() {
        for peer in cluster.nodes().iter().filter(|p| p.name != node.name) {
            node.exec(&format!("SELECT trompe.{what}_peer('{}')", peer.name));
        }
    }
}

/// With every link paused: `na` writes row `retired` and `nb` then row `winner`, both with
/// `u` in the UNIQUE column; `nb` hears of `na`'s row and meets the collision (its own row is
/// newer and keeps the value), retiring `na`'s row.
fn retire_on_unique_collision(cluster: &Cluster, na: &Node, nb: &Node, retired: i32, winner: i32, u: i32) {
    every_link(cluster, "pause");
    na.exec(&format!("INSERT INTO t VALUES ({retired}, 'retired', {u})"));
    nb.exec(&format!("INSERT INTO t VALUES ({winner}, 'winner', {u})"));
    nb.exec(&format!("SELECT trompe.resume_peer('{}')", na.name));
    let tombstone = format!("SELECT count(*) FROM trompe.tombstones WHERE key = ARRAY['{retired}']");
    nb.wait_for_value(&tombstone, "1", SYNC);
}

/// A node that keeps its own row against an incoming one on a UNIQUE column removes the
/// incoming row everywhere, also on a node that hears of the removal before the row itself and
/// never meets the collision (the winner moved on). The removal carries the retired row's own
/// version, so it wins over the row where the row came first, and its tombstone keeps the row
/// out where it comes later, whichever way the node ids sort (run both ways round).
#[test]
fn a_row_retired_by_a_unique_collision_is_removed_everywhere() {
    let cluster = Cluster::start("unique-retired", 3);
    replicate_schema(&cluster);
    cluster.mesh();
    for (round, (a, b, c)) in [(0usize, 1usize, 2usize), (1, 0, 2)].into_iter().enumerate() {
        let (na, nb, nc) = (cluster.node(a), cluster.node(b), cluster.node(c));
        let (retired, winner, u) = (12 + round as i32, 22 + round as i32, 27 + round as i32);
        retire_on_unique_collision(&cluster, na, nb, retired, winner, u);
        // The winner moves on; c hears all of it from b before the retired row reaches it from a.
        nb.exec(&format!("UPDATE t SET u = {} WHERE id = {winner}", u + 100));
        nc.exec(&format!("SELECT trompe.resume_peer('{}')", nb.name));
        nc.wait_for_value(&format!("SELECT count(*) FROM t WHERE id = {winner} AND u = {}", u + 100), "1", SYNC);
        every_link(&cluster, "resume");
        cluster.wait_sync(SYNC);
        for node in cluster.nodes() {
            assert_eq!(v_of(node, retired), None, "round {round}: the retired row is gone on {}", node.name);
            assert_eq!(v_of(node, winner).as_deref(), Some("winner"), "round {round}: on {}", node.name);
        }
        cluster.assert_same(&checksum("t"));
    }
}

/// The path of the divergence once seen with seed 2: the node that wrote a row retired
/// elsewhere by a unique collision never meets the collision itself (its own later write of
/// the winner's key has a different value), and hears of the retirement only. The removal must
/// win over the row there whichever way the node ids sort (run both ways round), and the
/// retirer's tombstone must agree with its peers'.
#[test]
fn a_retired_row_is_removed_on_the_node_that_wrote_it() {
    let cluster = Cluster::start("unique-retired-origin", 2);
    replicate_schema(&cluster);
    cluster.mesh();
    for (round, (a, b)) in [(0usize, 1usize), (1, 0)].into_iter().enumerate() {
        let (na, nb) = (cluster.node(a), cluster.node(b));
        let (retired, winner, u) = (12 + round as i32, 22 + round as i32, 27 + round as i32);
        retire_on_unique_collision(&cluster, na, nb, retired, winner, u);
        // a writes the winner's key too, later and with another value: when b's row arrives,
        // it loses there without colliding with the retired row.
        na.exec(&format!("INSERT INTO t VALUES ({winner}, 'moved on', {})", u + 100));
        every_link(&cluster, "resume");
        cluster.wait_sync(SYNC);
        for node in cluster.nodes() {
            assert_eq!(v_of(node, retired), None, "round {round}: the retired row is gone on {}", node.name);
            assert_eq!(v_of(node, winner).as_deref(), Some("moved on"), "round {round}: on {}", node.name);
        }
        cluster.assert_same(&checksum("t"));
        cluster.assert_same(&format!(
            "SELECT pg_xact_commit_timestamp(xmin)::text FROM trompe.tombstones WHERE key = ARRAY['{retired}']"
        ));
        // The removal is b's own transaction, not the apply of the retired row.
        let origin = format!(
            "SELECT (pg_xact_commit_timestamp_origin(xmin)).roident FROM trompe.tombstones WHERE key = ARRAY['{retired}']"
        );
        assert_eq!(nb.query_text(&origin).as_deref(), Some("0"), "round {round}");
    }
    // A crash right after the apply transaction that retired a row leaves the removal queued
    // (written here by hand, as that transaction writes it: tombstone and queue together, while
    // the peer's row is on its way); the worker logs it when it starts again.
    let (na, nb) = (cluster.node(0), cluster.node(1));
    every_link(&cluster, "pause");
    na.exec("INSERT INTO t VALUES (14, 'retired', 29)");
    nb.exec(
        "BEGIN;
         INSERT INTO trompe.tombstones (relid, key) VALUES ('t'::regclass, ARRAY['14']);
         INSERT INTO trompe.retirements (relid, key) VALUES ('t'::regclass, ARRAY['14']);
         COMMIT",
    );
    nb.crash_and_restart();
    every_link(&cluster, "resume");
    cluster.wait_sync(SYNC);
    for node in cluster.nodes() {
        assert_eq!(v_of(node, 14), None, "a queued removal survives a crash: row still on {}", node.name);
    }
    assert_eq!(nb.query_i64("SELECT count(*) FROM trompe.retirements"), 0);
    cluster.assert_same(&checksum("t"));

    // A local insert of a queued key, still open when the worker looks at the queue: the key
    // stays queued (logging the delete now could commit after the insert, and peers would
    // remove a row this node keeps), and once the insert has committed it needs nothing.
    nb.exec(
        "BEGIN;
         INSERT INTO trompe.tombstones (relid, key) VALUES ('t'::regclass, ARRAY['16']);
         INSERT INTO trompe.retirements (relid, key) VALUES ('t'::regclass, ARRAY['16']);
         COMMIT",
    );
    let mut open = nb.connect();
    open.batch_execute("BEGIN; INSERT INTO t VALUES (16, 'inserted', NULL)").expect("insert");
    nb.exec("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'trompe worker'");
    // Two changes from the peer applied after the restart: the worker went through the queue
    // at least once meanwhile (it does so after each round of pulls).
    for marker in [17, 18] {
        na.exec(&format!("INSERT INTO t VALUES ({marker}, 'marker', NULL)"));
        nb.wait_for_value(&format!("SELECT count(*) FROM t WHERE id = {marker}"), "1", SYNC);
    }
    assert_eq!(nb.query_i64("SELECT count(*) FROM trompe.retirements"), 1, "the held key stays queued");
    open.batch_execute("COMMIT").expect("commit");
    nb.wait_for_value("SELECT count(*) FROM trompe.retirements", "0", SYNC);
    cluster.wait_sync(SYNC);
    for node in cluster.nodes() {
        assert_eq!(v_of(node, 16).as_deref(), Some("inserted"), "on {}", node.name);
    }
    cluster.assert_same(&checksum("t"));
}

/// Sleeps until the start of a conflict window (a whole second of the clock), so that a few
/// quick writes commit in one window.
fn start_of_a_window() {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_millis());
    if ms > 50 {
        std::thread::sleep(Duration::from_millis(u64::from(1000 - ms)));
    }
}

/// The conflict window (whole seconds of the clock) in which the row of `from where` on
/// `node` was committed.
fn window_of(node: &Node, from_where: &str) -> i64 {
    node.query_i64(&format!("SELECT floor(extract(epoch FROM pg_xact_commit_timestamp(xmin)))::int8 FROM {from_where}"))
}

/// Puts `t` under `node_priority` and `t2` under `first_update_wins` on every node, with the
/// priorities given as (node index, priority).
fn use_windowed_rules(cluster: &Cluster, priorities: [(usize, i32); 2]) {
    let mut sql = "SELECT trompe.set_conflict_rule('t', 'node_priority');
                   SELECT trompe.set_conflict_rule('t2', 'first_update_wins');"
        .to_string();
    for (node, priority) in priorities {
        let id = cluster.node(node).query_text("SELECT trompe.node_id()::text").expect("a node id");
        sql += &format!("SELECT trompe.set_node_priority('{id}', {priority});");
    }
    cluster.exec_all(&sql);
}

/// `node_priority` and `first_update_wins`: writes of one row on several nodes within one
/// conflict window are decided by the rule the same way on every node, whichever arrives first
/// where; a local write that replaces a higher-ranked version of its window waits for the next
/// window at commit, so that it wins everywhere as it did locally.
#[test]
fn windowed_rules_decide_the_same_way_everywhere() {
    let cluster = Cluster::start("conflict-windowed", 3);
    replicate_schema(&cluster);
    // Node 2 outranks node 3, which outranks node 1 (not listed: 0).
    use_windowed_rules(&cluster, [(1, 10), (2, 5)]);
    cluster.mesh();
    let mut decided = None;
    for id in 100..105 {
        every_link(&cluster, "pause");
        start_of_a_window();
        // node_priority: node 2 writes first, then node 1, then node 3 (each its own version).
        for (i, tag) in [(1, "n2"), (0, "n1"), (2, "n3")] {
            cluster.node(i).exec(&format!("INSERT INTO t VALUES ({id}, '{tag}', NULL)"));
        }
        // first_update_wins: node 3 first, then node 1, then node 2.
        for (i, tag) in [(2, "n3"), (0, "n1"), (1, "n2")] {
            cluster.node(i).exec(&format!("INSERT INTO t2 VALUES ({id}, 1, '{tag}')"));
        }
        let windows: std::collections::HashSet<i64> = cluster
            .nodes()
            .iter()
            .flat_map(|n| [window_of(n, &format!("t WHERE id = {id}")), window_of(n, &format!("t2 WHERE a = {id}"))])
            .collect();
        every_link(&cluster, "resume");
        cluster.wait_sync(SYNC);
        if windows.len() == 1 {
            decided = Some(id);
            break;
        }
        // The writes straddled two windows (a slow machine): try again with another key.
    }
    let id = decided.expect("the writes of one round committed within one conflict window");
    for node in cluster.nodes() {
        assert_eq!(v_of(node, id).as_deref(), Some("n2"), "node_priority on {}", node.name);
        let note = node.query_text(&format!("SELECT note FROM t2 WHERE a = {id} AND b = 1"));
        assert_eq!(note.as_deref(), Some("n3"), "first_update_wins on {}", node.name);
    }

    // Node 1, the lowest, updates a row node 2 has just written, in the same window: its commit
    // waits for the next window, and its update then wins everywhere.
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    let mut waited = false;
    for id in 200..205 {
        start_of_a_window();
        n2.exec(&format!("INSERT INTO t VALUES ({id}, 'n2', NULL)"));
        let n2_window = window_of(n2, &format!("t WHERE id = {id}"));
        n1.wait_for_value(&format!("SELECT count(*) FROM t WHERE id = {id}"), "1", SYNC);
        let started = n1.query_row(&format!(
            "BEGIN; UPDATE t SET v = 'n1 later' WHERE id = {id};
             SELECT floor(extract(epoch FROM now()))::int8; COMMIT"
        ));
        let started: i64 = started.first().cloned().flatten().and_then(|s| s.parse().ok()).unwrap_or(-1);
        let committed = window_of(n1, &format!("t WHERE id = {id}"));
        cluster.wait_sync(SYNC);
        for node in cluster.nodes() {
            assert_eq!(v_of(node, id).as_deref(), Some("n1 later"), "the local write wins on {}", node.name);
        }
        if started == n2_window {
            assert_eq!(committed, n2_window + 1, "the update waited for the next window");
            waited = true;
            break;
        }
        // The update started in a later window already (slow replication): nothing to wait for.
    }
    assert!(waited, "an update started within the window of the version it replaced");
    // first_update_wins: a later update of the round's row, right away, wins everywhere too.
    n1.exec(&format!("UPDATE t2 SET note = 'n1 later' WHERE a = {id} AND b = 1"));
    cluster.wait_sync(SYNC);
    for node in cluster.nodes() {
        let note = node.query_text(&format!("SELECT note FROM t2 WHERE a = {id} AND b = 1"));
        assert_eq!(note.as_deref(), Some("n1 later"), "on {}", node.name);
    }
    cluster.assert_same(&checksum("t"));
    cluster.assert_same(&checksum("t2"));
}
