//! Trust between nodes: each node pulls with a login of its own, and that login can act only
//! for its node. Another node's login, or any other member of `trompe_puller`, can neither
//! pull, confirm, register, resume, unregister nor read for it; a joining node's registrations
//! wait for its own secret; changing or removing a peer loses nothing and leaves what other
//! nodes pull alone.

use std::time::Duration;

use postgres::{Client, NoTls};
use trompe_tests::node::TEST_DB;
use trompe_tests::{checksum, expect_error, wait_for, Cluster, Node};

const SYNC: Duration = Duration::from_secs(120);

/// On every node: a login per node (`node_n1`, …, members of `trompe_puller` who may read the
/// tables for a join), a puller login no node uses (`evil`), an administrator login (`dba`);
/// and table `t` on the first `with_table` nodes.
fn logins_everywhere(cluster: &Cluster, with_table: usize) {
    let mut roles = String::new();
    for node in cluster.nodes() {
        roles += &format!("CREATE ROLE node_{} LOGIN IN ROLE trompe_puller, pg_read_all_data;", node.name);
    }
    for (i, node) in cluster.nodes().iter().enumerate() {
        node.exec(&format!(
            "{roles}
             CREATE ROLE evil LOGIN IN ROLE trompe_puller;
             CREATE ROLE dba LOGIN IN ROLE trompe_admin;"
        ));
        if i < with_table {
            node.exec("CREATE TABLE t (id int PRIMARY KEY, v text, doc oid); SELECT trompe.add_table('t')");
        }
    }
}

/// The connection string node `from` reaches node `to` with, as `from`'s own login.
fn own_login(cluster: &Cluster, from: usize, to: usize) -> String {
    format!(
        "host=127.0.0.1 port={} dbname={TEST_DB} user=node_{}",
        cluster.link(from, to).port,
        cluster.node(from).name
    )
}

/// Makes node `from` pull from node `to` with `from`'s own login.
fn add_peer(cluster: &Cluster, from: usize, to: usize) {
    let conninfo = own_login(cluster, from, to);
    cluster.node(from).exec(&format!("SELECT trompe.add_peer('{}', '{conninfo}')", cluster.node(to).name));
}

/// A client on `node` logged in as `user`.
fn login(node: &Node, user: &str) -> Client {
    Client::connect(&format!("host=127.0.0.1 port={} dbname={TEST_DB} user={user}", node.port), NoTls)
        .unwrap_or_else(|e| panic!("{user} connects to {}: {e}", node.name))
}

/// Asserts that `sql` fails with permission denied (42501), with a message containing `needle`.
fn denied(client: &mut Client, sql: &str, needle: &str) {
    let (code, message) = expect_error(client, sql);
    assert_eq!(code, "42501", "`{sql}` failed with {code}: {message}");
    assert!(message.contains(needle), "`{sql}`: {message:?} does not mention {needle:?}");
}

/// The registration of node `id` on `node`, in full.
fn registration(node: &Node, id: &str) -> String {
    node.query_text(&format!(
        "SELECT format('%s %s %s %s', trompe.consumer_confirmed(node_id), logins, claim, registered_at)
           FROM trompe.consumers WHERE node_id = '{id}'"
    ))
    .unwrap_or_default()
}

fn node_id(node: &Node) -> String {
    node.query_text("SELECT trompe.node_id()").unwrap_or_default()
}

