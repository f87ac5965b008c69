//! A node joining a running cluster: `trompe.add_peer(..., sync => true)` on a new, empty node
//! copies the schema and data (with large objects and tombstones) of one peer in one snapshot
//! while every node keeps taking writes; after adding the other nodes as peers it ends
//! identical to them and keeps up.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use trompe_tests::{checksum, expect_error, Cluster, Node, Rng};

const SYNC: Duration = Duration::from_secs(300);

/// Every row of docs as `id:<md5 of its large object>`.
const DOCS: &str = "SELECT string_agg(format('%s:%s', id, md5(lo_get(body))), ' ' ORDER BY id) FROM docs";

/// Random writes on one node until `stop`: updates of shared rows (so nodes conflict), inserts
/// of keys of this writer's own, deletes; returns how many statements committed.
fn writer(node: &Node, seed: u64, base: i64, stop: &AtomicBool) -> u64 {
    let mut client = node.connect();
    let mut rng = Rng::new(seed);
    let mut next_id = base;
    let mut done = 0;
    while !stop.load(Ordering::Relaxed) {
        let sql = match rng.below(10) {
            0..=5 => format!(
                "UPDATE acct SET balance = balance + {} WHERE id = {}",
                rng.between(-50, 50),
                rng.between(1, 3000)
            ),
            6..=7 => {
                next_id += 1;
                format!("INSERT INTO acct VALUES ({next_id}, {}, 'from {base}')", rng.below(1000))
            }
            8 => format!("DELETE FROM acct WHERE id = {}", rng.between(1, 3000)),
            _ => format!(
                "INSERT INTO app.items VALUES ({}, 'v{}') ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v",
                base + rng.between(0, 200),
                rng.below(100)
            ),
        };
        if client.batch_execute(&sql).is_ok() {
            done += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    done
}

#[test]
fn a_third_node_joins_under_write_load_and_ends_identical() {
    let cluster = Cluster::start("join", 3);
    let (n1, n2, n3) = (cluster.node(0), cluster.node(1), cluster.node(2));
    for node in [n1, n2] {
        node.exec(
            "CREATE TYPE mood AS ENUM ('calm', 'busy');
             CREATE TABLE acct (id int PRIMARY KEY, balance int NOT NULL, note text, m mood DEFAULT 'calm');
             CREATE INDEX acct_balance ON acct (balance);
             SELECT trompe.add_table('acct');
             CREATE TABLE docs (id int PRIMARY KEY, body oid);
             SELECT trompe.add_table('docs');
             SELECT trompe.set_conflict_rule('docs', 'node_priority');
             SELECT trompe.set_node_priority('00000000-0000-0000-0000-00000000000a', 5);
             CREATE SCHEMA app;
             SELECT trompe.add_schema('app');",
        );
    }
    cluster.add_peer(0, 1);
    cluster.add_peer(1, 0);
    // A table created after the schema was replicated reaches n2 through DDL replication.
    n1.exec("CREATE TABLE app.items (id int PRIMARY KEY, v text)");
    n1.exec("INSERT INTO acct SELECT g, g % 100, 'row ' || g FROM generate_series(1, 3000) g");
    // Values the COPY stream escapes: tabs, newlines, backslashes, quotes, non-ASCII.
    n1.exec("INSERT INTO acct VALUES (99999, 1, E'tab\\there\\nnew line \\\\ back \"q\" é✓ \\\\N')");
    n1.exec("INSERT INTO docs VALUES (1, lo_from_bytea(0, 'first document')), (2, lo_from_bytea(0, repeat('x', 300000)::bytea))");
    n2.exec("UPDATE acct SET balance = balance + 1 WHERE id % 7 = 0");
    n2.exec("DELETE FROM acct WHERE id % 11 = 0");
    for node in [n1, n2] {
        assert_eq!(node.query_text("SELECT trompe.wait_sync('5 minutes')").as_deref(), Some("t"));
    }

    // Only a new, empty node can join: nothing changes when it is refused.
    n3.exec("CREATE TABLE junk (id int)");
    let sync_sql = format!("SELECT trompe.add_peer('n1', '{}', sync => true)", cluster.peer_conninfo(2, 0));
    let (code, message) = expect_error(&mut n3.connect(), &sync_sql);
    assert_eq!(code, "55000", "{message}");
    assert!(message.contains("junk"), "{message}");
    assert_eq!(n3.query_i64("SELECT count(*) FROM trompe.peers"), 0);
    n3.exec("DROP TABLE junk");

    let stop = AtomicBool::new(false);
    let written = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for (node, seed, base) in [(n1, 7, 100_000i64), (n2, 8, 200_000)] {
            let (stop, written) = (&stop, &written);
            scope.spawn(move || written.fetch_add(writer(node, seed, base, stop), Ordering::Relaxed));
        }
        std::thread::sleep(Duration::from_millis(500));
        // n1 stops applying n2's changes for a while: when n3 copies n1, many of n2's changes
        // are still on their way, some older than n1's own later updates of the same rows
        // (which must win on n3 as they did on n1, so the copied rows must keep their versions),
        // and n3 must pull n2 from where n1 had applied it.
        n1.exec("SELECT trompe.pause_peer('n2')");
        std::thread::sleep(Duration::from_secs(1));

        // The join, while n1 and n2 take writes (n1's statistics say how many rows to expect).
        n1.exec("ANALYZE acct, app.items");
        n3.exec(&sync_sql);
        // Another peer waits until the copy is done (unless it already is).
        let add_n2 = format!("SELECT trompe.add_peer('n2', '{}')", cluster.peer_conninfo(2, 1));
        let added_early = match n3.connect().batch_execute(&add_n2) {
            Ok(()) => true,
            Err(e) => {
                let code = e.as_db_error().map(|d| d.code().code().to_string());
                assert_eq!(code.as_deref(), Some("55000"), "adding another peer during the copy: {e}");
                false
            }
        };
        n3.wait_for_value("SELECT sync_state FROM trompe.status WHERE name = 'n1'", "done", SYNC);
        if !added_early {
            n3.exec(&add_n2);
        }
        n1.exec("SELECT trompe.resume_peer('n2')");
        cluster.add_peer(0, 2);
        cluster.add_peer(1, 2);
        // The new node writes too.
        let (stop, written) = (&stop, &written);
        scope.spawn(move || written.fetch_add(writer(n3, 99, 300_000, stop), Ordering::Relaxed));
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::Relaxed);
    });
    assert!(written.load(Ordering::Relaxed) > 100, "the writers wrote");
    cluster.wait_sync(SYNC);
    cluster.wait_sync(SYNC);
    for table in ["acct", "app.items"] {
        cluster.assert_same(&checksum(table));
    }
    cluster.assert_same(DOCS);
    // The replication configuration came along: tables with their rules, node priorities.
    cluster.assert_same(
        "SELECT string_agg(relid::text || ' ' || conflict_rule, ',' ORDER BY relid::text) FROM trompe.tables",
    );
    assert_eq!(
        n3.query_text("SELECT string_agg(node_id || ' ' || priority, ',') FROM trompe.node_priorities").as_deref(),
        Some("00000000-0000-0000-0000-00000000000a 5")
    );
    cluster.assert_same("SELECT string_agg(schema_name, ',') FROM trompe.schemas");
    assert!(n3.query_i64("SELECT count(*) FROM acct WHERE id > 300000") > 0, "n3's own writes reached n3");
    assert!(n1.query_i64("SELECT count(*) FROM acct WHERE id > 300000") > 0, "and n1");
    let status = n3.query_row(
        "SELECT sync_rows_copied, sync_tables_copied, sync_tables_total, sync_rows_estimate FROM trompe.status
          WHERE name = 'n1'",
    );
    let number = |i: usize| status[i].as_deref().and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
    let copied = number(0);
    assert!(copied >= 2700, "status shows the copy: {status:?}");
    assert!(copied / 2 <= number(3) && number(3) <= copied * 2, "and how many rows it expected: {status:?}");
    assert_eq!(status[1], status[2], "every table copied: {status:?}");
    assert_eq!(n3.query_i64("SELECT count(*) FROM trompe.start_positions"), 0, "n2's start position was used");
    // Schema beyond the tables came along: the enum, the index.
    assert_eq!(n3.query_i64("SELECT count(*) FROM pg_indexes WHERE indexname = 'acct_balance'"), 1);
}

