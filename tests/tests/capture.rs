//! The change log as peers read it, with real concurrent sessions: a transaction that commits
//! late is never skipped, rolled-back work never appears, whole transactions come in batches,
//! and confirmed parts of the log are truncated.

use std::time::Duration;

use postgres::Client;
use trompe_tests::{wait_for, Cluster};

const READER: &str = "00000000-0000-4000-8000-000000000001";

/// One change as pulled: (transaction's last log id, position in its transaction, op, values
/// as `{a,b}`).
type Pulled = (i64, u64, String, String);

/// One pull as a peer would do it: returns (step end, complete, changes).
fn pull(c: &mut Client, done: &str, cur: Option<&str>, after: i64, max_rows: i32) -> (String, bool, Vec<Pulled>) {
    let rows = c
        .query(
            "SELECT kind::text, step_cur, complete, txn_last, changes
               FROM trompe.pull($1::text::uuid, $2, $3, $4, $5, 0, -1, $2)",
            &[&READER, &done, &cur, &after, &max_rows],
        )
        .unwrap_or_else(|e| panic!("pull failed: {}", trompe_tests::describe_error(&e)));
    assert_eq!(rows[0].get::<_, String>(0), "H");
    let cur: String = rows[0].get(1);
    let complete: bool = rows[0].get(2);
    let mut changes = Vec::new();
    for r in &rows[1..] {
        let txn_last: i64 = r.get(3);
        let bytes: Vec<u8> = r.get(4);
        let mut records = trompe_core::changeset::decode(&bytes).expect("a valid chunk");
        records.sort_by_key(|c| c.seq);
        for c in records {
            let vals: Vec<String> =
                c.vals.unwrap_or_default().into_iter().map(|v| v.unwrap_or_else(|| "NULL".into())).collect();
            changes.push((txn_last, c.seq, c.op.code().to_string(), format!("{{{}}}", vals.join(","))));
        }
    }
    (cur, complete, changes)
}

fn register(c: &mut Client) -> String {
    c.query_one("SELECT snapshot FROM trompe.register_consumer($1::text::uuid, 'reader')", &[&READER]).unwrap().get(0)
}

#[test]
fn a_transaction_that_commits_late_is_never_skipped() {
    let cluster = Cluster::start("capture-late-commit", 1);
    let n1 = cluster.node(0);
    n1.exec("CREATE TABLE t (id int PRIMARY KEY); SELECT trompe.add_table('t')");
    let mut reader = n1.connect();
    let s0 = register(&mut reader);

    let mut t1 = n1.connect();
    let mut t2 = n1.connect();
    t1.batch_execute("BEGIN; INSERT INTO t VALUES (1)").unwrap();
    t2.batch_execute("INSERT INTO t VALUES (2)").unwrap();
    let mut rolled_back = n1.connect();
    rolled_back.batch_execute("BEGIN; INSERT INTO t VALUES (3); ROLLBACK").unwrap();

    let (s1, complete, changes) = pull(&mut reader, &s0, None, 0, 1000);
    assert!(complete);
    let vals: Vec<&str> = changes.iter().map(|c| c.3.as_str()).collect();
    assert_eq!(vals, vec!["{2}"], "only T2 has committed");
    // T1's change has the smaller log id: a reader continuing "after the last id it saw" would
    // now skip it for ever.
    t1.batch_execute("COMMIT").unwrap();
    let (_, complete, changes) = pull(&mut reader, &s1, None, 0, 1000);
    assert!(complete);
    let vals: Vec<&str> = changes.iter().map(|c| c.3.as_str()).collect();
    assert_eq!(vals, vec!["{1}"], "T1 arrives after it commits");
    // T1's log row is written at its commit, after T2's: transactions are read in the order
    // they committed, whatever order they started or wrote in.
}