#[test]
fn a_login_acts_only_for_its_own_node() {
    let cluster = Cluster::start("trust-logins", 3);
    logins_everywhere(&cluster, 3);
    for from in 0..3 {
        for to in (0..3).filter(|to| *to != from) {
            add_peer(&cluster, from, to);
        }
    }
    let (n1, n2, n3) = (cluster.node(0), cluster.node(1), cluster.node(2));
    n1.exec("INSERT INTO t VALUES (1, 'before', lo_from_bytea(0, 'secret document'))");
    cluster.wait_sync(SYNC);
    let (id2, id3) = (node_id(n2), node_id(n3));
    assert_eq!(
        n1.query_text(&format!("SELECT logins::text FROM trompe.consumers WHERE node_id = '{id3}'")).as_deref(),
        Some("{node_n3}"),
        "a registration records the login it came with"
    );
    // n3 stops pulling n1 meanwhile: its registration there holds still.
    n3.exec("SELECT trompe.pause_peer('n1')");
    n1.wait_for_value("SELECT count(*) FROM pg_stat_activity WHERE usename = 'node_n3'", "0", SYNC);
    let before = registration(n1, &id3);
    let position = n1.query_text(&format!("SELECT trompe.consumer_confirmed('{id3}')")).unwrap_or_default();
    let lo = n1.query_text("SELECT doc FROM t WHERE id = 1").unwrap_or_default();

    // Another node's login, and a puller login no node uses, act for n3 in every way.
    for user in ["node_n2", "evil"] {
        let mut c = login(n1, user);
        for sql in [
            format!("SELECT * FROM trompe.pull('{id3}', '{position}', NULL, 0, 10, 0, -1, '{position}')"),
            format!("SELECT trompe.unregister_consumer('{id3}')"),
            format!("SELECT * FROM trompe.register_consumer('{id3}', 'app')"),
            format!("SELECT * FROM trompe.resume_consumer('{id3}', 'app', '{position}')"),
            format!("SELECT trompe.consumer_confirmed('{id3}')"),
            format!("SELECT trompe.claim_consumer('{id3}', 'a guess')"),
            format!("SELECT trompe.sync_register('{id3}', 'app')"),
            format!("SELECT trompe.register_consumer_from(gen_random_uuid(), 'app', '{id3}')"),
        ] {
            denied(&mut c, &sql, &id3);
        }
        // n2's login registers nodes from its own position only, and never over n3's.
        let over = if user == "node_n2" { &id3 } else { &id2 };
        denied(&mut c, &format!("SELECT trompe.register_consumer_from('{id3}', 'app', '{id2}')"), over);
        for sql in [
            format!("SELECT trompe.drop_consumer('{id3}')"),
            format!("SELECT trompe.set_consumer_logins('{id3}', '{{evil}}')"),
        ] {
            denied(&mut c, &sql, "permission denied for function");
        }
    }
    // A login no node pulls with reads nothing either.
    let mut evil = login(n1, "evil");
    for sql in [
        format!("SELECT * FROM trompe.lo_chunk('{}', {lo}, 0, 100)", node_id(n1)),
        "SELECT * FROM trompe.table_digest('t', 4)".to_string(),
        "SELECT * FROM trompe._row_digests('t', 4)".to_string(),
        "SELECT * FROM trompe.fetch_rows('t', '{}')".to_string(),
        "SELECT trompe.sync_rows_sql('t')".to_string(),
        "SELECT * FROM trompe.sync_removals()".to_string(),
        "SELECT * FROM trompe.sync_source()".to_string(),
        format!("SELECT trompe.pending_changes('{position}', NULL, 0, '{position}')"),
    ] {
        denied(&mut evil, &sql, "\"evil\" is not registered for any node");
    }
    assert_eq!(registration(n1, &id3), before, "nothing changed");
    // What such a login can do: register a node no login has registered yet, which is then
    // that login's.
    let newcomer = "7a3c0c55-2b4e-4c1e-9a51-6f0e7e5d0b11";
    evil.batch_execute(&format!("SELECT * FROM trompe.register_consumer('{newcomer}', 'app')")).expect("a new node");
    assert_eq!(
        n1.query_text(&format!("SELECT logins::text FROM trompe.consumers WHERE node_id = '{newcomer}'")).as_deref(),
        Some("{evil}")
    );
    denied(&mut login(n1, "node_n2"), &format!("SELECT trompe.unregister_consumer('{newcomer}')"), newcomer);
    n1.exec(&format!("SELECT trompe.drop_consumer('{newcomer}')"));
    // Users who are neither pullers nor administrators call none of it.
    n1.exec("CREATE ROLE plain LOGIN");
    let mut plain = login(n1, "plain");
    for function in [
        "alter_peer('n2', 'host=localhost')".to_string(),
        format!("drop_consumer('{id3}')"),
        format!("set_consumer_logins('{id3}', NULL)"),
        format!("resume_consumer('{id3}', 'app', '{position}')"),
        format!("claim_consumer('{id3}', 'x')"),
        format!("sync_register('{id3}', 'app', 'x')"),
        format!("register_consumer_from('{id3}', 'app', '{id2}', 'x')"),
    ] {
        let name = function.split('(').next().unwrap_or_default().to_string();
        denied(
            &mut plain,
            &format!("SELECT * FROM trompe.{function}"),
            &format!("permission denied for function {name}"),
        );
    }

    // Each login acts for its own node; superusers and administrators for every node.
    let mut own = login(n1, "node_n3");
    let got: Option<String> = own.query_one(&format!("SELECT trompe.consumer_confirmed('{id3}')"), &[]).unwrap().get(0);
    assert_eq!(got.as_deref(), Some(position.as_str()));
    let digest = own.query("SELECT * FROM trompe.table_digest('t', 4)", &[]).expect("a node's login reads for compare");
    assert!(!digest.is_empty());
    let got: Option<String> =
        login(n1, "postgres").query_one(&format!("SELECT trompe.consumer_confirmed('{id3}')"), &[]).unwrap().get(0);
    assert!(got.is_some(), "a superuser reads n3's position");
    n3.exec("SELECT trompe.resume_peer('n1')");
    n1.exec("INSERT INTO t VALUES (2, 'after')");
    cluster.wait_sync(SYNC);
    cluster.assert_same(&checksum("(SELECT id, v FROM t)"));

    // Only an administrator removes another node's registration; n3's stream from n1 then
    // stops, saying why.
    let dropped: bool =
        login(n1, "dba").query_one(&format!("SELECT trompe.drop_consumer('{id3}')"), &[]).unwrap().get(0);
    assert!(dropped);
    n1.exec("INSERT INTO t VALUES (3, 'after the drop')");
    n3.wait_for_value(
        "SELECT last_error LIKE '%not registered as a consumer%(SQLSTATE 55000 at the peer)%' FROM trompe.status WHERE name = 'n1'",
        "t",
        SYNC,
    );
}