#[test]
fn an_interrupted_copy_starts_again_cleanly() {
    let cluster = Cluster::start("join-restart", 2);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    n1.exec(
        "CREATE TABLE big (id int PRIMARY KEY, v text, n numeric);
         SELECT trompe.add_table('big');
         INSERT INTO big SELECT g, md5(g::text), g / 7.0 FROM generate_series(1, 800000) g;
         CREATE TABLE docs (id int PRIMARY KEY, body oid);
         SELECT trompe.add_table('docs');
         INSERT INTO docs SELECT g, lo_from_bytea(0, convert_to(repeat('doc ' || g, 1000), 'UTF8')) FROM generate_series(1, 5) g;",
    );
    for i in 0..200 {
        n1.exec(&format!("UPDATE big SET v = 'updated' WHERE id = {}", i * 1000 + 1));
    }
    n1.exec("DELETE FROM big WHERE id % 1000 = 2");
    let started = std::time::Instant::now();
    n2.exec(&format!("SELECT trompe.add_peer('n1', '{}', sync => true)", cluster.peer_conninfo(1, 0)));
    let copying = "SELECT sync_state = 'copying' AND sync_rows_copied > 0 FROM trompe.status WHERE name = 'n1'";
    let caught = trompe_tests::wait_for(Duration::from_secs(120), || n2.query_text(copying).as_deref() == Some("t"));
    assert!(caught, "the copy was not seen in progress: {:?}", n2.query_row("SELECT * FROM trompe.status"));
    n2.crash_and_restart();
    n2.wait_for_value("SELECT sync_state FROM trompe.status WHERE name = 'n1'", "done", SYNC);
    eprintln!("copy with one interruption took {:?}", started.elapsed());
    assert!(n2.query_i64("SELECT attempts FROM trompe.syncs") >= 2, "the copy was attempted again");
    cluster.add_peer(0, 1);
    n1.exec("UPDATE big SET v = 'after the join' WHERE id = 3");
    cluster.wait_sync(SYNC);
    cluster.assert_same(&checksum("big"));
    cluster.assert_same(DOCS);
    cluster.assert_same("SELECT count(*) FROM pg_largeobject_metadata");
    cluster.assert_same("SELECT count(*) FROM trompe.tombstones");
}

