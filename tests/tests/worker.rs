//! The worker's life: started by CREATE EXTENSION, by restarts and after crashes; gone after
//! DROP EXTENSION; out of DROP DATABASE's way; prompt to shut down even when a peer hangs;
//! clear about a missing shared_preload_libraries; no trace in a database without the extension.

use std::time::{Duration, Instant};

use trompe_tests::{expect_error, wait_for, Cluster, Node};

const WORKER: &str = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'trompe worker' AND datname = 'app'";

fn wait_workers(node: &Node, n: i64) {
    let ok = wait_for(Duration::from_secs(30), || node.query_i64(WORKER) == n);
    assert!(ok, "node {}: expected {n} trompe worker(s), have {}", node.name, node.query_i64(WORKER));
}

#[test]
fn worker_follows_the_extension_restarts_and_crashes() {
    let cluster = Cluster::start("worker-life", 1);
    let n1 = cluster.node(0);
    wait_workers(n1, 1);
    assert_eq!(
        n1.query_text("SELECT application_name FROM pg_stat_activity WHERE backend_type = 'trompe worker'").as_deref(),
        Some("trompe worker")
    );
    assert_eq!(n1.query_i64("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'trompe supervisor'"), 1);
    n1.restart();
    wait_workers(n1, 1);
    n1.crash_and_restart();
    wait_workers(n1, 1);
    n1.exec("DROP EXTENSION trompe");
    wait_workers(n1, 0);
    n1.exec("CREATE EXTENSION trompe");
    wait_workers(n1, 1);
    // A worker killed by an administrator comes back.
    n1.exec("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'trompe worker'");
    wait_workers(n1, 0);
    wait_workers(n1, 1);
}

#[test]
fn drop_database_does_not_wait_for_the_worker() {
    let cluster = Cluster::builder("worker-dropdb").nodes(1).with_extension(false).start();
    let n1 = cluster.node(0);
    n1.exec("CREATE DATABASE other");
    let mut other = n1.connect_to("other");
    other.batch_execute("CREATE EXTENSION trompe").unwrap();
    drop(other);
    let count = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'trompe worker' AND datname = 'other'";
    assert!(wait_for(Duration::from_secs(30), || n1.query_i64(count) == 1));
    let mut admin = n1.connect_to("postgres");
    let started = Instant::now();
    admin.batch_execute("ALTER DATABASE other RENAME TO other2").expect("rename while the worker runs");
    admin.batch_execute("DROP DATABASE other2").expect("drop while the worker runs");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert_eq!(n1.query_i64("SELECT count(*) FROM pg_database WHERE datname LIKE 'other%'"), 0);
}

#[test]
fn fast_shutdown_is_prompt_even_when_a_peer_hangs() {
    let cluster = Cluster::start("worker-shutdown", 2);
    cluster.mesh();
    let n1 = cluster.node(0);
    assert!(wait_for(Duration::from_secs(30), || {
        n1.query_text("SELECT state FROM trompe.status").as_deref() == Some("connected")
    }));
    // Whatever n1's worker sends to n2 now goes nowhere.
    cluster.link(0, 1).blackhole();
    n1.exec("SELECT trompe.resume_peer('n2')");
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    n1.stop();
    assert!(started.elapsed() < Duration::from_secs(5), "fast shutdown took {:?}", started.elapsed());
    assert!(n1.postmaster_pid().is_none());
}

#[test]
fn settings_reload_pauses_and_resumes_every_worker() {
    let cluster = Cluster::start("worker-enabled", 2);
    cluster.exec_all("CREATE TABLE t (id int PRIMARY KEY); SELECT trompe.add_table('t')");
    cluster.mesh();
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    n2.exec("ALTER SYSTEM SET trompe.enabled = off");
    n2.exec("SELECT pg_reload_conf()");
    n2.wait_for_value("SELECT state FROM trompe.status", "disabled", Duration::from_secs(10));
    n1.exec("INSERT INTO t VALUES (1)");
    assert_eq!(n2.query_text("SELECT trompe.wait_sync('2 seconds')").as_deref(), Some("f"));
    n2.exec("ALTER SYSTEM RESET trompe.enabled");
    n2.exec("SELECT pg_reload_conf()");
    cluster.wait_sync(Duration::from_secs(60));
    assert_eq!(n2.query_i64("SELECT count(*) FROM t"), 1);
}

