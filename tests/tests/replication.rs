//! Replication between real nodes: meshes converge, nothing is lost or applied twice when
//! either side crashes, outages heal by themselves, failing changes stop only their stream.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use trompe_tests::{checksum, expect_error, wait_for, Cluster, Node};

const SYNC: Duration = Duration::from_secs(120);

/// A procedure that commits `txns` transactions of `rows` inserts each into `items`, ids from
/// `first` upwards.
const FILL: &str = "CREATE PROCEDURE fill(first bigint, txns int, rows int) LANGUAGE plpgsql AS $$
    BEGIN
        FOR t IN 0 .. txns - 1 LOOP
            INSERT INTO items (id, note) SELECT first + t * rows + g, 'row ' || (first + t * rows + g) FROM generate_series(0, rows - 1) g;
            COMMIT;
        END LOOP;
    END $$";

/// Counts, on this node, every change applied to `items` by any path (a trigger that fires in
/// replica mode too), so re-applying anything shows. Like native logical replication, trompe
/// applies with an empty search_path, so the trigger names its table with its schema.
const AUDIT: &str = "CREATE TABLE audit (op text, id bigint);
    CREATE FUNCTION audit_items() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO public.audit VALUES (TG_OP, CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END);
        RETURN NULL;
    END $$;
    CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON items FOR EACH ROW EXECUTE FUNCTION audit_items();
    ALTER TABLE items ENABLE ALWAYS TRIGGER audit";

fn items_everywhere(cluster: &Cluster) {
    cluster.exec_all("CREATE TABLE items (id bigint PRIMARY KEY, note text); SELECT trompe.add_table('items')");
    cluster.exec_all(FILL);
}

#[test]
fn two_node_mesh_converges() {
    let cluster = Cluster::start("two-node-mesh", 2);
    items_everywhere(&cluster);
    cluster.mesh();
    cluster.node(0).exec("INSERT INTO items (id, note) SELECT g, 'from n1' FROM generate_series(1, 100) g");
    cluster.node(1).exec("INSERT INTO items (id, note) SELECT g, 'from n2' FROM generate_series(101, 200) g");
    cluster
        .node(0)
        .exec("UPDATE items SET note = 'changed' WHERE id <= 10; DELETE FROM items WHERE id BETWEEN 11 AND 20");
    cluster
        .node(1)
        .exec("UPDATE items SET note = 'changed too' WHERE id > 190; UPDATE items SET id = id + 1000 WHERE id = 150");
    cluster.wait_sync(SYNC);
    let sum = cluster.assert_same(&checksum("items")).unwrap();
    assert!(sum.starts_with("190:"), "{sum}");
    assert_eq!(cluster.node(0).query_i64("SELECT count(*) FROM items WHERE id = 1150"), 1, "a key change replicates");
}

#[test]
fn three_node_mesh_converges_with_writes_everywhere() {
    let cluster = Cluster::start("three-node-mesh", 3);
    items_everywhere(&cluster);
    cluster.mesh();
    for (i, node) in cluster.nodes().iter().enumerate() {
        node.exec(&format!("CALL fill({}, 50, 3)", 1 + i * 100_000));
    }
    cluster.node(2).exec("DELETE FROM items WHERE id % 7 = 0");
    cluster.wait_sync(SYNC);
    let sum = cluster.assert_same(&checksum("items")).unwrap();
    let expected = cluster.node(0).query_i64("SELECT count(*) FROM items");
    assert!(expected > 300, "{sum}");
    for node in cluster.nodes() {
        let errors = node.query_i64("SELECT count(*) FROM trompe.status WHERE last_error IS NOT NULL");
        assert_eq!(errors, 0, "node {} reports errors", node.name);
        let states = node.query_text("SELECT string_agg(DISTINCT state, ',') FROM trompe.status").unwrap();
        assert_eq!(states, "connected", "node {}", node.name);
    }
}

/// Waits until `node` has applied some but not all of `total` rows of `items`.
fn wait_mid_apply(node: &Node, total: i64) -> i64 {
    let mut seen = 0;
    let ok = wait_for(Duration::from_secs(60), || {
        seen = node.query_i64("SELECT count(*) FROM items");
        seen > 0
    });
    assert!(ok, "node {} applied nothing", node.name);
    assert!(seen < total, "node {} applied everything before it could be crashed ({seen})", node.name);
    seen
}