/// Positions a node's own login sends are checked: never ahead of what this node served,
/// confirmations never ahead of the pull's position, and never backwards.
#[test]
fn confirmed_positions_are_checked() {
    let cluster = Cluster::start("trust-positions", 2);
    logins_everywhere(&cluster, 2);
    add_peer(&cluster, 0, 1);
    add_peer(&cluster, 1, 0);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    n1.exec("INSERT INTO t VALUES (1, 'x')");
    cluster.wait_sync(SYNC);
    // n2's worker stops pulling n1: its login is the test's now.
    n2.exec("SELECT trompe.pause_peer('n1')");
    n1.wait_for_value("SELECT count(*) FROM pg_stat_activity WHERE usename = 'node_n2'", "0", SYNC);
    let id2 = node_id(n2);
    let mut c = login(n1, "node_n2");
    let confirmed = |c: &mut Client| -> String {
        c.query_one(&format!("SELECT trompe.consumer_confirmed('{id2}')"), &[]).unwrap().get(0)
    };
    let at = confirmed(&mut c);
    let xmax: u64 = n1.query_text("SELECT pg_snapshot_xmax(pg_current_snapshot())").unwrap().parse().unwrap();
    let ahead = format!("{0}:{0}:", xmax + 1000);
    let pull = |done: &str, confirmed: &str| {
        format!("SELECT count(*) FROM trompe.pull('{id2}', '{done}', NULL, 0, 10, 0, -1, '{confirmed}')")
    };
    for (sql, needle) in [(pull(&ahead, &at), "ahead of this node"), (pull(&at, &ahead), "ahead of the position")] {
        let (code, message) = expect_error(&mut c, &sql);
        assert_eq!(code, "08P01", "{sql}: {message}");
        assert!(message.contains(needle), "{sql}: {message}");
    }
    // An older confirmation is ignored; a position older than what was confirmed is refused.
    c.batch_execute(&pull(&at, "1:1:")).expect("pull with an old confirmation");
    assert_eq!(confirmed(&mut c), at, "the confirmed position does not go back");
    let (code, message) = expect_error(&mut c, &pull("1:1:", "1:1:"));
    assert_eq!(code, "55000", "{message}");
    assert_eq!(confirmed(&mut c), at);
    n2.exec("SELECT trompe.resume_peer('n1')");
    n1.exec("INSERT INTO t VALUES (2, 'y')");
    cluster.wait_sync(SYNC);
    cluster.assert_same(&checksum("(SELECT id, v FROM t)"));
}

