//! A broken or malicious peer: log rows it serves that are garbage, name unknown or
//! unreplicated tables, smuggle SQL in identifiers, carry values of the wrong type or of huge
//! size. Each is refused with an error in `trompe.status`, nothing is written outside
//! replicated tables, and the server stays up.

use std::time::Duration;

use trompe_core::changeset::{chunk, ChangeWriter, OldVersion};
use trompe_core::logformat::Op;
use trompe_tests::{wait_for, Cluster};

/// An insert of `cols` = `vals` into `nsp.rel`, as a peer's log row would carry it.
fn insert(nsp: &str, rel: &str, cols: &[&str], vals: &[&str]) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut w = ChangeWriter::begin(&mut buf, Op::Insert, 1, nsp.as_bytes(), rel.as_bytes())
        .cols(cols.iter().map(|c| c.as_bytes()))
        .list(vals.len());
    for v in vals {
        w = w.value(Some(v.as_bytes()));
    }
    w.none().finish(OldVersion::Unknown);
    chunk(1, &buf)
}

/// Waits until n2's stream from n1 stops with an error containing `expected`, checks
/// the server still answers, then sets the bad transaction aside with `trompe.skip` and waits
/// until it is kept in `trompe.exceptions` (the stream goes on after it).
fn refused(cluster: &Cluster, expected: &str) {
    let n2 = cluster.node(1);
    let mut last = None;
    let seen = wait_for(Duration::from_secs(30), || {
        last = n2.query_text("SELECT last_error FROM trompe.status WHERE name = 'n1'");
        last.as_deref().is_some_and(|e| e.contains(expected))
    });
    assert!(seen, "expected an error containing {expected:?}, last error {last:?}\n{}", n2.log_tail(30));
    assert_eq!(n2.query_text("SELECT 1").as_deref(), Some("1"), "the server is up");
    assert_eq!(n2.query_i64("SELECT count(*) FROM victim"), 1, "nothing was dropped or changed");
    let kept = n2.query_i64("SELECT count(*) FROM trompe.exceptions");
    n2.exec("SELECT trompe.skip('n1')");
    n2.wait_for_value("SELECT count(*) FROM trompe.exceptions", &(kept + 1).to_string(), Duration::from_secs(30));
}

#[test]
fn malformed_changes_from_a_peer_are_refused_and_the_server_stays_up() {
    let cluster = Cluster::start("hostile-peer", 2);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    cluster.exec_all(
        "CREATE TABLE t (id int PRIMARY KEY, v text); SELECT trompe.add_table('t');
         CREATE TABLE wake (id bigserial PRIMARY KEY); SELECT trompe.add_table('wake');
         CREATE TABLE victim (id int PRIMARY KEY); INSERT INTO victim VALUES (1);",
    );
    cluster.add_peer(1, 0);
    n1.exec("INSERT INTO t VALUES (1, 'fine')");
    n2.wait_for_value("SELECT count(*) FROM t", "1", Duration::from_secs(30));

    n1.serve_forged(b"\x01garbage that is no change at all");
    refused(&cluster, "change chunk");
    // What does not decode is kept as it came, with the reason.
    let garbage_hex: String = b"\x01garbage that is no change at all".iter().map(|b| format!("{b:02x}")).collect();
    let kept = "SELECT changes->0->>'undecodable' LIKE '%change chunk%', changes->0->'log_rows'->>0
                FROM trompe.exceptions WHERE changes->0 ? 'undecodable'";
    assert_eq!(n2.query_row(kept), vec![Some("t".to_string()), Some(garbage_hex)]);
    // Also a row that does not even say how many changes it holds.
    n1.serve_forged(b"\x07");
    refused(&cluster, "unknown change chunk format 7");

    n1.serve_forged(&insert("public", "nosuch", &["id"], &["1"]));
    refused(&cluster, "nosuch");

    n1.serve_forged(&insert("public", "victim\"; DROP TABLE victim; --", &["id"], &["2"]));
    refused(&cluster, "DROP TABLE victim");

    n1.serve_forged(&insert("public", "victim", &["id"], &["2"]));
    refused(&cluster, "not replicated");

    n1.serve_forged(&insert("trompe", "peers", &["name"], &["evil"]));
    refused(&cluster, "peers");

    n1.serve_forged(&insert("public", "t", &["id", "v"], &["not a number", "x"]));
    refused(&cluster, "invalid input syntax for type integer");

    n1.serve_forged(&insert("public", "t", &["id", "nope"], &["2", "x"]));
    refused(&cluster, "nope");

    let huge = "9".repeat(20 * 1024 * 1024);
    n1.serve_forged(&insert("public", "t", &["id", "v"], &[&huge, "x"]));
    refused(&cluster, "value \"999");

    // After all that, replication still works.
    n1.exec("INSERT INTO t VALUES (2, 'still fine')");
    n2.wait_for_value("SELECT count(*) FROM t", "2", Duration::from_secs(30));
    assert_eq!(n2.query_i64("SELECT count(*) FROM trompe.peers WHERE name = 'evil'"), 0);
}
