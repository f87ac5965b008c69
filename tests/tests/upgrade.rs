//! Upgrading trompe in place: nodes created at an earlier version (0.1.0 to 0.4.0, their
//! scripts kept in sql/released/) replicate, are restarted one by one and updated with
//! `ALTER EXTENSION trompe UPDATE` while clients keep writing, and keep replicating without
//! losing a row; the updated schema is exactly what a fresh install of the new version creates.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use postgres::NoTls;
use trompe_tests::{checksum, Cluster};

const SYNC: Duration = Duration::from_secs(120);

/// The version being built: trompe's own Cargo.toml (not this test crate's).
fn current_version() -> String {
    include_str!("../../Cargo.toml")
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("trompe's Cargo.toml has a version")
        .to_string()
}

/// Everything the extension owns, described by name (not oid): functions with their
/// definitions and settings, tables and views with their columns, indexes, constraints,
/// privileges, and which objects belong to the extension.
const SCHEMA_FINGERPRINT: &str = "
    SELECT string_agg(line, E'\\n' ORDER BY line) FROM (
        SELECT format('function %s(%s) returns %s %s secdef=%s vol=%s config=%s acl=%s src=%s',
                      p.proname, pg_get_function_arguments(p.oid), pg_get_function_result(p.oid), l.lanname,
                      p.prosecdef, p.provolatile, p.proconfig, p.proacl, md5(p.prosrc)) AS line
          FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
         WHERE p.pronamespace = 'trompe'::regnamespace
        UNION ALL
        SELECT format('relation %s kind=%s acl=%s options=%s', c.relname, c.relkind, c.relacl, c.reloptions)
          FROM pg_class c WHERE c.relnamespace = 'trompe'::regnamespace
        UNION ALL
        SELECT format('column %s.%s %s notnull=%s default=%s', c.relname, a.attname,
                      format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid))
          FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE c.relnamespace = 'trompe'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
        UNION ALL
        SELECT format('index %s', pg_get_indexdef(i.indexrelid))
          FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid WHERE c.relnamespace = 'trompe'::regnamespace
        UNION ALL
        SELECT format('constraint %s %s', conname, pg_get_constraintdef(oid))
          FROM pg_constraint WHERE connamespace = 'trompe'::regnamespace
        UNION ALL
        SELECT format('view %s %s', viewname, md5(definition)) FROM pg_views WHERE schemaname = 'trompe'
        UNION ALL
        SELECT format('member %s', pg_describe_object(classid, objid, 0))
          FROM pg_depend WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
           AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'trompe')
        UNION ALL
        SELECT format('event trigger %s %s %s', evtname, evtevent, evtfoid::regproc) FROM pg_event_trigger
    ) lines";

/// Inserts rows with ids `base + 1, base + 2, …` on `conninfo` until `stop`, reconnecting when
/// the node restarts; counts the inserts that committed.
fn writer(conninfo: String, base: i64, stop: Arc<AtomicBool>, committed: Arc<AtomicI64>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut next = base + 1;
        let mut client = None;
        while !stop.load(Ordering::SeqCst) {
            if client.is_none() {
                client = postgres::Client::connect(&conninfo, NoTls).ok();
                if client.is_none() {
                    thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
            let c = client.as_mut().expect("connected above");
            match c.execute("INSERT INTO items (id, note) VALUES ($1, 'written during the upgrade')", &[&next]) {
                Ok(_) => {
                    committed.fetch_add(1, Ordering::SeqCst);
                    next += 1;
                }
                // Committed before the connection was lost: the retry finds the row.
                Err(e) if e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) => {
                    committed.fetch_add(1, Ordering::SeqCst);
                    next += 1;
                }
                // The node is restarting.
                Err(_) => client = None,
            }
            thread::sleep(Duration::from_millis(5));
        }
    })
}

#[test]
fn updating_from_0_1_0_keeps_replicating_without_losing_rows() {
    update_keeps_replicating_without_losing_rows("0.1.0");
}

#[test]
fn updating_from_0_2_0_keeps_replicating_without_losing_rows() {
    update_keeps_replicating_without_losing_rows("0.2.0");
}

#[test]
fn updating_from_0_3_0_keeps_replicating_without_losing_rows() {
    update_keeps_replicating_without_losing_rows("0.3.0");
}

