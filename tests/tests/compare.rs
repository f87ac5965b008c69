//! `trompe.compare` finds rows changed behind trompe's back (writes with
//! session_replication_role = replica are not captured), and `trompe.repair` brings the node in
//! line with the peer, on every node, recording what it changed.

use std::time::Duration;

use trompe_tests::{checksum, expect_error, Cluster};

const SYNC: Duration = Duration::from_secs(120);

/// Tables with awkward types, a generated column, an identity key and a composite text key.
const SCHEMA: &str = "
    CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
    CREATE TABLE t (id int PRIMARY KEY, v text, at timestamptz, f float8, b bytea, arr int[][],
                    m mood, j jsonb, doubled int GENERATED ALWAYS AS (id * 2) STORED);
    CREATE TABLE pairs (a text, n int, note text, PRIMARY KEY (a, n));
    CREATE TABLE ids (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text);
    CREATE TABLE other (id int PRIMARY KEY);
    SELECT trompe.add_table('t'); SELECT trompe.add_table('pairs'); SELECT trompe.add_table('ids');";

/// compare on `node` against `peer`, as `table:only_here/only_there/different` per table.
fn differences(node: &trompe_tests::Node, peer: &str) -> String {
    node.query_text(&format!(
        "SELECT string_agg(format('%s:%s/%s/%s', table_name, only_here, only_there, different), ' ' ORDER BY table_name)
           FROM trompe.compare('{peer}')"
    ))
    .unwrap_or_default()
}

#[test]
fn compare_finds_rows_changed_behind_trompes_back_and_repair_fixes_every_node() {
    let cluster = Cluster::start("compare-repair", 3);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    cluster.exec_all(SCHEMA);
    cluster.mesh();
    n1.exec(
        "INSERT INTO t (id, v, at, f, b, arr, m, j)
           SELECT i, 'row ' || i || E' \\\\ ''q'' ✓', '2026-01-01 12:00+03'::timestamptz + i * interval '1 hour',
                  CASE WHEN i % 7 = 0 THEN 'NaN'::float8 ELSE i / 3.0 END, decode(md5(i::text), 'hex'),
                  ARRAY[[i, NULL], [2, 3]], (ARRAY['sad', 'ok', 'happy'])[i % 3 + 1]::mood,
                  jsonb_build_object('i', i, 'nested', jsonb_build_array(1.50, 'x'))
             FROM generate_series(1, 3000) i;
         INSERT INTO pairs SELECT 'k ' || (i % 10) || ' \"ü\"', i, 'note' FROM generate_series(1, 200) i;
         INSERT INTO ids (v) SELECT 'v' || i FROM generate_series(1, 50) i;
         ANALYZE t",
    );
    cluster.wait_sync(SYNC);
    assert_eq!(differences(n2, "n1"), "public.ids:0/0/0 public.pairs:0/0/0 public.t:0/0/0");
    assert_eq!(
        n2.query_text("SELECT rows_here || '/' || rows_there FROM trompe.compare('n1', 't')").as_deref(),
        Some("3000/3000")
    );

    // Behind trompe's back on n2: 4 rows only here, 3 only on the peers, 2 different.
    n2.exec(
        "SET session_replication_role = replica;
         INSERT INTO t (id, v) SELECT i, 'stray' FROM generate_series(5001, 5004) i;
         DELETE FROM t WHERE id IN (10, 2000, 2999);
         UPDATE t SET v = 'changed' WHERE id = 42;
         UPDATE t SET at = at + interval '1 microsecond' WHERE id = 7;
         UPDATE pairs SET note = 'other' WHERE a = 'k 3 \"ü\"' AND n = 3;
         DELETE FROM ids WHERE id = 50;",
    );
    assert_eq!(differences(n2, "n1"), "public.ids:0/1/0 public.pairs:0/0/1 public.t:4/3/2");
    assert_eq!(
        differences(n1, "n2"),
        "public.ids:1/0/0 public.pairs:0/0/1 public.t:3/4/2",
        "the peer sees the mirror image"
    );

    let repaired = n2.query_text(
        "SELECT string_agg(format('%s:+%s~%s-%s', table_name, inserted, updated, deleted), ' ' ORDER BY table_name)
           FROM trompe.repair('n1')",
    );
    assert_eq!(repaired.as_deref(), Some("public.ids:+1~0-0 public.pairs:+0~1-0 public.t:+3~2-4"));
    assert_eq!(
        n2.query_text(
            "SELECT string_agg(action || ':' || (key->>'id'), ',' ORDER BY action, (key->>'id')::int)
               FROM trompe.repairs WHERE table_name = 'public.t'"
        )
        .as_deref(),
        Some("delete:5001,delete:5002,delete:5003,delete:5004,insert:10,insert:2000,insert:2999,update:7,update:42")
    );
    assert_eq!(
        n2.query_text(
            "SELECT old_row->>'v' || ' -> ' || (new_row->>'v') FROM trompe.repairs WHERE key = '{\"id\": 42}'"
        )
        .as_deref(),
        Some("changed -> row 42 \\ 'q' ✓")
    );
    assert_eq!(differences(n2, "n1"), "public.ids:0/0/0 public.pairs:0/0/0 public.t:0/0/0");

    // The repair's writes are ordinary changes: every node ends up with n1's rows.
    cluster.wait_sync(SYNC);
    for table in ["t", "pairs", "ids"] {
        cluster.assert_same(&checksum(table));
    }
    assert_eq!(differences(cluster.node(2), "n2"), "public.ids:0/0/0 public.pairs:0/0/0 public.t:0/0/0");
}

