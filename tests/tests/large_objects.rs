//! Large objects referenced by replicated tables: created, rewritten and unlinked on one node,
//! reflected on every node with the same bytes, the referencing row pointing to the node's own
//! copy; a 100 MB object is copied in pieces, never whole in the worker's memory.

use std::time::Duration;

use trompe_tests::{Cluster, Node};

const SYNC: Duration = Duration::from_secs(300);

/// Every row of docs as `id:name:<md5 of its large object>:<raw oid>`.
const DOCS: &str = "SELECT string_agg(format('%s:%s:%s:%s', id, name, md5(lo_get(body)), coalesce(raw::text, '-')), ' '
                                      ORDER BY id) FROM docs";
const OBJECTS: &str = "SELECT count(*) FROM pg_largeobject_metadata";

#[test]
fn large_objects_are_created_rewritten_and_unlinked_on_every_node() {
    if !trompe_tests::system::has_extension("lo") {
        println!(
            "SKIPPED large_objects_are_created_rewritten_and_unlinked_on_every_node: contrib's lo is not installed \
             in {} (the PostgreSQL 16 and 18 used here have no contrib)",
            trompe_tests::system::extension_dir().display()
        );
        return;
    }
    let cluster = Cluster::start("large-objects", 3);
    let (n1, n2, n3) = (cluster.node(0), cluster.node(1), cluster.node(2));
    // contrib's lo: its lo_manage trigger unlinks an object when its row lets go of it; ENABLE
    // ALWAYS makes it do so for replicated changes too. Peers print bytea the old way, which
    // the copy must not depend on.
    cluster.exec_all(
        "CREATE EXTENSION lo;
         CREATE TABLE docs (id int PRIMARY KEY, name text, body lo, raw oid);
         CREATE TRIGGER docs_body BEFORE UPDATE OR DELETE ON docs FOR EACH ROW EXECUTE FUNCTION lo_manage(body);
         ALTER TABLE docs ENABLE ALWAYS TRIGGER docs_body;
         SELECT trompe.add_table('docs');
         ALTER DATABASE app SET bytea_output = 'escape';",
    );
    cluster.mesh();
    n1.exec("INSERT INTO docs VALUES (1, 'one', lo_from_bytea(0, 'hello from n1'), 12345)");
    n2.exec(
        "INSERT INTO docs VALUES (2, 'two', lo_from_bytea(0, '\\x00ff00fe'::bytea || convert_to('✓', 'UTF8')), NULL)",
    );
    cluster.wait_sync(SYNC);
    let expected = format!(
        "1:one:{}:12345 2:two:{}:-",
        n1.query_text("SELECT md5('hello from n1'::bytea)").unwrap_or_default(),
        n1.query_text("SELECT md5('\\x00ff00fe'::bytea || convert_to('✓', 'UTF8'))").unwrap_or_default()
    );
    assert_eq!(cluster.assert_same(DOCS), Some(expected), "same bytes everywhere; a plain oid stays as it is");
    assert_eq!(cluster.assert_same(OBJECTS).as_deref(), Some("2"));
    assert_eq!(
        n3.query_i64("SELECT count(*) FROM docs d JOIN pg_largeobject_metadata l ON l.oid = d.body"),
        2,
        "rows point to this node's own copies"
    );

    // Rewritten: a new object replaces the old one, which is unlinked everywhere.
    n3.exec("UPDATE docs SET body = lo_from_bytea(0, 'rewritten on n3') WHERE id = 1");
    cluster.wait_sync(SYNC);
    let rewritten = cluster.assert_same("SELECT md5(lo_get(body)) FROM docs WHERE id = 1");
    assert_eq!(rewritten, n3.query_text("SELECT md5('rewritten on n3'::bytea)"));
    assert_eq!(cluster.assert_same(OBJECTS).as_deref(), Some("2"));

    // A row changed elsewhere keeps pointing to the same object, copied once per node.
    n2.exec("UPDATE docs SET name = 'one, renamed' WHERE id = 1");
    cluster.wait_sync(SYNC);
    cluster.assert_same(DOCS);
    assert_eq!(cluster.assert_same(OBJECTS).as_deref(), Some("2"));

    // Only objects that were sent can be referred to or read by a peer: not a private one.
    let private = n1.query_text("SELECT lo_from_bytea(0, 'private')").unwrap_or_default();
    assert_eq!(
        n1.query_text(&format!(
            "SELECT (trompe._lo_local(trompe.node_id(), {private}) IS NULL)::text || '/'
                    || (trompe.lo_chunk(trompe.node_id(), {private}, 0, 10) IS NULL)::text"
        ))
        .as_deref(),
        Some("true/true")
    );
    n1.exec(&format!("SELECT lo_unlink({private})"));

    // Unlinked with its row.
    n1.exec("DELETE FROM docs WHERE id = 2");
    cluster.wait_sync(SYNC);
    assert_eq!(cluster.assert_same(OBJECTS).as_deref(), Some("1"));

    // compare sees the objects, not the oids (which differ between nodes); repair copies the
    // peer's object.
    let compare = "SELECT only_here || '/' || only_there || '/' || different FROM trompe.compare('n1')";
    assert_eq!(n2.query_text(compare).as_deref(), Some("0/0/0"));
    n2.exec("SET session_replication_role = replica; UPDATE docs SET body = lo_from_bytea(0, 'stray') WHERE id = 1");
    assert_eq!(n2.query_text(compare).as_deref(), Some("0/0/1"));
    assert_eq!(n2.query_text("SELECT updated FROM trompe.repair('n1')").as_deref(), Some("1"));
    assert_eq!(n2.query_text(compare).as_deref(), Some("0/0/0"));
    cluster.wait_sync(SYNC);
    assert_eq!(cluster.assert_same("SELECT md5(lo_get(body)) FROM docs WHERE id = 1"), rewritten);
    assert_eq!(cluster.assert_same(OBJECTS).as_deref(), Some("1"));
    for node in [n1, n2, n3] {
        assert_eq!(
            node.query_i64("SELECT count(*) FROM trompe.status WHERE last_error IS NOT NULL"),
            0,
            "{}: {:?}",
            node.name,
            node.query_text("SELECT string_agg(last_error, '; ') FROM trompe.status")
        );
    }
}