/// A node joining through n1 is registered on n2 by n1; until it adds n2 itself (presenting its
/// secret), no other login can act for that registration, and nothing written meanwhile is lost.
#[test]
fn a_joining_node_claims_its_registrations_with_its_secret() {
    let cluster = Cluster::start("trust-join", 3);
    logins_everywhere(&cluster, 2);
    add_peer(&cluster, 0, 1);
    add_peer(&cluster, 1, 0);
    let (n1, n2, n3) = (cluster.node(0), cluster.node(1), cluster.node(2));
    n1.exec("INSERT INTO t SELECT g, 'n1' FROM generate_series(1, 50) g");
    n2.exec("INSERT INTO t SELECT g, 'n2' FROM generate_series(51, 100) g");
    for node in [n1, n2] {
        assert_eq!(node.query_text("SELECT trompe.wait_sync('2 minutes')").as_deref(), Some("t"));
    }
    n3.exec(&format!("SELECT trompe.add_peer('n1', '{}', sync => true)", own_login(&cluster, 2, 0)));
    n3.wait_for_value("SELECT sync_state FROM trompe.status WHERE name = 'n1'", "done", SYNC);
    let id3 = node_id(n3);
    let pending = format!("SELECT logins IS NULL AND claim IS NOT NULL FROM trompe.consumers WHERE node_id = '{id3}'");
    assert_eq!(n2.query_text(&pending).as_deref(), Some("t"), "n1 registered n3 on n2, to be claimed");
    n2.exec("INSERT INTO t SELECT g, 'n2 while n3 joins' FROM generate_series(101, 120) g");
    let before = registration(n2, &id3);
    let position = n2.query_text(&format!("SELECT trompe.consumer_confirmed('{id3}')")).unwrap_or_default();
    for user in ["node_n1", "evil"] {
        let mut c = login(n2, user);
        for sql in [
            format!("SELECT * FROM trompe.pull('{id3}', '{position}', NULL, 0, 10, 0, -1, '{position}')"),
            format!("SELECT trompe.consumer_confirmed('{id3}')"),
            format!("SELECT trompe.unregister_consumer('{id3}')"),
            format!("SELECT trompe.claim_consumer('{id3}', 'a guess')"),
            format!("SELECT * FROM trompe.register_consumer('{id3}', 'app')"),
            format!("SELECT * FROM trompe.resume_consumer('{id3}', 'app', '{position}')"),
        ] {
            denied(&mut c, &sql, &id3);
        }
    }
    assert_eq!(registration(n2, &id3), before, "nothing changed");
    add_peer(&cluster, 2, 1);
    assert_eq!(
        n2.query_text(&format!(
            "SELECT logins::text || coalesce(claim, '') FROM trompe.consumers WHERE node_id = '{id3}'"
        ))
        .as_deref(),
        Some("{node_n3}"),
        "n3 claimed its registration"
    );
    add_peer(&cluster, 0, 2);
    add_peer(&cluster, 1, 2);
    n3.exec("INSERT INTO t VALUES (200, 'n3')");
    cluster.wait_sync(SYNC);
    assert_eq!(cluster.assert_same("SELECT count(*) FROM t").as_deref(), Some("121"));
    cluster.assert_same(&checksum("(SELECT id, v FROM t)"));
}