#[test]
fn crash_of_the_applying_node_loses_and_duplicates_nothing() {
    let cluster = Cluster::start("crash-applier", 2);
    cluster.exec_all("CREATE TABLE items (id bigint PRIMARY KEY, note text)");
    cluster.node(1).exec(AUDIT);
    cluster.exec_all("SELECT trompe.add_table('items')");
    cluster.exec_all(FILL);
    cluster.mesh();
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    n2.exec("SELECT trompe.pause_peer('n1')");
    n1.exec("CALL fill(1, 6000, 5)");
    let total = 30_000;
    n2.exec("SELECT trompe.resume_peer('n1')");
    let seen = wait_mid_apply(n2, total);
    n2.crash_and_restart();
    cluster.wait_sync(SYNC);
    assert_eq!(n2.query_i64("SELECT count(*) FROM items"), total, "crashed after {seen} rows");
    cluster.assert_same(&checksum("items"));
    assert_eq!(n2.query_i64("SELECT count(*) FROM audit"), total, "every change applied exactly once");
    assert_eq!(n2.query_i64("SELECT count(DISTINCT id) FROM audit"), total);
    // The counters in trompe.status are written when a step starts or ends: a crash inside a
    // step loses the count (not the changes) of what was applied since.
    let counted = n2.query_i64("SELECT applied_changes FROM trompe.status WHERE name = 'n1'");
    assert!(counted > 0 && counted <= total, "applied_changes {counted} of {total}");
}

#[test]
fn crash_of_the_origin_loses_and_duplicates_nothing() {
    let cluster = Cluster::start("crash-origin", 2);
    cluster.exec_all("CREATE TABLE items (id bigint PRIMARY KEY, note text)");
    cluster.node(1).exec(AUDIT);
    cluster.exec_all("SELECT trompe.add_table('items')");
    cluster.mesh();
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    // A client keeps committing single inserts on n1 and counts the ones it saw commit.
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicI64::new(0));
    let writer = {
        let (stop, committed) = (stop.clone(), committed.clone());
        let conninfo = n1.conninfo();
        std::thread::spawn(move || {
            let mut next = 1i64;
            while !stop.load(Ordering::SeqCst) {
                let Ok(mut c) = postgres::Client::connect(&conninfo, postgres::NoTls) else {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                while !stop.load(Ordering::SeqCst) {
                    match c.execute("INSERT INTO items VALUES ($1, 'x')", &[&next]) {
                        Ok(_) => {
                            committed.fetch_add(1, Ordering::SeqCst);
                            next += 1;
                        }
                        Err(_) => {
                            // Unknown outcome: the insert may have committed just before the
                            // crash. Skip the id; the final comparison is against n1 itself.
                            next += 1;
                            break;
                        }
                    }
                }
            }
        })
    };
    assert!(wait_for(Duration::from_secs(30), || n2.query_i64("SELECT count(*) FROM items") > 200));
    n1.crash_and_restart();
    assert!(wait_for(Duration::from_secs(30), || committed.load(Ordering::SeqCst) > 600));
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    cluster.wait_sync(SYNC);
    let on_origin = n1.query_i64("SELECT count(*) FROM items");
    assert!(on_origin >= committed.load(Ordering::SeqCst), "the origin lost acknowledged commits");
    cluster.assert_same(&checksum("items"));
    assert_eq!(n2.query_i64("SELECT count(*) FROM audit"), on_origin, "every change applied exactly once");
}

/// A consumer takes the origin's snapshot as its position: every transaction id below its
/// xmax counts as seen. Transactions that ended asynchronously (trompe's own apply and pull
/// sessions commit so) may not be on disk yet; if the origin is killed then, PostgreSQL gives
/// their ids out again, and the consumer would skip for good the new transactions that get
/// them: the origin flushes its WAL before it serves a snapshot.
/// The origin's WAL writer is stopped so that the window (normally `wal_writer_delay`) stays
/// open until the kill.
#[test]
fn origin_crash_after_serving_unflushed_transactions_loses_nothing() {
    // Nothing but the WAL writer (and n1's worker, paused below) would write n1's WAL in the
    // background.
    let cluster = Cluster::builder("crash-unflushed")
        .nodes(2)
        .setting("autovacuum", "off")
        .setting("bgwriter_lru_maxpages", "0")
        .start();
    cluster.exec_all("CREATE TABLE items (id bigint PRIMARY KEY, note text)");
    cluster.exec_all("SELECT trompe.add_table('items')");
    cluster.mesh();
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    n1.exec("INSERT INTO items VALUES (0, 'before')");
    cluster.wait_sync(SYNC);
    // n1's worker flushes its own commits when it is caught up: it rests meanwhile.
    n1.exec("SELECT trompe.pause_peer('n2')");
    n1.stop_wal_writer();
    let mut c = n1.connect();
    c.batch_execute("SET synchronous_commit = off").unwrap();
    let mut last = 0i64;
    for _ in 0..50 {
        last = c.query_one("SELECT pg_current_xact_id()::text::bigint", &[]).unwrap().get(0);
    }
    drop(c);
    // n2 moves past them (its position is stored now and then when nothing is new).
    n2.wait_for_value(
        &format!("SELECT pg_visible_in_snapshot('{last}'::xid8, done::pg_snapshot) FROM trompe.progress"),
        "t",
        Duration::from_secs(60),
    );
    n1.crash_and_restart();
    n1.exec("SELECT trompe.resume_peer('n2')");
    let mut c = n1.connect();
    let mut reused = 0;
    for id in 1..=60i64 {
        let xid: i64 = c
            .query_one("INSERT INTO items VALUES ($1, 'after') RETURNING pg_current_xact_id()::text::bigint", &[&id])
            .unwrap()
            .get(0);
        if xid <= last {
            reused += 1;
        }
    }
    println!("after the crash, n1 gave {reused} transaction ids up to {last} out again");
    cluster.wait_sync(SYNC);
    assert_eq!(
        n2.query_i64("SELECT count(*) FROM items"),
        61,
        "n2 misses commits n1 made after its crash (n1 gave {reused} ids up to {last} out again): {:?}",
        n2.query_text("SELECT string_agg(id::text, ',') FROM items")
    );
    cluster.assert_same(&checksum("items"));
}