#[test]
fn batches_hold_whole_transactions_in_dependency_order() {
    let cluster = Cluster::start("capture-batches", 1);
    let n1 = cluster.node(0);
    n1.exec("CREATE TABLE t (id int PRIMARY KEY, v int); SELECT trompe.add_table('t')");
    let mut reader = n1.connect();
    let s0 = register(&mut reader);
    // Txn A inserts row 1 and, interleaved with B, more rows; B updates row 1 after A commits.
    let mut a = n1.connect();
    let mut b = n1.connect();
    a.batch_execute("BEGIN; INSERT INTO t VALUES (1, 0), (2, 0), (3, 0)").unwrap();
    b.batch_execute("BEGIN; INSERT INTO t VALUES (10, 0)").unwrap();
    a.batch_execute("INSERT INTO t VALUES (4, 0); COMMIT").unwrap();
    b.batch_execute("UPDATE t SET v = 1 WHERE id = 1; COMMIT").unwrap();
    for i in 0..5 {
        n1.exec(&format!("INSERT INTO t VALUES ({}, 0), ({}, 0)", 100 + 2 * i, 101 + 2 * i));
    }
    // Read the step in batches of at most 3 rows: transactions are never split.
    let (cur, _, first) = pull(&mut reader, &s0, None, 0, 3);
    let mut all = first.clone();
    let mut after = first.last().unwrap().0;
    loop {
        let (_, complete, more) = pull(&mut reader, &s0, Some(&cur), after, 3);
        if let Some(last) = more.last() {
            after = last.0;
        }
        all.extend(more);
        if complete {
            break;
        }
    }
    assert_eq!(all.len(), 4 + 2 + 10);
    // Transactions are contiguous and ordered by their log row (written at commit).
    let mut order: Vec<i64> = Vec::new();
    for c in &all {
        if order.last() != Some(&c.0) {
            assert!(!order.contains(&c.0), "transaction {} split", c.0);
            order.push(c.0);
        }
    }
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted);
    // A (which wrote row 1) comes before B (which updated it).
    let a_pos = all.iter().position(|c| c.3 == "{1,0}").unwrap();
    let b_pos = all.iter().position(|c| c.2 == "U").unwrap();
    assert!(a_pos < b_pos);
}

#[test]
fn confirmed_log_tables_are_truncated() {
    let cluster = Cluster::builder("capture-rotation").nodes(2).setting("trompe.log_rotation_interval", "200").start();
    cluster.exec_all("CREATE TABLE t (id int PRIMARY KEY); SELECT trompe.add_table('t')");
    cluster.mesh();
    let n1 = cluster.node(0);
    for round in 0..6 {
        n1.exec(&format!("INSERT INTO t SELECT generate_series({0} * 1000, {0} * 1000 + 499)", round));
        std::thread::sleep(Duration::from_millis(250));
    }
    cluster.wait_sync(Duration::from_secs(60));
    assert_eq!(cluster.node(1).query_i64("SELECT count(*) FROM t"), 3000);
    let pruned = wait_for(Duration::from_secs(90), || n1.query_i64("SELECT count(*) FROM trompe.log") == 0);
    assert!(pruned, "the log still has {} rows", n1.query_i64("SELECT count(*) FROM trompe.log"));
    // A paused consumer holds the log back: once the table holding a change is retired and no
    // writer can use it any more, it would be truncated within a maintenance round (1 s) if
    // nobody needed it; it must survive several rounds.
    cluster.node(1).exec("SELECT trompe.pause_peer('n1')");
    let slot = n1.query_i64("SELECT slot FROM trompe.log_rotation WHERE is_current");
    n1.exec("INSERT INTO t SELECT generate_series(100000, 100099)");
    let retired = wait_for(Duration::from_secs(30), || {
        n1.query_text(&format!(
            "SELECT NOT is_current AND retired_below <= pg_snapshot_xmin(pg_current_snapshot())
               FROM trompe.log_rotation WHERE slot = {slot}"
        ))
        .as_deref()
            == Some("t")
    });
    assert!(retired, "the log table was not retired");
    for _ in 0..4 {
        assert_eq!(
            n1.query_i64("SELECT coalesce(sum(nchanges), 0) FROM trompe.log"),
            100,
            "changes a peer has not confirmed stay"
        );
        std::thread::sleep(Duration::from_millis(750));
    }
    cluster.node(1).exec("SELECT trompe.resume_peer('n1')");
    cluster.wait_sync(Duration::from_secs(60));
    assert!(wait_for(Duration::from_secs(90), || n1.query_i64("SELECT count(*) FROM trompe.log") == 0));
}