/// `alter_peer` changes a connection string in place: checked first (same node, a login the
/// peer accepts for this node), then the worker reconnects and resumes; nothing written
/// meanwhile is lost and no registration changes.
#[test]
fn alter_peer_changes_the_connection_string_in_place() {
    let cluster = Cluster::start("trust-alter", 2);
    logins_everywhere(&cluster, 2);
    add_peer(&cluster, 0, 1);
    add_peer(&cluster, 1, 0);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    n1.exec("CREATE ROLE node_n2_new LOGIN IN ROLE trompe_puller");
    n1.exec("INSERT INTO t VALUES (1, 'before')");
    cluster.wait_sync(SYNC);
    let registered = |node: &Node| {
        node.query_text("SELECT string_agg(node_id || ' ' || registered_at, ',') FROM trompe.consumers")
            .unwrap_or_default()
    };
    let (registered_n1, registered_n2) = (registered(n1), registered(n2));
    let old = own_login(&cluster, 1, 0);
    let mut c = n2.connect();
    for (sql, code, needle) in [
        ("SELECT trompe.alter_peer('nobody', 'host=localhost')".to_string(), "42704", "does not exist"),
        (format!("SELECT trompe.alter_peer('n1', '{}')", n2.conninfo()), "22023", "reaches node"),
        (
            format!("SELECT trompe.alter_peer('n1', '{} user=node_n2_new')", old),
            "42501",
            "does not accept this login for this node",
        ),
    ] {
        let (got, message) = expect_error(&mut c, &sql);
        assert_eq!(got, code, "{sql}: {message}");
        assert!(message.contains(needle), "{sql}: {message}");
        assert_eq!(n2.query_text("SELECT conninfo FROM trompe.peers WHERE name = 'n1'").as_deref(), Some(old.as_str()));
    }
    // The login switches: n1's administrator lists both, then n2 changes its connection string.
    let id2 = node_id(n2);
    n1.exec(&format!("SELECT trompe.set_consumer_logins('{id2}', '{{node_n2,node_n2_new}}')"));
    n1.exec("INSERT INTO t VALUES (2, 'while switching')");
    n2.exec(&format!("SELECT trompe.alter_peer('n1', '{old} user=node_n2_new')"));
    n1.exec("INSERT INTO t VALUES (3, 'after')");
    cluster.wait_sync(SYNC);
    assert_eq!(n2.query_text("SELECT string_agg(id::text, ',' ORDER BY id) FROM t").as_deref(), Some("1,2,3"));
    n1.wait_for_value("SELECT count(*) FROM pg_stat_activity WHERE usename = 'node_n2_new'", "1", SYNC);
    assert_eq!(n1.query_i64("SELECT count(*) FROM pg_stat_activity WHERE usename = 'node_n2'"), 0);
    assert_eq!(registered(n1), registered_n1, "n2's registration on n1 is the same");
    assert_eq!(registered(n2), registered_n2, "n1's registration on n2 is untouched");
    assert_eq!(n2.query_i64("SELECT count(*) FROM trompe.status WHERE state = 'connected' AND last_error IS NULL"), 1);
}

/// A peer removed for so long that its log moved on cannot be added again without losing
/// changes: `add_peer` refuses (55000) and changes nothing.
#[test]
fn re_adding_a_peer_whose_log_moved_on_is_refused() {
    let cluster =
        Cluster::builder("trust-readd-lost").nodes(2).setting("trompe.log_rotation_interval", "'100ms'").start();
    logins_everywhere(&cluster, 2);
    add_peer(&cluster, 0, 1);
    add_peer(&cluster, 1, 0);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    n1.exec("INSERT INTO t VALUES (1, 'before')");
    cluster.wait_sync(SYNC);
    let id1 = node_id(n1);
    n2.exec("SELECT trompe.remove_peer('n1')");
    let kept_xmin: u64 = n2
        .query_text(&format!("SELECT split_part(done, ':', 1) FROM trompe.progress WHERE node_id = '{id1}'"))
        .unwrap_or_default()
        .parse()
        .expect("n2 keeps its position");
    // n1 writes on; nobody keeps its log for n2 any more, so it is truncated past n2's position.
    let mut next = 100;
    let moved_on = wait_for(SYNC, || {
        next += 1;
        n1.exec(&format!("INSERT INTO t VALUES ({next}, 'while removed')"));
        n1.query_text("SELECT max(truncated_through)::text FROM trompe.log_rotation")
            .and_then(|t| t.parse::<u64>().ok())
            .is_some_and(|t| t >= kept_xmin)
    });
    assert!(moved_on, "n1 truncated its log past n2's position");
    let (code, message) =
        expect_error(&mut n2.connect(), &format!("SELECT trompe.add_peer('n1', '{}')", own_login(&cluster, 1, 0)));
    assert_eq!(code, "55000", "{message}");
    assert!(message.contains("no longer keeps its log from where this node stopped"), "{message}");
    assert_eq!(n2.query_i64("SELECT count(*) FROM trompe.peers"), 0, "nothing changed");
    assert_eq!(n1.query_i64(&format!("SELECT count(*) FROM trompe.consumers WHERE node_id = '{}'", node_id(n2))), 0);
    assert_eq!(n2.query_i64(&format!("SELECT count(*) FROM trompe.progress WHERE node_id = '{id1}'")), 1);
    // What n1 pulls from n2 never stopped.
    n2.exec("INSERT INTO t VALUES (1000, 'from n2')");
    n1.wait_for_value("SELECT count(*) FROM t WHERE id = 1000", "1", SYNC);
}

