//! Talking to peers: a refused login is recognised whatever language the servers speak, and a
//! query on a peer that does not answer in time is cancelled without ever blocking the caller.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use trompe_tests::{expect_error, Cluster, Node};

/// Servers answering in German (`lc_messages` is `C.UTF-8` in every test node; `LANGUAGE`
/// then picks the translation, for the server and for libpq in the worker): a wrong password
/// is still a refused login (28000), not an unreachable peer.
#[test]
fn a_refused_login_is_recognised_in_any_language() {
    let cluster = Cluster::builder("login-german").nodes(2).env("LANGUAGE", "de").start();
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    n2.exec("CREATE ROLE alice LOGIN PASSWORD 'right-password'");
    let hba = n2.datadir.join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).expect("pg_hba.conf");
    std::fs::write(&hba, format!("host all alice 127.0.0.1/32 scram-sha-256\n{old}")).expect("pg_hba.conf");
    n2.exec("SELECT pg_reload_conf()");
    let good = cluster.peer_conninfo(0, 1);
    let (code, message) = expect_error(
        &mut n1.connect(),
        &format!("SELECT trompe.add_peer('n2', '{good} user=alice password=wrong-one')"),
    );
    // The server's own text is German where its build has translations (PostgreSQL builds
    // without NLS answer in English); libpq's part is German in any case.
    assert!(
        message.contains("Passwort-Authentifizierung") || message.contains("fehlgeschlagen"),
        "the peer or libpq answered in German: {message}"
    );
    assert_eq!(code, "28000", "{message}");
    assert!(message.contains("refused the login"), "{message}");
    assert!(!message.contains("auth.c") && !message.contains("28P01"), "no verbose details: {message}");
    let (code, message) =
        expect_error(&mut n1.connect(), &format!("SELECT trompe.add_peer('n2', '{good} user=alice')"));
    assert_eq!(code, "28000", "no password given: {message}");
    let (code, message) =
        expect_error(&mut n1.connect(), &format!("SELECT trompe.add_peer('n2', '{good} dbname=nosuchdb')"));
    assert_eq!(code, "08001", "a missing database is no login problem: {message}");
}

/// n2 pulls from n1 but cannot apply what n1 sends (a table replicated on n1 only), so it is
/// never caught up and `trompe.wait_sync` on n2 keeps asking n1 how far behind it is.
fn stuck_pair(name: &str) -> Cluster {
    let cluster = Cluster::start(name, 2);
    cluster.exec_all("CREATE TABLE only_n1 (id int PRIMARY KEY)");
    cluster.node(0).exec("SELECT trompe.add_table('only_n1')");
    cluster.add_peer(1, 0);
    cluster.node(0).exec("INSERT INTO only_n1 VALUES (1)");
    cluster.node(1).wait_for_value(
        "SELECT last_error LIKE '%not replicated on this node%' FROM trompe.status",
        "t",
        Duration::from_secs(60),
    );
    cluster
}

/// Runs `trompe.wait_sync(timeout)` on `node` in a thread; the receiver gets its answer.
fn wait_sync_in_background(node: &Node, timeout: &str) -> mpsc::Receiver<Option<String>> {
    let mut client = node.connect();
    let sql = format!("SELECT trompe.wait_sync('{timeout}')::text");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let answer = client.query_one(&sql, &[]).ok().and_then(|r| r.get::<_, Option<String>>(0));
        let _ = tx.send(answer);
    });
    rx
}

/// The link to the peer starts dropping every packet while a query is on its way: the query
/// times out, and its cancel (which also goes nowhere) gives up in time. libpq's `PQcancel`
/// waited for the peer's answer to the cancel request, forever.
#[test]
fn a_query_on_a_peer_behind_a_dead_link_is_given_up_in_time() {
    let cluster = stuck_pair("cancel-blackhole");
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    let started = Instant::now();
    let answer = wait_sync_in_background(n2, "6 seconds");
    // wait_sync is connected and asking n1 over and over: cut the link silently.
    n1.wait_for_value(
        "SELECT count(*) > 0 FROM pg_stat_activity WHERE query LIKE '%pending_changes%' AND pid <> pg_backend_pid()",
        "t",
        Duration::from_secs(30),
    );
    cluster.link(1, 0).blackhole();
    let got = answer.recv_timeout(Duration::from_secs(40)).expect("wait_sync returns although the peer is silent");
    assert_eq!(got.as_deref(), Some("false"));
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    cluster.link(1, 0).heal();
    assert_eq!(n2.query_text("SELECT 1").as_deref(), Some("1"));
}

/// A query that waits on the peer (here for a lock) past its time is cancelled there.
#[test]
fn a_query_that_takes_too_long_is_cancelled_on_the_peer() {
    let cluster = stuck_pair("cancel-lock");
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    let mut holder = n1.connect();
    holder.batch_execute("BEGIN; LOCK TABLE trompe.log IN ACCESS EXCLUSIVE MODE").expect("lock the log");
    let waiting = "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                    WHERE NOT l.granted AND a.query LIKE '%pending_changes%'";
    let answer = wait_sync_in_background(n2, "3 seconds");
    n1.wait_for_value(waiting, "1", Duration::from_secs(30));
    let got = answer.recv_timeout(Duration::from_secs(30)).expect("wait_sync returns");
    assert_eq!(got.as_deref(), Some("false"));
    // The query was cancelled on n1 while the lock is still held.
    n1.wait_for_value(waiting, "0", Duration::from_secs(10));
    holder.batch_execute("ROLLBACK").expect("unlock");
}