#[test]
fn large_transactions_are_written_in_chunks_and_read_in_order() {
    let cluster = Cluster::start("capture-chunks", 2);
    cluster.exec_all("CREATE TABLE t (id int PRIMARY KEY, v int); SELECT trompe.add_table('t')");
    cluster.mesh();
    let n1 = cluster.node(0);
    n1.exec(
        "BEGIN;
         INSERT INTO t SELECT g, 0 FROM generate_series(1, 6000) g;
         SAVEPOINT a;
         UPDATE t SET v = 1 WHERE id <= 5000;
         RELEASE a;
         SAVEPOINT b;
         DELETE FROM t;
         ROLLBACK TO b;
         UPDATE t SET v = v + 1 WHERE id > 5990;
         COMMIT",
    );
    assert!(n1.query_i64("SELECT count(*) FROM trompe.log") >= 3, "a large transaction is written in chunks");
    assert_eq!(n1.query_i64("SELECT count(*) FROM trompe.log_changes()"), 6000 + 5000 + 10);
    assert_eq!(n1.query_i64("SELECT count(DISTINCT txid) FROM trompe.log"), 1);
    cluster.wait_sync(Duration::from_secs(60));
    cluster.assert_same("SELECT count(*) || ':' || sum(v) FROM t");
    assert_eq!(cluster.node(1).query_text("SELECT count(*) || ':' || sum(v) FROM t").as_deref(), Some("6000:5010"));
}

/// The version a logged change says it replaced is exactly the commit time and node PostgreSQL
/// recorded for the row it replaced: for rows written here (also in a subtransaction), rows
/// applied from a peer, and rows written before their table was replicated (whose commits
/// trompe did not see; trompe's commit time cache only ever answers for commits it recorded).
#[test]
fn replaced_versions_are_the_commit_times_postgresql_recorded() {
    replaced_versions_match("capture-replaced-versions", "1048576");
}

/// The same with trompe's commit time cache turned off: every lookup asks PostgreSQL.
#[test]
fn replaced_versions_are_right_without_the_commit_time_cache() {
    replaced_versions_match("capture-replaced-versions-uncached", "0");
}

fn replaced_versions_match(name: &str, commit_time_cache: &str) {
    let cluster = Cluster::builder(name).nodes(2).setting("trompe.commit_time_cache", commit_time_cache).start();
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    assert_eq!(n1.query_text("SHOW trompe.commit_time_cache").as_deref(), Some(commit_time_cache));
    n1.exec("CREATE TABLE early (id int PRIMARY KEY, v text); INSERT INTO early VALUES (1, 'before add_table')");
    n1.exec("SELECT trompe.add_table('early')");
    for n in [n1, n2] {
        n.exec("CREATE TABLE t (id int PRIMARY KEY, v text); SELECT trompe.add_table('t')");
    }
    cluster.add_peer(0, 1);
    n2.exec("INSERT INTO t VALUES (1, 'applied')");
    n1.wait_for_value("SELECT count(*) FROM t", "1", Duration::from_secs(60));
    n1.exec("INSERT INTO t VALUES (2, 'local')");
    n1.exec("BEGIN; SAVEPOINT s; INSERT INTO t VALUES (3, 'subtransaction'); RELEASE s; COMMIT");
    n1.exec("INSERT INTO t VALUES (4, 'updated twice'); UPDATE t SET v = 'updated once' WHERE id = 4");
    let versions = "SELECT string_agg(format('%s %s@%s', id,
                (extract(epoch FROM c.timestamp - timestamptz '2000-01-01 00:00:00+00') * 1000000)::bigint,
                coalesce(p.node_id, trompe.node_id())), ',' ORDER BY id)
           FROM {table}, pg_xact_commit_timestamp_origin(xmin) c
           LEFT JOIN pg_replication_origin o ON o.roident = c.roident
           LEFT JOIN trompe.peers p ON trompe._origin_name(p.node_id) = o.roname";
    let expected_t = n1.query_text(&versions.replace("{table}", "t")).expect("versions of t");
    let expected_early = n1.query_text(&versions.replace("{table}", "early")).expect("versions of early");
    assert!(expected_t.contains(&n2.query_text("SELECT trompe.node_id()").expect("n2's id")), "{expected_t}");

    n1.exec("UPDATE t SET v = v || '!'; UPDATE early SET v = v || '!'");
    let logged = "SELECT string_agg(format('%s %s', vals[1], old_version), ',' ORDER BY vals[1]::int)
                    FROM trompe.log_changes() WHERE op = 'U' AND rel = '{table}' AND vals[2] LIKE '%!'";
    assert_eq!(n1.query_text(&logged.replace("{table}", "t")).as_deref(), Some(expected_t.as_str()));
    assert_eq!(n1.query_text(&logged.replace("{table}", "early")).as_deref(), Some(expected_early.as_str()));
}