/// A node joins through a login that is only a member of `trompe_puller` and
/// `pg_read_all_data`; a copy that fails (the role owning the tables is missing on the new node)
/// says why in `trompe.status` and succeeds on its own once the cause is fixed.
#[test]
fn a_node_joins_through_a_least_privilege_role_after_a_failed_attempt() {
    let cluster = Cluster::start("join-puller", 3);
    let (n1, n2, n3) = (cluster.node(0), cluster.node(1), cluster.node(2));
    let puller =
        |from: usize, to: usize| format!("host=127.0.0.1 port={} dbname=app user=puller", cluster.link(from, to).port);
    for node in [n1, n2] {
        node.exec(
            "CREATE ROLE puller LOGIN IN ROLE trompe_puller, pg_read_all_data;
             CREATE ROLE app_owner;
             CREATE TABLE t (id int PRIMARY KEY, v text, doc oid);
             ALTER TABLE t OWNER TO app_owner;
             SELECT trompe.add_table('t');",
        );
    }
    n1.exec(&format!("SELECT trompe.add_peer('n2', '{}')", puller(0, 1)));
    n2.exec(&format!("SELECT trompe.add_peer('n1', '{}')", puller(1, 0)));
    n1.exec("INSERT INTO t SELECT g, 'n1 ' || g FROM generate_series(1, 100) g");
    n1.exec("UPDATE t SET doc = lo_from_bytea(0, 'document of n1') WHERE id = 1");
    n2.exec("INSERT INTO t SELECT g, 'n2 ' || g FROM generate_series(101, 200) g");
    for node in [n1, n2] {
        assert_eq!(node.query_text("SELECT trompe.wait_sync('2 minutes')").as_deref(), Some("t"));
    }

    n3.exec(&format!("SELECT trompe.add_peer('n1', '{}', sync => true)", puller(2, 0)));
    let failed = "SELECT last_error LIKE '%app_owner%' FROM trompe.status WHERE name = 'n1'";
    n3.wait_for_value(failed, "t", Duration::from_secs(60));
    assert_eq!(n3.query_text("SELECT state FROM trompe.status").as_deref(), Some("syncing"));
    assert_eq!(n3.query_i64("SELECT count(*) FROM pg_class WHERE relname = 't'"), 0, "a failed attempt leaves nothing");
    n3.exec("CREATE ROLE app_owner");
    n3.wait_for_value("SELECT sync_state FROM trompe.status WHERE name = 'n1'", "done", SYNC);
    n3.exec(&format!("SELECT trompe.add_peer('n2', '{}')", puller(2, 1)));
    n3.exec("CREATE ROLE puller LOGIN IN ROLE trompe_puller, pg_read_all_data");
    n1.exec(&format!("SELECT trompe.add_peer('n3', '{}')", puller(0, 2)));
    n2.exec(&format!("SELECT trompe.add_peer('n3', '{}')", puller(1, 2)));
    n3.exec("UPDATE t SET v = 'from n3' WHERE id = 150");
    n2.exec("UPDATE t SET v = 'from n2' WHERE id = 50");
    cluster.wait_sync(SYNC);
    // Each node has its own oid for its copy of a large object: compare the bytes instead.
    cluster.assert_same(&checksum("(SELECT id, v, md5(lo_get(doc)) AS doc FROM t)"));
    assert_eq!(
        cluster.assert_same("SELECT md5(lo_get(doc)) FROM t WHERE id = 1"),
        n1.query_text("SELECT md5('document of n1'::bytea)")
    );
    assert_eq!(n3.query_text("SELECT tableowner FROM pg_tables WHERE tablename = 't'").as_deref(), Some("app_owner"));
    assert_eq!(n3.query_i64("SELECT count(*) FROM trompe.status WHERE state = 'connected' AND last_error IS NULL"), 2);
}