#[test]
fn without_preloading_the_extension_installs_and_says_what_is_missing() {
    let cluster = Cluster::builder("worker-no-preload")
        .nodes(1)
        .with_extension(false)
        .setting("shared_preload_libraries", "''")
        .start();
    let n1 = cluster.node(0);
    let mut c = n1.connect();
    c.batch_execute("CREATE EXTENSION trompe").expect("CREATE EXTENSION works without preloading");
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY); SELECT trompe.add_table('t'); INSERT INTO t VALUES (1)")
        .unwrap();
    assert_eq!(n1.query_i64("SELECT count(*) FROM trompe.log"), 1, "changes are still captured");
    for sql in ["SELECT trompe.wait_sync()", "SELECT trompe.add_peer('x', 'host=localhost')"] {
        let (code, message) = expect_error(&mut c, sql);
        assert_eq!(code, "55000", "{sql}");
        assert!(message.contains("shared_preload_libraries"), "{sql}: {message}");
    }
}

/// `shared_preload_libraries` loads trompe into every database of the cluster; one that has no
/// `CREATE EXTENSION trompe` (yet, or any more) must not notice it: its DDL, maintenance and
/// writes run as without trompe. Then the extension installs over the schema made meanwhile.
#[test]
fn a_database_without_the_extension_is_left_alone() {
    let cluster = Cluster::builder("worker-no-extension").nodes(1).with_extension(false).start();
    let n1 = cluster.node(0);
    let mut c = n1.connect();
    let statements = [
        "CREATE SCHEMA app",
        "CREATE TABLE app.t (id int PRIMARY KEY, a int, note text)",
        "INSERT INTO app.t SELECT g, g, 'x' FROM generate_series(1, 10) g",
        "ALTER TABLE app.t ADD COLUMN serial_id bigserial",
        "ALTER TABLE app.t ADD COLUMN at timestamptz DEFAULT now()",
        "ALTER TABLE app.t ADD COLUMN b int",
        "ALTER TABLE app.t ALTER COLUMN a TYPE bigint USING a + (random() * 0)::int",
        "ALTER TABLE app.t RENAME COLUMN b TO c",
        "ALTER TABLE app.t RENAME TO u",
        "CREATE INDEX u_note ON app.u (note)",
        "DROP INDEX app.u_note",
        "CREATE TABLE app.p (id int, k int, PRIMARY KEY (id, k)) PARTITION BY LIST (k)",
        "CREATE TABLE app.p1 PARTITION OF app.p FOR VALUES IN (1)",
        "ALTER TABLE app.p DETACH PARTITION app.p1 CONCURRENTLY",
        "GRANT SELECT ON app.u TO PUBLIC",
        "REVOKE SELECT ON app.u FROM PUBLIC",
        "COMMENT ON TABLE app.u IS 'no trompe here'",
        "UPDATE app.u SET note = 'y' WHERE id < 5",
        "DELETE FROM app.u WHERE id = 10",
        "SELECT lo_unlink(lo_from_bytea(0, 'large'))",
        "TRUNCATE app.p RESTART IDENTITY",
        "VACUUM (FREEZE) app.u",
        "CLUSTER app.u USING t_pkey",
        "VACUUM FULL app.u",
        "DROP TABLE app.p",
        "CREATE SEQUENCE app.s",
        "SELECT setval('app.s', 42)",
        "DO $$ BEGIN EXECUTE 'ALTER TABLE app.u ADD COLUMN e int DEFAULT 1'; END $$",
    ];
    for sql in statements {
        c.batch_execute(sql).unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
    assert_eq!(n1.query_i64("SELECT count(*) FROM pg_namespace WHERE nspname = 'trompe'"), 0);
    assert_eq!(n1.query_i64("SELECT count(*) FROM app.u"), 9);
    // Installed and dropped again and again: DROP EXTENSION locks trompe's tables one by one,
    // and must not deadlock with the worker that CREATE EXTENSION started reading them.
    for round in 0..10 {
        c.batch_execute("CREATE EXTENSION trompe; SELECT trompe.add_schema('app')").expect("the extension installs");
        c.batch_execute(&format!("UPDATE app.u SET note = 'z{round}' WHERE id = 1")).unwrap();
        assert_eq!(n1.query_i64("SELECT count(*) FROM trompe.log"), 1, "the table is captured once added");
        if round > 0 {
            wait_workers(n1, 1);
            std::thread::sleep(Duration::from_millis(20 * round));
        }
        c.batch_execute("DROP EXTENSION trompe CASCADE").unwrap_or_else(|e| panic!("round {round}: {e:?}"));
    }
    c.batch_execute("ALTER TABLE app.u ADD COLUMN d int DEFAULT random()::int; DROP TABLE app.u")
        .expect("DDL after DROP EXTENSION");
}

/// trompe's log carries text as UTF-8: `CREATE EXTENSION` in a database of another encoding is
/// refused with an error naming the encoding, and leaves nothing behind.
#[test]
fn a_database_not_in_utf8_is_refused() {
    let cluster = Cluster::builder("worker-latin1").nodes(1).with_extension(false).start();
    let n1 = cluster.node(0);
    for encoding in ["LATIN1", "SQL_ASCII"] {
        let db = encoding.to_lowercase();
        n1.exec(&format!("CREATE DATABASE {db} TEMPLATE template0 ENCODING '{encoding}' LOCALE_PROVIDER libc LC_COLLATE 'C' LC_CTYPE 'C'"));
        let mut c = n1.connect_to(&db);
        let (code, message) = expect_error(&mut c, "CREATE EXTENSION trompe");
        assert_eq!(code, "0A000", "{message}");
        assert!(message.contains("UTF8") && message.contains(encoding), "{message}");
        let left = c.query_one("SELECT count(*) FROM pg_namespace WHERE nspname = 'trompe'", &[]).unwrap();
        assert_eq!(left.get::<_, i64>(0), 0);
    }
}

/// Commands that need a database without sessions stop its worker first, but only for a user
/// they will not refuse: anyone else (running them in a loop) cannot keep replication stopped.
#[test]
fn a_user_refused_drop_database_leaves_the_worker_alone() {
    let cluster = Cluster::start("worker-refused-drop", 1);
    let n1 = cluster.node(0);
    n1.exec("CREATE ROLE plain LOGIN");
    wait_workers(n1, 1);
    let pid = "SELECT pid FROM pg_stat_activity WHERE backend_type = 'trompe worker' AND datname = 'app'";
    let before = n1.query_i64(pid);
    let mut elsewhere = n1.connect_to("postgres");
    let mut here = n1.connect();
    for c in [&mut elsewhere, &mut here] {
        c.batch_execute("SET ROLE plain").unwrap();
    }
    for _ in 0..3 {
        for sql in [
            "DROP DATABASE app",
            "ALTER DATABASE app RENAME TO other",
            "ALTER DATABASE app SET TABLESPACE pg_default",
            "CREATE DATABASE other TEMPLATE app",
        ] {
            let (code, message) = expect_error(&mut elsewhere, sql);
            assert_eq!(code, "42501", "{sql}: {message}");
        }
        let (code, message) = expect_error(&mut here, "DROP EXTENSION trompe CASCADE");
        assert_eq!(code, "42501", "{message}");
    }
    assert_eq!(n1.query_i64(pid), before, "the worker kept running");
}

/// The `trompe.` prefix is reserved: a misspelt setting is an error naming it, not a silent
/// placeholder, while real ones set as usual.
#[test]
fn a_misspelt_setting_is_refused() {
    let cluster = Cluster::start("guc-prefix", 1);
    let n1 = cluster.node(0);
    let mut client = n1.connect();
    let (code, message) = expect_error(&mut client, "SET trompe.max_clock_skw = '5s'");
    assert_eq!(code, "42602", "{message}");
    assert!(message.contains("trompe.max_clock_skw"), "{message}");
    client.batch_execute("SET trompe.max_clock_skew = '5s'").expect("a real setting");
}

/// The worker reports what it writes to the cumulative statistics while it runs: autovacuum and
/// autoanalyze see a table only through them, and a table that only peers write was never
/// vacuumed or analyzed (its dead rows piling up) while the worker lived.
#[test]
fn the_worker_reports_what_it_applies_to_the_statistics() {
    let cluster = Cluster::start("worker-statistics", 2);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    cluster.exec_all("CREATE TABLE t (id int PRIMARY KEY, v int); SELECT trompe.add_table('t')");
    cluster.mesh();
    n1.exec("INSERT INTO t SELECT g, 0 FROM generate_series(1, 100) g");
    n1.exec("UPDATE t SET v = 1 WHERE id <= 40");
    n1.exec("DELETE FROM t WHERE id > 90");
    cluster.wait_sync(Duration::from_secs(60));
    let counts =
        "SELECT n_tup_ins || ' ' || n_tup_upd || ' ' || n_tup_del FROM pg_stat_user_tables WHERE relname = 't'";
    let reported = wait_for(Duration::from_secs(20), || n2.query_text(counts).as_deref() == Some("100 40 10"));
    // The worker is still the one that applied them: nothing was flushed by its exit.
    assert!(reported, "n2's statistics of t: {:?}", n2.query_text(counts));
    wait_workers(n2, 1);
}
