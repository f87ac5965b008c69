//! Ordinary users: their writes to replicated tables replicate, but they can neither administer
//! trompe nor read or forge its log.

use std::time::Duration;

use trompe_tests::node::TEST_DB;
use trompe_tests::{checksum, expect_error, Cluster};

const SYNC: Duration = Duration::from_secs(120);

#[test]
fn plain_users_write_replicated_tables_but_cannot_administer_or_read_the_log() {
    let cluster = Cluster::start("privileges", 2);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    cluster.exec_all(
        "CREATE ROLE plain LOGIN;
         CREATE TABLE t (id int PRIMARY KEY, v text); SELECT trompe.add_table('t');
         GRANT ALL ON t TO plain;
         CREATE TABLE mine (id int PRIMARY KEY)",
    );
    cluster.mesh();
    let mut c = n1.connect();
    c.batch_execute("SET ROLE plain").unwrap();
    c.batch_execute("INSERT INTO t VALUES (1, 'by plain'); UPDATE t SET v = 'by plain, updated'; INSERT INTO t VALUES (2, 'gone'); DELETE FROM t WHERE id = 2")
        .unwrap_or_else(|e| panic!("plain user's writes: {}", trompe_tests::describe_error(&e)));
    for (sql, function) in [
        ("SELECT trompe.add_table('mine')", "add_table"),
        ("SELECT trompe.remove_table('t')", "remove_table"),
        ("SELECT trompe.add_schema('public')", "add_schema"),
        ("SELECT trompe.add_peer('x', 'host=localhost')", "add_peer"),
        ("SELECT trompe.pause_peer('n2')", "pause_peer"),
        ("SELECT trompe.remove_peer('n2')", "remove_peer"),
        ("SELECT trompe.set_conflict_rule('t', 'last_update_wins')", "set_conflict_rule"),
        ("SELECT trompe.set_node_priority(gen_random_uuid(), 1)", "set_node_priority"),
        ("SELECT trompe.set_sequence_slot(1, 16)", "set_sequence_slot"),
        ("SELECT * FROM trompe.log_changes()", "log_changes"),
        ("SELECT * FROM trompe.pull(gen_random_uuid(), '', NULL, 0, 10, 0, 0, '')", "pull"),
    ] {
        let (state, message) = expect_error(&mut c, sql);
        assert_eq!(state, "42501", "{sql}: {message}");
        assert!(message.contains(function), "{sql}: {message}");
    }
    for sql in [
        "SELECT * FROM trompe.log",
        "SELECT * FROM trompe.peers",
        "SELECT * FROM trompe.conflicts",
        "INSERT INTO trompe.tombstones VALUES ('t'::regclass, '{1}')",
    ] {
        let (state, message) = expect_error(&mut c, sql);
        assert_eq!(state, "42501", "{sql}: {message}");
    }
    assert_eq!(n2.query_text("SELECT trompe.wait_sync('60 seconds')").as_deref(), Some("t"));
    cluster.assert_same(&checksum("t"));
    assert_eq!(n2.query_text("SELECT v FROM t").as_deref(), Some("by plain, updated"));
    assert_eq!(
        n1.query_i64("SELECT count(*) FROM trompe.tombstones WHERE key = '{2}'"),
        1,
        "the delete left its tombstone"
    );
}

/// Peers pull through a login role that is only a member of `trompe_puller`: replication works,
/// and that role can do nothing else with trompe.
#[test]
fn peers_pull_with_a_least_privilege_role() {
    let cluster = Cluster::start("puller-role", 2);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    cluster.exec_all(
        "CREATE ROLE puller LOGIN IN ROLE trompe_puller;
         CREATE TABLE t (id int PRIMARY KEY, v text); SELECT trompe.add_table('t')",
    );
    for (from, to) in [(0, 1), (1, 0)] {
        let conninfo = format!("host=127.0.0.1 port={} dbname={} user=puller", cluster.link(from, to).port, TEST_DB);
        cluster.node(from).exec(&format!("SELECT trompe.add_peer('{}', '{conninfo}')", cluster.node(to).name));
    }
    n1.exec("INSERT INTO t VALUES (1, 'from n1')");
    n2.exec("INSERT INTO t VALUES (2, 'from n2')");
    cluster.wait_sync(SYNC);
    assert_eq!(cluster.assert_same(&checksum("t")).as_deref().map(|s| s.starts_with("2:")), Some(true));
    let mut c = n1.connect();
    c.batch_execute("SET ROLE puller").unwrap();
    for sql in
        ["SELECT * FROM trompe.log", "SELECT * FROM trompe.peers", "SELECT trompe.add_table('t')", "SELECT * FROM t"]
    {
        let (state, message) = expect_error(&mut c, sql);
        assert_eq!(state, "42501", "{sql}: {message}");
    }
}

/// Members of `trompe_admin` administer trompe without being superusers.
#[test]
fn trompe_admin_members_administer_without_superuser() {
    let cluster = Cluster::start("admin-role", 1);
    let node = cluster.node(0);
    node.exec(
        "CREATE ROLE dba LOGIN IN ROLE trompe_admin;
         CREATE TABLE t (id bigserial PRIMARY KEY, v text)",
    );
    let mut c = node.connect();
    c.batch_execute(
        "SET ROLE dba;
         SELECT trompe.add_table('t');
         SELECT trompe.set_conflict_rule('t', 'last_update_wins');
         SELECT trompe.set_node_priority(trompe.node_id(), 1);
         SELECT trompe.set_sequence_slot(1, 16);
         SELECT count(*) FROM trompe.status; SELECT count(*) FROM trompe.conflicts; SELECT count(*) FROM trompe.peers;
         SELECT trompe.remove_table('t');",
    )
    .unwrap_or_else(|e| panic!("trompe_admin: {}", trompe_tests::describe_error(&e)));
    let (state, message) = expect_error(&mut c, "SELECT * FROM trompe.log");
    assert_eq!(state, "42501", "{message}");
}