#[test]
fn updating_from_0_4_0_keeps_replicating_without_losing_rows() {
    update_keeps_replicating_without_losing_rows("0.4.0");
}

/// Two nodes created at version `previous`, updated one by one under load.
fn update_keeps_replicating_without_losing_rows(previous: &str) {
    let script = trompe_tests::system::extension_dir().join(format!("trompe--{previous}.sql"));
    assert!(
        script.exists(),
        "{} is missing: install with scripts/install, which installs sql/released/",
        script.display()
    );
    let cluster = Cluster::builder(&format!("upgrade-{previous}")).nodes(2).with_extension(false).start();
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    cluster.exec_all(&format!(
        "CREATE EXTENSION trompe VERSION '{previous}';
         CREATE TABLE items (id bigint PRIMARY KEY, note text);
         SELECT trompe.add_table('items');"
    ));
    cluster.mesh();
    n1.exec("INSERT INTO items SELECT i, 'before' FROM generate_series(1, 500) i");
    n2.exec("INSERT INTO items SELECT i, 'before' FROM generate_series(1000001, 1000500) i");
    cluster.wait_sync(SYNC);
    assert_eq!(cluster.assert_same("SELECT count(*) FROM items").as_deref(), Some("1000"));

    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicI64::new(0));
    let writers: Vec<_> = [(n1, 10_000_000), (n2, 20_000_000)]
        .into_iter()
        .map(|(node, base)| writer(node.conninfo(), base, stop.clone(), committed.clone()))
        .collect();
    thread::sleep(Duration::from_millis(500));
    for node in [n1, n2] {
        // New binaries are in place: restart, then update the extension, under load.
        node.restart();
        node.exec("ALTER EXTENSION trompe UPDATE");
        assert_eq!(
            node.query_text("SELECT extversion FROM pg_extension WHERE extname = 'trompe'").as_deref(),
            Some(current_version().as_str())
        );
        thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().expect("writer thread");
    }
    let during = committed.load(Ordering::SeqCst);
    assert!(during > 50, "clients kept writing during the upgrade ({during} inserts)");
    n1.exec("INSERT INTO items VALUES (3000000, 'after')");
    cluster.wait_sync(SYNC);
    let expected = 1000 + during + 1;
    let count = cluster.assert_same("SELECT count(*) FROM items").unwrap_or_default();
    assert_eq!(count, expected.to_string(), "every committed row, once, on every node");
    cluster.assert_same(&checksum("items"));
    assert_eq!(
        n2.query_text("SELECT count(*) FROM trompe.status WHERE state = 'connected' AND last_error IS NULL").as_deref(),
        Some("1")
    );
    // What the later versions add works on the updated nodes.
    assert_eq!(
        n2.query_text("SELECT only_here + only_there + different FROM trompe.compare('n1', 'items')").as_deref(),
        Some("0")
    );
    assert_eq!(n2.query_text("SELECT sync_state FROM trompe.status WHERE name = 'n1'"), None);
    assert!(n1.query_text("SELECT trompe.sync_rows_sql('items')").is_some_and(|q| q.contains("items")));

    // The updated schema is the one a fresh install creates.
    n1.exec("CREATE DATABASE fresh");
    let mut fresh = n1.connect_to("fresh");
    fresh.batch_execute("CREATE EXTENSION trompe").expect("fresh install");
    let fresh_fingerprint: String = fresh.query_one(SCHEMA_FINGERPRINT, &[]).expect("fingerprint").get(0);
    drop(fresh);
    let updated_fingerprint = n1.query_text(SCHEMA_FINGERPRINT).unwrap_or_default();
    let lines = |text: &str| text.lines().map(str::to_string).collect::<std::collections::BTreeSet<_>>();
    let (updated, fresh) = (lines(&updated_fingerprint), lines(&fresh_fingerprint));
    assert!(fresh.len() > 200, "the fingerprint describes the schema ({} lines)", fresh.len());
    assert!(
        updated == fresh,
        "ALTER EXTENSION UPDATE and a fresh install differ:\nonly after the update: {:#?}\nonly in a fresh install: {:#?}",
        updated.difference(&fresh).collect::<Vec<_>>(),
        fresh.difference(&updated).collect::<Vec<_>>()
    );
    n1.exec("DROP DATABASE fresh WITH (FORCE)");
}
