//! `trompe.add_peer` validation, pause/resume, and `trompe.status`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use trompe_tests::{expect_error, wait_for, Cluster};

/// Asserts that `sql` fails with `sqlstate` and a message containing `needle`, and that no
/// peer, consumer or replication origin was left behind on either node.
fn refused(cluster: &Cluster, sql: &str, sqlstate: &str, needle: &str) -> String {
    let mut c = cluster.node(0).connect();
    let (code, message) = expect_error(&mut c, sql);
    assert_eq!(code, sqlstate, "`{sql}` failed with {code}: {message}");
    assert!(message.contains(needle), "`{sql}`: message {message:?} does not mention {needle:?}");
    for node in cluster.nodes() {
        assert_eq!(node.query_i64("SELECT count(*) FROM trompe.peers"), 0, "`{sql}` left a peer on {}", node.name);
        assert_eq!(node.query_i64("SELECT count(*) FROM pg_replication_origin"), 0);
    }
    assert_eq!(cluster.node(1).query_i64("SELECT count(*) FROM trompe.consumers"), 0);
    message
}

#[test]
fn add_peer_checks_everything_and_changes_nothing_on_failure() {
    let cluster = Cluster::start("add-peer-errors", 2);
    let n2 = cluster.node(1);
    let good = cluster.peer_conninfo(0, 1);

    refused(&cluster, "SELECT trompe.add_peer('x', 'hots=localhost')", "22023", "unknown option \"hots\"");
    let m = refused(&cluster, "SELECT trompe.add_peer('x', 'host=localhost s3cretpw')", "22023", "key=value");
    assert!(!m.contains("s3cretpw"), "{m}");
    refused(&cluster, "SELECT trompe.add_peer('', 'host=localhost')", "22023", "invalid peer name");
    // An option of a newer libpq than the one the server links (Debian 12's is 15) is refused
    // as that libpq reads it, up front, not at every connection attempt.
    let libpq = std::process::Command::new("dpkg-query").args(["-W", "-f", "${Version}", "libpq5"]).output();
    if libpq.is_ok_and(|o| o.stdout.starts_with(b"15.")) {
        refused(
            &cluster,
            "SELECT trompe.add_peer('x', 'host=localhost require_auth=password')",
            "22023",
            "invalid connection option \"require_auth\"",
        );
    }

    // Nothing listens on this port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    refused(
        &cluster,
        &format!(
            "SELECT trompe.add_peer('down', 'host=127.0.0.1 port={closed} dbname=app user=postgres password=s3cretpw')"
        ),
        "08001",
        "could not connect to peer \"down\"",
    );

    // A login that is refused, with a password that must not be echoed.
    n2.exec("CREATE ROLE alice LOGIN PASSWORD 'right-password'");
    let hba = n2.datadir.join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(&hba, format!("host all alice 127.0.0.1/32 scram-sha-256\n{old}")).unwrap();
    n2.exec("SELECT pg_reload_conf()");
    let m = refused(
        &cluster,
        &format!("SELECT trompe.add_peer('n2', '{good} user=alice password=wrong-hunter2')"),
        "28000",
        "refused the login",
    );
    assert!(!m.contains("wrong-hunter2"), "the password is not echoed: {m}");

    // A database without trompe.
    refused(
        &cluster,
        &format!("SELECT trompe.add_peer('n2', 'host=127.0.0.1 port={} dbname=postgres user=postgres')", n2.port),
        "42704",
        "does not have the trompe extension installed",
    );

    // This very node.
    refused(
        &cluster,
        &format!("SELECT trompe.add_peer('me', '{}')", cluster.node(0).conninfo()),
        "22023",
        "is this node itself",
    );

    // A name already used, and a node already a peer under another name.
    cluster.add_peer(0, 1);
    let mut c = cluster.node(0).connect();
    let (code, message) = expect_error(&mut c, &format!("SELECT trompe.add_peer('n2', '{good}')"));
    assert_eq!((code.as_str(), message.contains("already exists")), ("42710", true), "{message}");
    let (code, message) = expect_error(&mut c, &format!("SELECT trompe.add_peer('again', '{good}')"));
    assert_eq!((code.as_str(), message.contains("is already peer \"n2\"")), ("42710", true), "{message}");
    assert_eq!(cluster.node(0).query_i64("SELECT count(*) FROM trompe.peers"), 1);
    let (code, _) = expect_error(&mut c, "SELECT trompe.remove_peer('nobody')");
    assert_eq!(code, "42704");
    let (code, _) = expect_error(&mut c, "SELECT trompe.pause_peer('nobody')");
    assert_eq!(code, "42704");

    // No password of a failed add_peer reached either server log.
    for node in cluster.nodes() {
        let log = node.log();
        for secret in ["s3cretpw", "wrong-hunter2"] {
            assert!(!log.contains(secret), "{} logged {secret}", node.name);
        }
    }
}