/// While a joining node reads the positions of the node it copies, that node applies nothing:
/// its apply transactions wait for the apply lock the joining node holds.
#[test]
fn applying_waits_while_a_joining_node_holds_the_apply_lock() {
    let cluster = Cluster::start("join-apply-lock", 2);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    cluster.exec_all("CREATE TABLE t (id int PRIMARY KEY); SELECT trompe.add_table('t')");
    cluster.mesh();
    let mut joining = n1.connect();
    joining.batch_execute("SELECT pg_advisory_lock(128034844536933)").expect("lock");
    n2.exec("INSERT INTO t VALUES (1)");
    let waiting = "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                    WHERE l.locktype = 'advisory' AND NOT l.granted AND a.application_name = 'trompe worker'";
    n1.wait_for_value(waiting, "1", SYNC);
    assert_eq!(n1.query_i64("SELECT count(*) FROM t"), 0, "nothing is applied while the lock is held");
    joining.batch_execute("SELECT pg_advisory_unlock(128034844536933)").expect("unlock");
    n1.wait_for_value("SELECT count(*) FROM t", "1", SYNC);
}

/// A joined node adds the other nodes as peers from where its copy left them; if one of them
/// stopped keeping its log for the new node meanwhile, `add_peer` refuses (55000) instead of
/// starting later and losing changes, and changes nothing.
#[test]
fn a_peer_that_no_longer_keeps_its_log_for_the_joined_node_is_refused() {
    let cluster = Cluster::start("join-lost-start", 3);
    let (n1, n2, n3) = (cluster.node(0), cluster.node(1), cluster.node(2));
    for node in [n1, n2] {
        node.exec("CREATE TABLE t (id int PRIMARY KEY); SELECT trompe.add_table('t')");
    }
    cluster.add_peer(0, 1);
    cluster.add_peer(1, 0);
    n2.exec("INSERT INTO t VALUES (1)");
    n3.exec(&format!("SELECT trompe.add_peer('n1', '{}', sync => true)", cluster.peer_conninfo(2, 0)));
    n3.wait_for_value("SELECT sync_state FROM trompe.status WHERE name = 'n1'", "done", SYNC);
    let n3_id = n3.query_text("SELECT trompe.node_id()").unwrap_or_default();
    assert_eq!(n2.query_i64(&format!("SELECT count(*) FROM trompe.consumers WHERE node_id = '{n3_id}'")), 1);
    n2.exec(&format!("SELECT trompe.unregister_consumer('{n3_id}')"));
    let (code, message) =
        expect_error(&mut n3.connect(), &format!("SELECT trompe.add_peer('n2', '{}')", cluster.peer_conninfo(2, 1)));
    assert_eq!(code, "55000", "{message}");
    assert!(message.contains("no longer keeps its log"), "{message}");
    assert_eq!(n3.query_i64("SELECT count(*) FROM trompe.peers"), 1, "nothing changed");
    assert_eq!(n3.query_i64("SELECT count(*) FROM trompe.start_positions"), 1, "the start position is kept");
}