/// Serving a snapshot flushes the WAL to the end of what was inserted. When the WAL ends exactly
/// at a page boundary, the insert position is past the next page's header, where PostgreSQL
/// refuses a flush ("xlog flush request ... is not satisfied"): a join failed with that. WAL
/// messages are sized to end a page, then a snapshot is served right there.
#[test]
fn a_snapshot_is_served_when_the_wal_ends_at_a_page_boundary() {
    const PAGE: i64 = 8192;
    let cluster = Cluster::start("wal-page-end", 1);
    let mut c = cluster.node(0).connect();
    let insert = |c: &mut postgres::Client| -> i64 {
        c.query_one("SELECT (pg_current_wal_insert_lsn() - '0/0')::bigint", &[]).expect("insert position").get(0)
    };
    let emit = |c: &mut postgres::Client, bytes: i64| {
        c.execute("SELECT pg_logical_emit_message(false, 'trompe-test', repeat('x', $1::bigint::int))", &[&bytes])
            .expect("a WAL message");
    };
    // A message of `probe + k * 8` bytes takes exactly `k * 8` bytes more WAL than one of `probe`.
    let probe = 1000i64;
    let mut at_boundary = 0;
    for _ in 0..40 {
        let start = insert(&mut c);
        if PAGE - start % PAGE < 2 * probe + 200 {
            emit(&mut c, probe);
            continue;
        }
        emit(&mut c, probe);
        let taken = insert(&mut c) - start;
        let left = PAGE - insert(&mut c) % PAGE;
        let bytes = probe + left - taken;
        let row = c
            .query_one(
                "SELECT (pg_logical_emit_message(false, 'trompe-test', repeat('x', $1::bigint::int)) - '0/0')::bigint,
                        (pg_current_wal_insert_lsn() - '0/0')::bigint,
                        trompe.current_snapshot()::text",
                &[&bytes],
            )
            .unwrap_or_else(|e| panic!("serving a snapshot: {}", trompe_tests::describe_error(&e)));
        let after: i64 = row.get(1);
        if after % PAGE == 24 || after % PAGE == 40 {
            at_boundary += 1;
        }
        if at_boundary >= 3 {
            break;
        }
    }
    assert!(at_boundary >= 3, "the WAL ended at a page boundary only {at_boundary} times");
}