#[test]
fn pause_keeps_changes_for_later_and_status_tells_the_story() {
    let cluster = Cluster::start("pause-status", 2);
    cluster.exec_all("CREATE TABLE t (id int PRIMARY KEY); SELECT trompe.add_table('t')");
    cluster.mesh();
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    assert!(wait_for(Duration::from_secs(30), || {
        n2.query_text("SELECT state FROM trompe.status WHERE name = 'n1'").as_deref() == Some("connected")
    }));
    n2.exec("SELECT trompe.pause_peer('n1')");
    assert_eq!(n2.query_text("SELECT state FROM trompe.status WHERE name = 'n1'").as_deref(), Some("paused"));
    n1.exec("INSERT INTO t SELECT generate_series(1, 50)");
    // wait_sync only waits for peers that are not paused.
    assert_eq!(n2.query_text("SELECT trompe.wait_sync('5 seconds')").as_deref(), Some("t"));
    assert_eq!(n2.query_i64("SELECT count(*) FROM t"), 0, "nothing arrives while paused");
    n2.exec("SELECT trompe.resume_peer('n1')");
    cluster.wait_sync(Duration::from_secs(60));
    assert_eq!(n2.query_i64("SELECT count(*) FROM t"), 50);
    let row = n2.query_row(
        "SELECT name, state, behind_changes, behind_seconds, last_pull IS NOT NULL, last_error, applied_txns, applied_changes
           FROM trompe.status",
    );
    let mut row: Vec<&str> = row.iter().map(|v| v.as_deref().unwrap_or("NULL")).collect();
    // Caught up: behind by at most how late the last change was applied (a moment).
    let behind: f64 = row[3].parse().unwrap_or(f64::NAN);
    assert!((0.0..1.0).contains(&behind), "behind_seconds {behind}");
    row[3] = "<1";
    assert_eq!(row, vec!["n1", "connected", "0", "<1", "t", "NULL", "1", "50"]);
}

#[test]
fn wait_sync_times_out_while_a_peer_is_unreachable() {
    let cluster = Cluster::start("wait-sync-timeout", 2);
    cluster.exec_all("CREATE TABLE t (id int PRIMARY KEY); SELECT trompe.add_table('t')");
    cluster.mesh();
    cluster.node(0).exec("INSERT INTO t VALUES (1)");
    cluster.wait_sync(Duration::from_secs(60));
    cluster.cut(1, 0);
    cluster.node(0).exec("INSERT INTO t VALUES (2)");
    let started = std::time::Instant::now();
    assert_eq!(cluster.node(1).query_text("SELECT trompe.wait_sync('2 seconds')").as_deref(), Some("f"));
    assert!(started.elapsed() < Duration::from_secs(10));
    cluster.link(1, 0).heal();
    cluster.wait_sync(Duration::from_secs(60));
    assert_eq!(cluster.node(1).query_i64("SELECT count(*) FROM t"), 2);
}

#[test]
fn add_peer_warns_when_statement_logging_may_have_caught_a_password() {
    let cluster = Cluster::start("add-peer-logged", 3);
    let notices = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut config: postgres::Config = cluster.node(0).conninfo().parse().expect("conninfo parses");
    let seen = notices.clone();
    config.notice_callback(move |n| seen.lock().expect("notices").push(n.message().to_string()));
    let mut c = config.connect(postgres::NoTls).expect("connects");
    // Without statement logging, a password in the connection string is kept quiet.
    c.batch_execute(&format!(
        "SELECT trompe.add_peer('n2', '{} password=ignored-by-trust')",
        cluster.peer_conninfo(0, 1)
    ))
    .expect("add_peer n2");
    assert!(notices.lock().expect("notices").is_empty());
    c.batch_execute("SET log_min_duration_statement = 0").expect("SET");
    c.batch_execute(&format!(
        "SELECT trompe.add_peer('n3', '{} password=ignored-by-trust')",
        cluster.peer_conninfo(0, 2)
    ))
    .expect("add_peer n3");
    let notices = notices.lock().expect("notices");
    assert!(
        notices.iter().any(|n| n.contains("statement logging") && n.contains("passfile")),
        "add_peer warns that the password may be in the server log: {notices:?}"
    );
}