/// A copy that keeps failing in the middle (a row the new node's schema refuses) is undone by
/// `remove_peer`: the node is empty again and joins once the cause is fixed.
#[test]
fn removing_the_peer_of_an_unfinished_copy_leaves_an_empty_node() {
    let cluster = Cluster::start("join-removed", 2);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    n1.exec("CREATE TABLE t (id int PRIMARY KEY, v int, doc oid); SELECT trompe.add_table('t')");
    // Two transactions, so two versions: the first is copied (with its large object) before
    // the second fails.
    n1.exec("INSERT INTO t VALUES (1, 5, lo_from_bytea(0, 'kept'))");
    n1.exec("INSERT INTO t VALUES (2, -1, NULL)");
    n1.exec("ALTER TABLE t ADD CONSTRAINT positive CHECK (v > 0) NOT VALID");
    let join = format!("SELECT trompe.add_peer('n1', '{}', sync => true)", cluster.peer_conninfo(1, 0));
    n2.exec(&join);
    n2.wait_for_value("SELECT last_error LIKE '%positive%' FROM trompe.status", "t", SYNC);
    assert_eq!(n2.query_i64("SELECT count(*) FROM pg_class WHERE relname = 't'"), 1, "the copy got as far as the rows");
    assert!(n2.query_i64("SELECT count(*) FROM pg_largeobject_metadata") <= 1);
    n2.exec("SELECT trompe.remove_peer('n1')");
    assert_eq!(n2.query_i64("SELECT count(*) FROM pg_class WHERE relname = 't'"), 0);
    assert_eq!(n2.query_i64("SELECT count(*) FROM pg_largeobject_metadata"), 0, "copied large objects are unlinked");
    assert_eq!(n2.query_i64("SELECT count(*) FROM trompe.tables"), 0);
    n1.exec("UPDATE t SET v = 1 WHERE id = 2");
    n2.exec(&join);
    n2.wait_for_value("SELECT sync_state FROM trompe.status WHERE name = 'n1'", "done", SYNC);
    cluster.assert_same(&checksum("(SELECT id, v, md5(lo_get(doc)) FROM t)"));
}

/// The schema a peer's users wrote, as `pg_dump` writes it back.
const SCHEMA_TEXT: &str = r#"
CREATE TABLE t (id int PRIMARY KEY, note text DEFAULT E'first\n\\second line');
COMMENT ON TABLE t IS E'a comment\n\\connect other\n\\q';
COMMENT ON COLUMN t.note IS E'more\nSET x = 1;';
CREATE FUNCTION set_memory() RETURNS void LANGUAGE plpgsql AS $f$
BEGIN
SET work_mem = '64MB';
END
$f$;
CREATE FUNCTION set_memory_locally() RETURNS void LANGUAGE plpgsql AS $f$
BEGIN
SET LOCAL work_mem = '64MB';
END
$f$;
CREATE FUNCTION backslash() RETURNS text LANGUAGE sql AS $f$
SELECT 'one
\two'
$f$;
CREATE TABLE seen (id int, settings text);
CREATE FUNCTION note_settings() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
  INSERT INTO public.seen VALUES (NEW.id, concat_ws(' ', current_setting('check_function_bodies'),
    current_setting('client_min_messages'), current_setting('row_security'), current_setting('lock_timeout'),
    current_setting('xmloption'), current_setting('default_tablespace')));
  RETURN NEW;