/// The peak resident memory of the trompe worker of the test database on `node`, in kB.
fn worker_peak_kb(node: &Node) -> i64 {
    let pid = node.query_i64(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'trompe worker' AND datname = current_database()",
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("worker's /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc status")
}

#[test]
fn a_100_mb_large_object_is_copied_in_pieces() {
    let cluster = Cluster::start("large-object-100mb", 2);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    cluster.exec_all("CREATE TABLE blobs (id int PRIMARY KEY, body oid); SELECT trompe.add_table('blobs');");
    cluster.mesh();
    n1.exec(
        "DO $$
         DECLARE o oid := lo_create(0);
         BEGIN
             FOR i IN 0..99 LOOP
                 PERFORM lo_put(o, i * 1048576, decode(repeat(md5(i::text), 65536), 'hex'));
             END LOOP;
             INSERT INTO blobs VALUES (1, o);
         END $$",
    );
    cluster.wait_sync(SYNC);
    let fingerprint = "SELECT sum(length(lo_get(body, i * 1048576, 1048576))) || ':'
                              || md5(string_agg(md5(lo_get(body, i * 1048576, 1048576)), '' ORDER BY i))
                         FROM blobs, generate_series(0, 100) i";
    let copied = cluster.assert_same(fingerprint).unwrap_or_default();
    assert!(copied.starts_with("104857600:"), "{copied}");
    let peak_kb = worker_peak_kb(n2);
    assert!(peak_kb < 96 * 1024, "the worker that copied 100 MB peaked at {peak_kb} kB");
    println!("worker peak resident memory after copying 100 MB: {peak_kb} kB");
}

#[test]
fn large_objects_of_a_backlog_are_copied_while_the_next_pull_is_under_way() {
    // Applying a backlog, the worker sends each pull before it applies the answer of the one
    // before (see worker/link/ahead.rs); a large object to copy then waits on the same
    // connection for that answer first.
    let cluster = Cluster::start("large-objects-backlog", 2);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    cluster.exec_all("CREATE TABLE blobs (id int PRIMARY KEY, body oid); SELECT trompe.add_table('blobs');");
    cluster.mesh();
    n1.exec("INSERT INTO blobs VALUES (0, lo_from_bytea(0, 'warm-up'))");
    cluster.wait_sync(SYNC);
    n2.exec("SELECT trompe.pause_peer('n1')");
    n1.exec(
        "CREATE PROCEDURE fill() LANGUAGE plpgsql AS $$
         BEGIN
             FOR i IN 1..400 LOOP
                 INSERT INTO blobs VALUES (i, lo_from_bytea(0, convert_to(repeat(md5(i::text), i), 'UTF8')));
                 COMMIT;
             END LOOP;
         END $$",
    );
    n1.exec("CALL fill()");
    n2.exec("SELECT trompe.resume_peer('n1')");
    cluster.wait_sync(Duration::from_secs(120));
    let fingerprint = "SELECT count(*) || ':' || md5(string_agg(md5(lo_get(body)), '' ORDER BY id)) FROM blobs";
    let same = cluster.assert_same(fingerprint).unwrap_or_default();
    assert!(same.starts_with("401:"), "{same}");
    assert_eq!(cluster.assert_same(OBJECTS).as_deref(), Some("401"));
    let log = n2.log();
    let stalls: Vec<&str> = log.lines().filter(|l| l.contains("cannot apply")).collect();
    assert!(stalls.is_empty(), "applying the backlog stopped: {stalls:?}");
    assert_eq!(
        n2.query_i64("SELECT count(*) FROM trompe.status WHERE last_error IS NOT NULL OR state <> 'connected'"),
        0,
        "{:?}",
        n2.query_text("SELECT string_agg(state || ': ' || coalesce(last_error, ''), '; ') FROM trompe.status")
    );
}