#[test]
fn network_cut_with_writes_on_both_sides_heals_by_itself() {
    let cut_secs: u64 = std::env::var("TROMPE_CUT_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(45);
    let cluster = Cluster::start("network-cut", 2);
    items_everywhere(&cluster);
    cluster.mesh();
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    n1.exec("CALL fill(1, 10, 10)");
    cluster.wait_sync(SYNC);
    cluster.partition(0, 1);
    let started = Instant::now();
    let mut round = 0;
    while started.elapsed() < Duration::from_secs(cut_secs) {
        n1.exec(&format!("CALL fill({}, 5, 4)", 1_000_000 + round * 100));
        n2.exec(&format!("CALL fill({}, 5, 4)", 2_000_000 + round * 100));
        round += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    let errors = n1.query_text("SELECT last_error FROM trompe.status WHERE name = 'n2'");
    assert!(errors.is_some(), "the cut is visible in trompe.status");
    cluster.heal_pair(0, 1);
    cluster.wait_sync(SYNC);
    let sum = cluster.assert_same(&checksum("items")).unwrap();
    assert!(sum.starts_with(&format!("{}:", 100 + round * 40)), "{sum}");
    assert!(wait_for(Duration::from_secs(30), || {
        n1.query_text("SELECT state FROM trompe.status").as_deref() == Some("connected")
    }));
}

/// Removing a peer and adding it again (what changing a connection string took before
/// `alter_peer`) loses nothing: the node resumes where it stopped, so what the peer committed
/// meanwhile arrives too; and the removal touches only what this node pulls, not what the
/// removed peer pulls from it.
#[test]
fn removed_and_re_added_peer_resumes_where_it_stopped() {
    // No log rotation during the test: the removed node's position stays in n1's log.
    let cluster = Cluster::builder("remove-readd").nodes(2).setting("trompe.log_rotation_interval", "'1h'").start();
    items_everywhere(&cluster);
    cluster.mesh();
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    let n1_id = n1.query_text("SELECT trompe.node_id()").unwrap_or_default();
    n1.exec("INSERT INTO items VALUES (1, 'before')");
    cluster.wait_sync(SYNC);
    n2.exec("SELECT trompe.remove_peer('n1')");
    assert_eq!(n2.query_i64("SELECT count(*) FROM trompe.peers"), 0);
    assert_eq!(n1.query_i64("SELECT count(*) FROM trompe.consumers"), 0, "n1 no longer keeps its log for n2");
    assert_eq!(n2.query_i64("SELECT count(*) FROM trompe.consumers"), 1, "n1 still pulls from n2");
    // Once n2's worker has let go of n1, its position there is still kept.
    n1.wait_for_value(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'trompe' AND backend_type = 'client backend'",
        "0",
        Duration::from_secs(30),
    );
    assert_eq!(n2.query_i64(&format!("SELECT count(*) FROM trompe.progress WHERE node_id = '{n1_id}'")), 1);
    assert_eq!(
        n2.query_i64(&format!(
            "SELECT count(*) FROM pg_replication_origin WHERE roname = trompe._origin_name('{n1_id}')"
        )),
        1
    );
    n1.exec("INSERT INTO items VALUES (2, 'while removed')");
    n2.exec("INSERT INTO items VALUES (20, 'on n2 while n1 is removed there')");
    n1.wait_for_value("SELECT count(*) FROM items WHERE id = 20", "1", SYNC);
    cluster.add_peer(1, 0);
    n1.exec("INSERT INTO items VALUES (3, 'after')");
    cluster.wait_sync(SYNC);
    assert_eq!(n2.query_text("SELECT string_agg(id::text, ',' ORDER BY id) FROM items").as_deref(), Some("1,2,3,20"));
    cluster.assert_same(&checksum("items"));
    assert_eq!(n2.query_i64("SELECT count(*) FROM trompe.status WHERE last_error IS NOT NULL"), 0);
}

#[test]
fn a_failing_change_stops_only_its_stream_and_resumes_once_fixed() {
    let cluster = Cluster::start("failing-change", 3);
    cluster.exec_all("CREATE TABLE shared_t (id int PRIMARY KEY); SELECT trompe.add_table('shared_t')");
    cluster.exec_all("CREATE TABLE only_some (id int PRIMARY KEY)");
    cluster.node(0).exec("SELECT trompe.add_table('only_some')");
    cluster.node(2).exec("SELECT trompe.add_table('only_some')");
    cluster.mesh();
    let (n1, n2, n3) = (cluster.node(0), cluster.node(1), cluster.node(2));
    n1.exec("INSERT INTO only_some VALUES (1); INSERT INTO shared_t VALUES (1)");
    n3.exec("INSERT INTO shared_t VALUES (3)");
    let stuck = wait_for(Duration::from_secs(30), || {
        n2.query_text("SELECT last_error FROM trompe.status WHERE name = 'n1'")
            .is_some_and(|e| e.contains("only_some") && e.contains("not replicated on this node"))
    });
    assert!(stuck, "n2 shows why n1's stream stopped");
    n2.wait_for_value("SELECT count(*) FROM shared_t WHERE id = 3", "1", Duration::from_secs(30));
    assert_eq!(
        n2.query_i64("SELECT count(*) FROM shared_t WHERE id = 1"),
        0,
        "n1's transaction is applied whole or not at all"
    );
    n3.wait_for_value("SELECT count(*) FROM only_some", "1", Duration::from_secs(30));
    n2.exec("SELECT trompe.add_table('only_some')");
    cluster.wait_sync(SYNC);
    cluster.assert_same(&checksum("only_some"));
    cluster.assert_same(&checksum("shared_t"));
    assert!(wait_for(Duration::from_secs(10), || n2
        .query_i64("SELECT count(*) FROM trompe.status WHERE last_error IS NOT NULL")
        == 0));
}

#[test]
fn ddl_and_dml_replicate_in_order_and_truncate_follows() {
    let cluster = Cluster::start("ddl-order", 2);
    cluster.exec_all("CREATE SCHEMA app; SELECT trompe.add_schema('app')");
    cluster.mesh();
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    n1.exec(
        "CREATE TABLE app.t (id int PRIMARY KEY, v text);
         INSERT INTO app.t VALUES (1, 'a');
         ALTER TABLE app.t ADD COLUMN c int DEFAULT 7;
         INSERT INTO app.t VALUES (2, 'b', 8);
         CREATE INDEX t_c ON app.t (c);",
    );
    cluster.wait_sync(SYNC);
    cluster.assert_same(&checksum("app.t"));
    assert_eq!(n2.query_i64("SELECT count(*) FROM pg_indexes WHERE indexname = 't_c'"), 1);
    assert_eq!(n2.query_i64("SELECT count(*) FROM trompe.tables WHERE relid = 'app.t'::regclass"), 1);
    n2.exec("INSERT INTO app.t VALUES (3, 'from n2', 9)");
    cluster.wait_sync(SYNC);
    assert_eq!(n1.query_i64("SELECT count(*) FROM app.t"), 3, "a table created by replicated DDL replicates back");
    n1.exec("CREATE TABLE app.parent (id int PRIMARY KEY); CREATE TABLE app.child (id int PRIMARY KEY, p int REFERENCES app.parent)");
    n1.exec("INSERT INTO app.parent VALUES (1); INSERT INTO app.child VALUES (1, 1)");
    n1.exec("TRUNCATE app.parent, app.child RESTART IDENTITY");
    cluster.wait_sync(SYNC);
    assert_eq!(n2.query_i64("SELECT count(*) FROM app.child"), 0);
    n1.exec("DROP TABLE app.child");
    cluster.wait_sync(SYNC);
    assert_eq!(n2.query_i64("SELECT count(*) FROM pg_tables WHERE tablename = 'child'"), 0);
}

/// Applied inserts behave as the `INSERT` a user would run on the applying node: identity and
/// generated columns, domains and CHECK constraints, BEFORE and AFTER row triggers enabled for
/// replicas, secondary unique constraints; a constraint the node adds stops the stream with
/// its error until it is dropped; a column only the applying node has takes its default.
#[test]
fn applied_inserts_keep_the_tables_rules() {
    let cluster = Cluster::start("insert-rules", 2);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    cluster.exec_all(
        "CREATE DOMAIN positive AS int CHECK (VALUE > 0);
         CREATE TABLE things (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, qty positive NOT NULL,
                              price numeric(10,2) CHECK (price >= 0), total numeric GENERATED ALWAYS AS (qty * price) STORED,
                              label text UNIQUE, note text);
         SELECT trompe.add_table('things')",
    );
    n1.exec("CREATE TABLE notes (id int PRIMARY KEY, body text); SELECT trompe.add_table('notes')");
    n2.exec(
        "CREATE TABLE notes (id int PRIMARY KEY, body text, extra text DEFAULT 'local'); SELECT trompe.add_table('notes');
         CREATE TABLE seen (id bigint, label text);
         CREATE FUNCTION things_before() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.label = 'skip' THEN RETURN NULL; END IF;
             NEW.note := NEW.note || ' (seen by n2)';
             RETURN NEW;
         END $$;
         CREATE FUNCTION things_after() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO public.seen VALUES (NEW.id, NEW.label);
             RETURN NULL;
         END $$;
         CREATE TRIGGER before_insert BEFORE INSERT ON things FOR EACH ROW EXECUTE FUNCTION things_before();
         CREATE TRIGGER after_insert AFTER INSERT ON things FOR EACH ROW EXECUTE FUNCTION things_after();
         ALTER TABLE things ENABLE ALWAYS TRIGGER before_insert, ENABLE ALWAYS TRIGGER after_insert;
         ALTER TABLE things ADD CONSTRAINT cheap CHECK (price < 1000);
         SELECT setval(pg_get_serial_sequence('things', 'id'), 1000)",
    );
    // A label n2 holds already, written before n1's rows (which therefore win it).
    n2.exec("INSERT INTO things (qty, price, label, note) VALUES (1, 1, 'taken', 'n2''s own')");
    cluster.add_peer(1, 0);
    n1.exec(
        "INSERT INTO things (qty, price, label, note) VALUES
             (2, 1.50, 'a', 'first'), (3, 2.25, 'skip', 'skipped on n2'), (4, 0, 'b', 'third'), (5, 10, 'taken', 'n1''s')",
    );
    n1.exec("INSERT INTO notes SELECT g, 'note ' || g FROM generate_series(1, 5) g");
    n1.exec("INSERT INTO things (qty, price, label, note) VALUES (1, 5000, 'dear', 'too dear for n2'), (1, 1, 'after', 'behind it')");
    let stuck = wait_for(Duration::from_secs(30), || {
        n2.query_text("SELECT last_error FROM trompe.status WHERE name = 'n1'").is_some_and(|e| e.contains("cheap"))
    });
    assert!(stuck, "the constraint n2 added stops the stream, named in the error");
    assert_eq!(n2.query_i64("SELECT count(*) FROM things WHERE label IN ('dear', 'after')"), 0);
    assert_eq!(
        n2.query_text("SELECT string_agg(id || ':' || qty || ':' || price || ':' || total || ':' || note, ',' ORDER BY id) FROM things WHERE label IN ('a', 'b', 'taken')")
            .as_deref(),
        Some("1:2:1.50:3.00:first (seen by n2),3:4:0.00:0.00:third (seen by n2),4:5:10.00:50.00:n1's (seen by n2)"),
        "identity values kept, generated column computed, BEFORE trigger applied, n1's row won the label"
    );
    assert_eq!(n2.query_i64("SELECT count(*) FROM things WHERE label = 'skip'"), 0, "BEFORE trigger skipped it");
    assert_eq!(
        n2.query_text("SELECT string_agg(label, ',' ORDER BY id) FROM seen WHERE label <> 'taken' OR id = 4")
            .as_deref(),
        Some("a,b,taken"),
        "AFTER trigger fired for each applied row"
    );
    assert_eq!(
        n2.query_text("SELECT string_agg(body || '/' || extra, ',' ORDER BY id) FROM notes").as_deref(),
        Some("note 1/local,note 2/local,note 3/local,note 4/local,note 5/local"),
        "a column only n2 has takes its default"
    );
    n2.exec("ALTER TABLE things DROP CONSTRAINT cheap");
    n2.wait_for_value("SELECT count(*) FROM things WHERE label IN ('dear', 'after')", "2", Duration::from_secs(60));
    assert!(wait_for(Duration::from_secs(10), || n2
        .query_i64("SELECT count(*) FROM trompe.status WHERE last_error IS NOT NULL")
        == 0));
}

/// A row that a constraint of the applying node refuses stops that stream with PostgreSQL's
/// own message, on every version: the direct insert path describes the failing row as an
/// INSERT does (from 16 on, only with the permission info of its range table entry).
#[test]
fn a_row_refused_by_a_local_constraint_stops_the_stream_with_postgresqls_message() {
    let cluster = Cluster::start("refused-row", 2);
    cluster.exec_all("CREATE TABLE r (id int PRIMARY KEY, v text); SELECT trompe.add_table('r')");
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    // One way only: n2's own DDL stays on n2.
    cluster.add_peer(1, 0);
    n2.exec("ALTER TABLE r ALTER COLUMN v SET NOT NULL");
    n1.exec("INSERT INTO r VALUES (1, NULL)");
    let error = "SELECT last_error FROM trompe.status WHERE name = 'n1'";
    let stuck = wait_for(Duration::from_secs(30), || {
        n2.query_text(error).is_some_and(|e| e.contains("violates not-null constraint"))
    });
    assert!(stuck, "n2 says why: {:?}", n2.query_text(error));
    assert_eq!(n2.query_i64("SELECT count(*) FROM r"), 0);
    n2.exec("ALTER TABLE r ALTER COLUMN v DROP NOT NULL");
    assert_eq!(n2.query_text("SELECT trompe.wait_sync('60 seconds')").as_deref(), Some("t"));
    assert_eq!(n2.query_i64("SELECT count(*) FROM r WHERE v IS NULL"), 1);
}

/// Replication origins belong to the whole cluster, not to a database: two databases of one
/// server pulling from the same peer must each keep their own position there. (They shared
/// one: the other database's progress moved it, and a worker restarted inside a step skipped
/// what it had not applied yet, silently.)
#[test]
fn two_databases_pulling_one_peer_keep_their_own_positions() {
    let cluster = Cluster::start("two-databases", 2);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    let schema = "CREATE TABLE t (id int PRIMARY KEY); CREATE TABLE load (id int PRIMARY KEY);
                  SELECT trompe.add_table('t'); SELECT trompe.add_table('load')";
    cluster.exec_all(schema);
    cluster.add_peer(0, 1);
    n1.exec("CREATE DATABASE app2");
    let mut app2 = n1.connect_to("app2");
    app2.batch_execute(&format!(
        "CREATE EXTENSION trompe; {schema}; SELECT trompe.add_peer('n2', '{}'); SELECT trompe.pause_peer('n2')",
        cluster.peer_conninfo(0, 1)
    ))
    .unwrap();
    // Transactions of one step at n2; n1's app applies the first and then waits for a lock.
    n1.exec("SELECT trompe.pause_peer('n2')");
    let txns: Vec<String> = ["INSERT INTO t VALUES (1)".to_string(), "INSERT INTO load VALUES (1)".to_string()]
        .into_iter()
        .chain((10..16).map(|i| format!("INSERT INTO t VALUES ({i})")))
        .map(|insert| format!("BEGIN; {insert}; COMMIT;"))
        .collect();
    n2.exec(&txns.concat());
    let mut blocker = n1.connect();
    blocker.batch_execute("BEGIN; LOCK load IN ACCESS EXCLUSIVE MODE").unwrap();
    n1.exec("SELECT trompe.resume_peer('n2')");
    n1.wait_for_value("SELECT count(*) FROM t", "1", SYNC);
    let worker = "SELECT pid FROM pg_stat_activity WHERE backend_type = 'trompe worker' AND datname = 'app'";
    n1.wait_for_value(&format!("SELECT count(*) FROM pg_locks WHERE NOT granted AND pid = ({worker})"), "1", SYNC);
    // It stops there, inside the step; meanwhile app2 applies everything.
    n1.exec("SELECT trompe.pause_peer('n2')");
    n1.exec(&format!("SELECT pg_terminate_backend(({worker}))"));
    app2.batch_execute("SELECT trompe.resume_peer('n2')").unwrap();
    assert!(
        wait_for(SYNC, || app2.query_one("SELECT count(*) FROM load", &[]).unwrap().get::<_, i64>(0) == 1),
        "app2 applies both transactions"
    );
    blocker.batch_execute("COMMIT").unwrap();
    n1.exec("SELECT trompe.resume_peer('n2')");
    n2.exec("INSERT INTO t VALUES (2)");
    n1.wait_for_value("SELECT count(*) FROM t WHERE id = 2", "1", SYNC);
    assert_eq!(n1.query_i64("SELECT count(*) FROM load"), 1, "what app2 applied is applied in app too");
    assert_eq!(n1.query_i64("SELECT count(*) FROM t"), 8, "what app2 applied is applied in app too");
    let n2_id = n2.query_text("SELECT trompe.node_id()").expect("n2's node id");
    let origins =
        n1.query_i64(&format!("SELECT count(*) FROM pg_replication_origin WHERE roname LIKE 'trompe_{n2_id}%'"));
    assert_eq!(origins, 2, "one replication origin for n2 per database");
    // DROP EXTENSION stops the worker first; its origins go all the same.
    app2.batch_execute("DROP EXTENSION trompe CASCADE").unwrap();
    n1.wait_for_value(
        &format!("SELECT count(*) FROM pg_replication_origin WHERE roname LIKE 'trompe_{n2_id}%'"),
        "1",
        SYNC,
    );
}

/// A database made read-only for its applications (`ALTER DATABASE ... SET
/// default_transaction_read_only = on`, a common maintenance switch) still takes its peers'
/// changes and serves its own, as a standby keeps replaying.
#[test]
fn a_database_read_only_by_default_still_replicates_both_ways() {
    let cluster = Cluster::start("read-only-default", 2);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    cluster.exec_all("CREATE TABLE t (id int PRIMARY KEY); SELECT trompe.add_table('t')");
    cluster.mesh();
    cluster.exec_all("ALTER DATABASE app SET default_transaction_read_only = on");
    // Workers and the peers' pull sessions connect again, now with the setting.
    cluster.exec_all(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE backend_type = 'trompe worker' OR application_name = 'trompe'",
    );
    for (i, node) in [n1, n2].into_iter().enumerate() {
        node.exec(&format!("BEGIN READ WRITE; INSERT INTO t VALUES ({i}); COMMIT"));
    }
    for node in [n1, n2] {
        node.wait_for_value("SELECT count(*) FROM t", "2", SYNC);
        assert_eq!(node.query_text("SHOW default_transaction_read_only").as_deref(), Some("on"));
    }
}

/// A prepared transaction's changes are pulled as soon as `COMMIT PREPARED` runs, as any
/// commit's are, not at the next pull after `trompe.pull_interval`.
#[test]
fn commit_prepared_wakes_the_peers_pulls() {
    let cluster = Cluster::builder("commit-prepared")
        .nodes(2)
        .setting("max_prepared_transactions", "4")
        .setting("trompe.pull_interval", "'60s'")
        .start();
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    cluster.exec_all("CREATE TABLE t (id int PRIMARY KEY); SELECT trompe.add_table('t')");
    cluster.mesh();
    n1.exec("INSERT INTO t VALUES (1)");
    n2.wait_for_value("SELECT count(*) FROM t", "1", SYNC);
    n1.exec("BEGIN; INSERT INTO t VALUES (2); PREPARE TRANSACTION 'two'");
    n1.exec("COMMIT PREPARED 'two'");
    n2.wait_for_value("SELECT count(*) FROM t", "2", Duration::from_secs(5));
}

/// A copy of a node's database (`CREATE DATABASE ... TEMPLATE`) has the node's identity: it
/// pulls nothing, which would confirm positions the node has not reached (its peers would free
/// log the node still needs), `trompe.status` says why and what to do, and registering or
/// unregistering peers from it is refused. A copy whose original is gone is the node.
#[test]
fn a_copy_of_a_nodes_database_does_not_act_as_the_node() {
    let cluster = Cluster::start("template-copy", 2);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    cluster.exec_all("CREATE TABLE t (id int PRIMARY KEY); SELECT trompe.add_table('t')");
    cluster.mesh();
    n2.exec("INSERT INTO t VALUES (1)");
    cluster.wait_sync(SYNC);
    // Copying needs the database without sessions: n1's worker steps out of the way, n2's pulls
    // are paused.
    n2.exec("SELECT trompe.pause_peer('n1')");
    let mut admin = n1.connect_to("postgres");
    let copied = wait_for(SYNC, || admin.batch_execute("CREATE DATABASE copy TEMPLATE app").is_ok());
    assert!(copied, "CREATE DATABASE copy TEMPLATE app");
    n2.exec("SELECT trompe.resume_peer('n1')");
    // Its worker starts at the next server start.
    drop(admin);
    n1.restart();
    let mut admin = n1.connect_to("postgres");
    let mut copy = n1.connect_to("copy");
    let refused = "SELECT state = 'paused' AND last_error LIKE '%copy of database \"app\"%DROP EXTENSION trompe%'
                     FROM trompe.status WHERE name = 'n2'";
    let shown = wait_for(SYNC, || copy.query_one(refused, &[]).unwrap().get::<_, Option<bool>>(0) == Some(true));
    let status = copy.query_one("SELECT state || ': ' || coalesce(last_error, '') FROM trompe.status", &[]).unwrap();
    assert!(shown, "{:?}", status.get::<_, Option<String>>(0));
    for call in ["SELECT trompe.remove_peer('n2')", "SELECT trompe.add_peer('n3', 'host=localhost')"] {
        let (code, message) = expect_error(&mut copy, call);
        assert_eq!(code, "55000", "{call}: {message}");
        assert!(message.contains("copy of database \"app\""), "{message}");
    }
    // Nor does it serve n2's pulls as n1 (were n2 pointed at it).
    let n2_id = n2.query_text("SELECT trompe.node_id()::text").unwrap();
    let pull = format!("SELECT count(*) FROM trompe.pull('{n2_id}', '1:1:', NULL, 0, 10, 0, 0, NULL)");
    let (code, message) = expect_error(&mut copy, &pull);
    assert_eq!(code, "55000", "{message}");
    assert!(message.contains("copy of database \"app\""), "{message}");
    // Changes the copy would have pulled and confirmed as n1 reach n1 all the same.
    n1.exec("SELECT trompe.pause_peer('n2')");
    n2.exec("INSERT INTO t VALUES (2)");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(copy.query_one("SELECT count(*) FROM t", &[]).unwrap().get::<_, i64>(0), 1);
    n1.exec("SELECT trompe.resume_peer('n2')");
    cluster.wait_sync(SYNC);
    cluster.assert_same(&checksum("t"));
    // A copy whose original was dropped takes the identity over.
    admin.batch_execute("CREATE DATABASE orig2").unwrap();
    n1.connect_to("orig2").batch_execute("CREATE EXTENSION trompe").unwrap();
    admin.batch_execute("CREATE DATABASE clone TEMPLATE orig2").unwrap();
    admin.batch_execute("DROP DATABASE orig2").unwrap();
    drop(admin);
    n1.restart();
    let mut clone = n1.connect_to("clone");
    let own = "SELECT database_oid = (SELECT oid FROM pg_database WHERE datname = current_database()) FROM trompe.node";
    assert!(wait_for(SYNC, || clone.query_one(own, &[]).unwrap().get::<_, Option<bool>>(0) == Some(true)));
}
