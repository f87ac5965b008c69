//! Applied updates and deletes racing what happens on the node meanwhile: a local transaction
//! holding the same row, a collision on a unique column other than the key, DDL that changes or
//! rewrites the table. Nothing committed locally is lost, and the nodes converge.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use trompe_tests::{checksum, wait_for, Cluster, Node};

const SYNC: Duration = Duration::from_secs(120);

fn setup(name: &str) -> Cluster {
    let cluster = Cluster::start(name, 2);
    cluster.exec_all("CREATE TABLE t (id int PRIMARY KEY, v text, u int UNIQUE); SELECT trompe.add_table('t')");
    cluster.mesh();
    cluster.node(0).exec("INSERT INTO t SELECT g, 'base', NULL FROM generate_series(1, 10) g");
    cluster.wait_sync(SYNC);
    cluster
}

/// Waits until the apply worker of `node` waits for a row lock held by a local transaction.
fn wait_for_blocked_apply(node: &Node) {
    let blocked = "SELECT count(*) FROM pg_stat_activity
                    WHERE wait_event_type = 'Lock' AND backend_type <> 'client backend'";
    assert!(wait_for(SYNC, || node.query_i64(blocked) > 0), "the apply never waited for the local row lock");
}

fn v_of(node: &Node, id: i32) -> Option<String> {
    node.query_text(&format!("SELECT coalesce((SELECT v FROM t WHERE id = {id}), '<none>')")).filter(|v| v != "<none>")
}

fn winners(node: &Node, kind: &str, id: i32) -> String {
    node.query_text(&format!(
        "SELECT coalesce(string_agg(winner, ',' ORDER BY id), '') FROM trompe.conflicts
          WHERE table_name = 'public.t' AND kind = '{kind}' AND key @> '{{\"id\": \"{id}\"}}'::jsonb"
    ))
    .unwrap_or_default()
}

/// A remote update meets a row a local transaction has updated and not committed: the apply
/// waits for it, then decides against the committed local version (newer: it stays, on both
/// nodes); a local transaction that rolls back leaves the row to the remote update.
#[test]
fn an_applied_update_waits_for_a_local_writer_and_decides_against_its_commit() {
    let cluster = setup("race-update");
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    let mut local = n2.connect();
    local.batch_execute("BEGIN; UPDATE t SET v = 'local' WHERE id = 1").unwrap();
    n1.exec("UPDATE t SET v = 'remote' WHERE id = 1");
    wait_for_blocked_apply(n2);
    local.batch_execute("COMMIT").unwrap();
    cluster.wait_sync(SYNC);
    assert_eq!(v_of(n1, 1).as_deref(), Some("local"));
    assert_eq!(v_of(n2, 1).as_deref(), Some("local"));
    assert_eq!(winners(n2, "update_update", 1), "local");
    assert_eq!(winners(n1, "update_update", 1), "remote");

    local.batch_execute("BEGIN; UPDATE t SET v = 'rolled back' WHERE id = 2").unwrap();
    n1.exec("UPDATE t SET v = 'remote' WHERE id = 2");
    wait_for_blocked_apply(n2);
    local.batch_execute("ROLLBACK").unwrap();
    cluster.wait_sync(SYNC);
    assert_eq!(v_of(n2, 2).as_deref(), Some("remote"));
    assert_eq!(winners(n2, "update_update", 2), "");
    cluster.assert_same(&checksum("t"));
}

