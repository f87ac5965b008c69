//! The harness itself: nodes start with trompe preloaded, can be crashed and restarted, and
//! links between them can be cut and healed.

use std::time::Duration;

use trompe_tests::{wait_for, Cluster};

#[test]
fn nodes_start_with_trompe_preloaded_and_survive_crashes() {
    let cluster = Cluster::start("harness-crash", 2);
    let n1 = cluster.node(0);
    assert_eq!(n1.query_text("SHOW shared_preload_libraries").as_deref(), Some("trompe"));
    assert_eq!(n1.query_text("SELECT extname FROM pg_extension WHERE extname = 'trompe'").as_deref(), Some("trompe"));
    n1.exec("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2)");
    let before = n1.postmaster_pid().expect("running");
    n1.crash_and_restart();
    assert_ne!(n1.postmaster_pid(), Some(before), "a new postmaster runs after the crash");
    assert_eq!(n1.query_i64("SELECT count(*) FROM t"), 2, "committed rows survive a kill -9");
    n1.restart();
    assert_eq!(n1.query_i64("SELECT count(*) FROM t"), 2);
    assert_ne!(cluster.node(0).port, cluster.node(1).port);
}

#[test]
fn links_can_be_cut_and_healed() {
    let cluster = Cluster::builder("harness-links").nodes(2).with_extension(false).start();
    let conninfo = cluster.peer_conninfo(0, 1);
    let mut through = postgres::Client::connect(&conninfo, postgres::NoTls).expect("connect through the proxy");
    through.batch_execute("SELECT 1").expect("query through the proxy");
    assert!(cluster.link(0, 1).bytes_forwarded() > 0);

    cluster.cut(0, 1);
    assert!(through.batch_execute("SELECT 1").is_err(), "a cut resets open connections");
    assert!(postgres::Client::connect(&conninfo, postgres::NoTls).is_err(), "a cut link refuses new connections");
    // The other direction is a different link and still works.
    let mut back =
        postgres::Client::connect(&cluster.peer_conninfo(1, 0), postgres::NoTls).expect("reverse link is up");
    back.batch_execute("SELECT 1").expect("query on the reverse link");

    cluster.link(0, 1).heal();
    let healed = wait_for(Duration::from_secs(10), || {
        postgres::Client::connect(&conninfo, postgres::NoTls).and_then(|mut c| c.batch_execute("SELECT 1")).is_ok()
    });
    assert!(healed, "the link works again after heal");

    cluster.link(0, 1).blackhole();
    assert!(!server_answers(cluster.link(0, 1).port), "nothing gets through a blackhole");
    cluster.link(0, 1).heal();
    assert!(server_answers(cluster.link(0, 1).port), "the server answers again after heal");
    assert!(wait_for(Duration::from_secs(10), || { postgres::Client::connect(&conninfo, postgres::NoTls).is_ok() }));
}

/// Sends PostgreSQL's SSLRequest over a raw TCP connection and reports whether the server
/// answered within a second and a half (it always answers 'S' or 'N' at once when reachable).
fn server_answers(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(1500)));
    let ssl_request = [0u8, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    if s.write_all(&ssl_request).is_err() {
        return false;
    }
    let mut answer = [0u8; 1];
    matches!(s.read(&mut answer), Ok(1))
}