/// `remove_peer` + `add_peer` of the same node while both nodes write and the link is
/// blackholed in the middle of a pull (the pull hangs, the worker gives up on it): n2 resumes
/// from where it stopped, with every row n1 wrote meanwhile, none twice; n1 keeps pulling from
/// n2 throughout, on the registration it had.
#[test]
fn re_adding_a_peer_under_load_with_a_pull_hanging_loses_nothing() {
    let cluster = Cluster::start("trust-readd-load", 2);
    logins_everywhere(&cluster, 2);
    add_peer(&cluster, 0, 1);
    add_peer(&cluster, 1, 0);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    n1.exec("INSERT INTO t VALUES (0, 'before')");
    cluster.wait_sync(SYNC);
    let id1 = node_id(n1);
    let registered_at = |node: &Node, id: &str| {
        node.query_text(&format!("SELECT registered_at::text FROM trompe.consumers WHERE node_id = '{id}'"))
    };
    let n1_on_n2 = registered_at(n2, &id1);
    assert!(n1_on_n2.is_some());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = [(n1.conninfo(), 1), (n2.conninfo(), 2)]
        .into_iter()
        .map(|(conninfo, node)| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&conninfo, NoTls).expect("writer connects");
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    // Keys of their own (odd on n1, even on n2), however many batches run: the
                    // writers go on for as long as remove_peer waits for the blackholed link.
                    c.execute(
                        "INSERT INTO t SELECT 2 * g + $1, 'load' FROM generate_series($2 * 10, $2 * 10 + 9) g",
                        &[&node, &i],
                    )
                    .expect("writer inserts");
                }
                i
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // A pull in flight hangs: the link swallows everything.
    cluster.link(1, 0).blackhole();
    std::thread::sleep(Duration::from_millis(1500));
    n2.exec("SELECT trompe.remove_peer('n1')");
    cluster.link(1, 0).heal();
    std::thread::sleep(Duration::from_millis(500));
    n2.exec(&format!("SELECT trompe.add_peer('n1', '{}')", own_login(&cluster, 1, 0)));
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let batches: Vec<i32> = writers.into_iter().map(|w| w.join().expect("writer")).collect();
    assert!(batches.iter().all(|&b| b > 5), "both nodes wrote throughout: {batches:?}");
    cluster.wait_sync(SYNC);
    let expected = 1 + 10 * batches.iter().map(|&b| i64::from(b)).sum::<i64>();
    for node in cluster.nodes() {
        assert_eq!(node.query_i64("SELECT count(*) FROM t"), expected, "{} has every row", node.name);
    }
    cluster.assert_same(&checksum("(SELECT id, v FROM t)"));
    assert_eq!(registered_at(n2, &id1), n1_on_n2, "n1's registration on n2 was never touched");
    for node in cluster.nodes() {
        assert_eq!(
            node.query_i64("SELECT count(*) FROM trompe.status WHERE state = 'connected' AND last_error IS NULL"),
            1,
            "{} pulls without error",
            node.name
        );
    }
}