/// A remote delete meets a row a local transaction has updated and not committed: the local
/// update commits after the delete's origin committed, so it wins everywhere (the row comes
/// back on the deleting node too).
#[test]
fn an_applied_delete_waits_for_a_local_writer_and_loses_to_its_newer_update() {
    let cluster = setup("race-delete");
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    let mut local = n2.connect();
    local.batch_execute("BEGIN; UPDATE t SET v = 'kept' WHERE id = 3").unwrap();
    n1.exec("DELETE FROM t WHERE id = 3");
    wait_for_blocked_apply(n2);
    local.batch_execute("COMMIT").unwrap();
    cluster.wait_sync(SYNC);
    assert_eq!(v_of(n2, 3).as_deref(), Some("kept"));
    assert_eq!(v_of(n1, 3).as_deref(), Some("kept"));
    assert_eq!(winners(n2, "delete_update", 3), "local");

    // A delete the local transaction does not hold back: removed everywhere, with a tombstone.
    local.batch_execute("BEGIN; UPDATE t SET v = 'rolled back' WHERE id = 4").unwrap();
    n1.exec("DELETE FROM t WHERE id = 4");
    wait_for_blocked_apply(n2);
    local.batch_execute("ROLLBACK").unwrap();
    cluster.wait_sync(SYNC);
    assert_eq!(v_of(n2, 4), None);
    assert_eq!(n2.query_i64("SELECT count(*) FROM trompe.tombstones WHERE key = '{4}'"), 1);
    cluster.assert_same(&checksum("t"));
}

/// Two nodes update different rows to the same value of a unique column other than the key:
/// the later update keeps the value, the older row is removed everywhere, both record it.
#[test]
fn updates_colliding_on_a_unique_column_resolve_the_same_way_everywhere() {
    let cluster = setup("race-unique");
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    cluster.partition(0, 1);
    n1.exec("UPDATE t SET u = 7, v = 'n1' WHERE id = 5");
    n2.exec("UPDATE t SET u = 7, v = 'n2' WHERE id = 6");
    cluster.heal_pair(0, 1);
    cluster.wait_sync(SYNC);
    cluster.assert_same(&checksum("t"));
    assert_eq!(
        cluster.assert_same("SELECT string_agg(format('%s:%s', id, v), ' ' ORDER BY id) FROM t WHERE u = 7").as_deref(),
        Some("6:n2")
    );
    for node in cluster.nodes() {
        assert!(!winners(node, "unique_violation", 5).is_empty() || !winners(node, "unique_violation", 6).is_empty());
    }
}

/// One node streams updates and deletes while the other adds a column, changes a column's type
/// (a rewrite), rewrites the table again and drops the column: every change is applied to the
/// table as it is when it arrives, and the nodes end identical.
#[test]
fn updates_and_deletes_racing_ddl_converge() {
    let cluster = Cluster::start("race-ddl", 2);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    cluster.exec_all("CREATE TABLE d (id int PRIMARY KEY, v text, n int NOT NULL); SELECT trompe.add_table('d')");
    cluster.mesh();
    n1.exec("INSERT INTO d SELECT g, 'base', 0 FROM generate_series(1, 400) g");
    cluster.wait_sync(SYNC);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut c = n1.connect();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) && i < 3000 {
                i += 1;
                let id = (i * 37) % 400 + 1;
                let sql = if i % 11 == 0 {
                    format!("DELETE FROM d WHERE id = {id}")
                } else {
                    format!("UPDATE d SET n = n + 1, v = 'w{i}' WHERE id = {id}")
                };
                c.batch_execute(&sql).unwrap();
            }
            i
        });
        for ddl in [
            "ALTER TABLE d ADD COLUMN w int DEFAULT 5",
            "ALTER TABLE d ALTER COLUMN n TYPE bigint",
            "VACUUM FULL d",
            "ALTER TABLE d ALTER COLUMN v TYPE varchar(40)",
            "ALTER TABLE d DROP COLUMN w",
        ] {
            std::thread::sleep(Duration::from_millis(300));
            n2.exec(ddl);
        }
        stop.store(true, Ordering::Relaxed);
        let written = writer.join().unwrap();
        assert!(written > 10, "the writer wrote {written} changes");
    });
    cluster.wait_sync(SYNC);
    cluster.assert_same(&checksum("d"));
    cluster.assert_same(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'd'::regclass AND attname = 'n'",
    );
    assert_eq!(n1.query_i64("SELECT count(*) FROM d"), n2.query_i64("SELECT count(*) FROM d"));
}