END
$f$;
CREATE TRIGGER note_settings AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION note_settings();
ALTER TABLE t ENABLE ALWAYS TRIGGER note_settings;
SELECT trompe.add_table('t');
INSERT INTO t VALUES (1, DEFAULT), (2, E'two\n\\lines');
"#;

/// The schema is copied exactly as the peer has it: function bodies with lines starting with
/// `SET`, string literals with lines starting with a backslash, and user triggers arrive
/// unchanged, trompe's own triggers exist once, and the settings the dump makes do not stay
/// in the worker's session (a row applied afterwards sees the settings a worker that never
/// joined sees).
#[test]
fn a_joined_node_has_the_schema_text_of_its_peer_unchanged() {
    let cluster = Cluster::start("join-schema-text", 2);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    n1.exec(SCHEMA_TEXT);
    n2.exec(&format!("SELECT trompe.add_peer('n1', '{}', sync => true)", cluster.peer_conninfo(1, 0)));
    let done = trompe_tests::wait_for(Duration::from_secs(120), || {
        n2.query_text("SELECT sync_state FROM trompe.status WHERE name = 'n1'").as_deref() == Some("done")
    });
    assert!(done, "the copy did not finish: {:?}", n2.query_row("SELECT sync_state, last_error FROM trompe.status"));
    cluster.add_peer(0, 1);

    let functions = "SELECT string_agg(proname || ': ' || prosrc, E'\n' ORDER BY proname) FROM pg_proc
                      WHERE pronamespace = 'public'::regnamespace";
    let bodies = cluster.assert_same(functions).unwrap_or_default();
    assert!(bodies.contains("\nSET work_mem = '64MB';\n"), "{bodies}");
    assert!(bodies.contains("\nSET LOCAL work_mem = '64MB';\n"), "{bodies}");
    assert!(bodies.contains("\n\\two'"), "{bodies}");
    let comments = "SELECT string_agg(d.objsubid || ': ' || d.description, E'\n' ORDER BY d.objsubid)
                      FROM pg_description d WHERE d.objoid = 'public.t'::regclass";
    assert_eq!(
        cluster.assert_same(comments).as_deref(),
        Some("0: a comment\n\\connect other\n\\q\n2: more\nSET x = 1;")
    );
    let default = "SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef WHERE adrelid = 'public.t'::regclass";
    assert_eq!(cluster.assert_same(default).as_deref(), Some("'first\n\\second line'::text"));
    let triggers = "SELECT string_agg(tgname || ' ' || tgenabled::text, ', ' ORDER BY tgname) FROM pg_trigger
                     WHERE tgrelid = 'public.t'::regclass AND NOT tgisinternal";
    assert_eq!(
        cluster.assert_same(triggers).as_deref(),
        Some("note_settings A, trompe_capture O, trompe_truncate O"),
        "the user trigger is copied, trompe's own exist once"
    );
    cluster.assert_same(&checksum("t"));

    // Each node's worker applies a row of the other: both see the same settings.
    n1.exec("INSERT INTO t VALUES (3, 'written on n1')");
    n2.exec("INSERT INTO t VALUES (4, 'written on n2')");
    cluster.wait_sync(SYNC);
    cluster.assert_same(&checksum("t"));
    let applied_on_n2 = n2.query_text("SELECT settings FROM seen WHERE id = 3");
    let applied_on_n1 = n1.query_text("SELECT settings FROM seen WHERE id = 4");
    assert!(applied_on_n1.is_some(), "the trigger fired on n1 for the applied row");
    assert_eq!(applied_on_n2, applied_on_n1, "the joined node's worker kept its own settings");
}