#[test]
fn compare_and_repair_refuse_bad_requests() {
    let cluster = Cluster::start("compare-errors", 2);
    let n1 = cluster.node(0);
    cluster.exec_all(SCHEMA);
    cluster.mesh();
    let mut c = n1.connect();
    for (sql, state) in [
        ("SELECT * FROM trompe.compare('nobody')", "42704"),
        ("SELECT * FROM trompe.repair('nobody')", "42704"),
        ("SELECT * FROM trompe.compare('n2', 'other')", "55000"),
        ("SELECT * FROM trompe.table_digest('other', 4)", "55000"),
        ("SELECT * FROM trompe._row_digests('t', 0)", "22023"),
    ] {
        let (got, message) = expect_error(&mut c, sql);
        assert_eq!(got, state, "{sql}: {message}");
    }
    n1.exec(
        "CREATE ROLE plain LOGIN; GRANT SELECT ON t TO plain;
         
         CREATE ROLE peer_login LOGIN IN ROLE trompe_puller;",
    );
    let mut plain = n1.connect();
    plain.batch_execute("SET ROLE plain").unwrap();
    for sql in [
        "SELECT * FROM trompe.compare('n2')",
        "SELECT * FROM trompe.repair('n2')",
        "SELECT * FROM trompe.fetch_rows('t', '{}')",
        "SELECT * FROM trompe._repair_rows('t', 'x', '{}', '[]')",
        "SELECT * FROM trompe.repairs",
    ] {
        let (got, message) = expect_error(&mut plain, sql);
        assert_eq!(got, "42501", "{sql}: {message}");
    }
    // A peer's pulling role reads replicated tables through the compare functions only.
    let mut puller = n1.connect();
    puller.batch_execute("SET ROLE peer_login").unwrap();
    assert_eq!(puller.query("SELECT * FROM trompe.table_digest('t', 2)", &[]).map(|r| r.len()).ok(), Some(0));
    let (got, message) = expect_error(&mut puller, "SELECT * FROM trompe.fetch_rows('other', '{}')");
    assert_eq!(got, "55000", "{message}");
    let (got, message) = expect_error(&mut puller, "SELECT * FROM trompe._repair_rows('t', 'x', '{}', '[]')");
    assert_eq!(got, "42501", "{message}");
}

/// compare and repair report each table as they finish it, so a long run shows how far it got.
#[test]
fn compare_and_repair_report_each_table_as_they_go() {
    let cluster = Cluster::start("compare-progress", 2);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    cluster.exec_all(SCHEMA);
    cluster.mesh();
    n1.exec("INSERT INTO pairs VALUES ('a', 1, 'x'), ('b', 2, 'y')");
    cluster.wait_sync(Duration::from_secs(60));
    let (mut client, notices) = n2.connect_keeping_notices();
    client.batch_execute("SELECT * FROM trompe.compare('n1'); SELECT * FROM trompe.repair('n1')").expect("both run");
    let notices = notices.lock().expect("notices").clone();
    let compared: Vec<&String> = notices.iter().filter(|n| n.contains("trompe: compared")).collect();
    let repaired: Vec<&String> = notices.iter().filter(|n| n.contains("trompe: repaired")).collect();
    assert_eq!((compared.len(), repaired.len()), (3, 3), "one report per table and run: {notices:?}");
    assert!(
        compared.iter().any(|n| n.contains("pairs") && n.contains("(table ") && n.contains("2 rows here, 2 there")),
        "a report names its table, its place and its counts: {compared:?}"
    );
    assert!(repaired.iter().all(|n| n.contains("0 rows inserted, 0 updated, 0 deleted")), "{repaired:?}");
}
