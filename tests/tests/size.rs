//! No size cliffs: transactions larger than a link carries quickly, and transactions full of
//! savepoints, replicate like any other.

use std::time::{Duration, Instant};

use trompe_tests::{checksum, wait_for, Cluster, Node};

/// Rows of about 2 KB of text that does not compress (md5 digests), ids `1..=rows`, in one
/// transaction.
fn big_insert(rows: i64) -> String {
    format!(
        "INSERT INTO items (id, note)
         SELECT g, (SELECT string_agg(md5(g::text || ':' || i), '') FROM generate_series(1, 64) i)
           FROM generate_series(1, {rows}) g"
    )
}

fn items_on(cluster: &Cluster) {
    cluster.exec_all("CREATE TABLE items (id bigint PRIMARY KEY, note text); SELECT trompe.add_table('items')");
}

#[test]
fn a_transaction_slower_to_transfer_than_the_peer_timeout_replicates() {
    // A pull may send nothing for pull_interval + peer_timeout = 3 s; the transaction below
    // takes about 10 s to cross the throttled link: only silence may time a pull out.
    let cluster = Cluster::builder("slow-link-big-txn")
        .nodes(2)
        .setting("trompe.peer_timeout", "'2s'")
        .setting("trompe.pull_interval", "'1s'")
        .start();
    items_on(&cluster);
    cluster.add_peer(1, 0);
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    assert!(wait_for(Duration::from_secs(60), || {
        n1.query_text("SELECT state FROM trompe.status").as_deref() == Some("connected")
    }));
    cluster.link(1, 0).throttle(256 << 10);
    let rows = 1250; // about 2.5 MB of row data
    n0.exec(&big_insert(rows));
    let started = Instant::now();
    assert!(
        wait_for(Duration::from_secs(120), || n1.query_i64("SELECT count(*) FROM items") == rows),
        "the transaction did not replicate through the slow link: {:?}",
        n1.query_row("SELECT state, last_error FROM trompe.status")
    );
    let took = started.elapsed();
    assert!(took > Duration::from_secs(3), "the link was not slow enough to test anything ({took:?})");
    assert_eq!(n0.query_text(&checksum("items")), n1.query_text(&checksum("items")));
    let timeouts = n1.log().matches("did not answer in time").count();
    assert_eq!(timeouts, 0, "a moving pull timed out");
    // A peer that goes silent is still given up on.
    cluster.link(1, 0).throttle(0);
    cluster.link(1, 0).blackhole();
    n0.exec("INSERT INTO items VALUES (0, 'behind the blackhole')");
    assert!(
        wait_for(Duration::from_secs(60), || n1.log().contains("did not answer in time")),
        "a silent peer was not given up on"
    );
    cluster.link(1, 0).heal();
    assert!(wait_for(Duration::from_secs(60), || n1.query_i64("SELECT count(*) FROM items") == rows + 1));
}

#[test]
fn a_transaction_of_many_savepoints_is_logged_in_bounded_chunks() {
    let cluster = Cluster::start("savepoint-chunks", 2);
    items_on(&cluster);
    cluster.add_peer(1, 0);
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    // One row per released savepoint (what PL/pgSQL exception blocks, JDBC autosave and ORMs'
    // nested savepoints produce); every 7th rolled back. Then a block whose released inner
    // savepoints fill several chunks and which is rolled back as a whole.
    n0.exec(
        "DO $$
         BEGIN
             FOR i IN 1..10000 LOOP
                 BEGIN
                     INSERT INTO items VALUES (i, repeat('x', 1000) || i);
                     IF i % 7 = 0 THEN RAISE EXCEPTION 'undo %', i; END IF;
                 EXCEPTION WHEN raise_exception THEN NULL;
                 END;
             END LOOP;
             BEGIN
                 FOR i IN 20001..30000 LOOP
                     BEGIN
                         INSERT INTO items VALUES (i, repeat('y', 1000));
                     EXCEPTION WHEN unique_violation THEN NULL;
                     END;
                 END LOOP;
                 RAISE EXCEPTION 'undo the block';
             EXCEPTION WHEN raise_exception THEN NULL;
             END;
         END $$",
    );
    let kept = 10000 - 10000 / 7;
    assert_eq!(n0.query_i64("SELECT count(*) FROM items"), kept);
    let logged =
        n0.query_row("SELECT count(*), max(nchanges), sum(nchanges), max(octet_length(changes)) FROM trompe.log");
    let num = |i: usize| logged[i].as_deref().and_then(|v| v.parse::<i64>().ok()).unwrap_or(-1);
    assert!(num(0) >= 3, "the transaction was not split into chunks: {logged:?}");
    assert!(num(1) <= 4096, "a chunk holds more changes than the cap: {logged:?}");
    assert_eq!(num(2), kept, "the log holds exactly the kept changes: {logged:?}");
    assert!(num(3) <= 5 << 20, "a chunk is larger than the cap: {logged:?}");
    cluster.wait_sync(Duration::from_secs(120));
    assert_eq!(n0.query_text(&checksum("items")), n1.query_text(&checksum("items")));
    assert_eq!(n1.query_i64("SELECT count(*) FROM items WHERE id > 10000"), 0, "a rolled-back block replicated");
}

#[test]
fn the_log_a_consumer_holds_back_is_visible_at_the_origin() {
    let cluster = Cluster::start("consumer-log", 2);
    items_on(&cluster);
    cluster.add_peer(1, 0);
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    n0.exec("INSERT INTO items VALUES (1, 'first')");
    cluster.wait_sync(Duration::from_secs(60));
    n1.exec("SELECT trompe.pause_peer('n1')");
    for i in 2..=21 {
        n0.exec(&format!("INSERT INTO items VALUES ({i}, repeat('z', 10000))"));
    }
    std::thread::sleep(Duration::from_millis(1100));
    let held = n0.query_row(
        "SELECT node_id::text, retained_transactions, retained_changes, retained_bytes,
                extract(epoch FROM oldest_unconfirmed_age) >= 1
           FROM trompe.consumer_log",
    );
    assert_eq!(held[0], n1.query_text("SELECT trompe.node_id()::text"), "{held:?}");
    // The first transaction too, if the confirmation of it was not saved yet.
    let num = |i: usize| held[i].as_deref().and_then(|b| b.parse::<i64>().ok()).unwrap_or(0);
    assert!((20..=21).contains(&num(1)), "{held:?}");
    assert!((20..=21).contains(&num(2)), "{held:?}");
    assert!(num(3) > 0, "{held:?}");
    assert_eq!(held[4].as_deref(), Some("t"), "{held:?}");
    n1.exec("SELECT trompe.resume_peer('n1')");
    cluster.wait_sync(Duration::from_secs(60));
    assert!(
        wait_for(Duration::from_secs(60), || {
            n0.query_i64("SELECT retained_transactions FROM trompe.consumer_log") == 0
        }),
        "{:?}",
        n0.query_row("SELECT * FROM trompe.consumer_log")
    );
}

#[test]
fn a_consumer_past_max_log_size_is_marked_lost_and_frees_the_log() {
    let cluster = Cluster::builder("max-log-size")
        .nodes(3)
        .setting("trompe.max_log_size", "'1MB'")
        .setting("trompe.log_rotation_interval", "'300ms'")
        .start();
    items_on(&cluster);
    cluster.add_peer(1, 0);
    cluster.add_peer(2, 0);
    let (n0, n1, n2) = (cluster.node(0), cluster.node(1), cluster.node(2));
    n0.exec("INSERT INTO items VALUES (0, 'first')");
    cluster.wait_sync(Duration::from_secs(60));
    let laggard = n2.query_text("SELECT trompe.node_id()::text").unwrap();
    let keeper = n1.query_text("SELECT trompe.node_id()::text").unwrap();
    n2.exec("SELECT trompe.pause_peer('n1')");
    // 40 transactions of about 100 KB that does not compress: 4 MB, past the 1 MB limit.
    for t in 0..40 {
        n0.exec(&format!(
            "INSERT INTO items (id, note)
             SELECT g, (SELECT string_agg(md5(g::text || ':' || i), '') FROM generate_series(1, 64) i)
               FROM generate_series({}, {}) g",
            t * 50 + 1,
            t * 50 + 50
        ));
        std::thread::sleep(Duration::from_millis(100));
    }
    let lost = |node: &str| {
        n0.query_text(&format!("SELECT lost_at IS NOT NULL FROM trompe.consumer_log WHERE node_id = '{node}'"))
            == Some("t".into())
    };
    assert!(
        wait_for(Duration::from_secs(60), || lost(&laggard)),
        "the laggard was not marked lost: {:?}",
        n0.query_row("SELECT * FROM trompe.consumer_log")
    );
    assert!(!lost(&keeper), "a consumer keeping up was marked lost");
    assert!(n0.log().contains("marked lost"), "the origin does not say so");
    // The consumer keeping up has everything, and the log is freed.
    assert!(wait_for(Duration::from_secs(60), || n1.query_i64("SELECT count(*) FROM items") == 2001));
    assert!(
        wait_for(Duration::from_secs(60), || n0.query_i64("SELECT count(*) FROM trompe.log") < 10),
        "the log was not freed: {} rows",
        n0.query_i64("SELECT count(*) FROM trompe.log")
    );
    assert_eq!(n0.query_i64("SELECT retained_transactions FROM trompe.consumer_log WHERE lost_at IS NOT NULL"), 0);
    // The laggard, back, is told: state lost, and why.
    n2.exec("SELECT trompe.resume_peer('n1')");
    assert!(
        wait_for(Duration::from_secs(60), || {
            n2.query_text("SELECT state FROM trompe.status WHERE name = 'n1'").as_deref() == Some("lost")
        }),
        "{:?}",
        n2.query_row("SELECT state, last_error FROM trompe.status")
    );
    let error = n2.query_text("SELECT last_error FROM trompe.status WHERE name = 'n1'").unwrap_or_default();
    assert!(error.contains("marked lost") && error.contains("trompe.max_log_size"), "{error}");
    assert_eq!(n2.query_i64("SELECT count(*) FROM items"), 1, "the laggard applied nothing meanwhile");
    // The way out (README): the node's database is not empty, so a copy into it is refused;
    // it joins again as a new node, from an empty database, and its old registration is
    // dropped at the origin.
    let conninfo = cluster.peer_conninfo(2, 0);
    let refused = n2.connect().batch_execute(&format!("SELECT trompe.add_peer('n1', '{conninfo}', sync => true)"));
    let refused = refused.err().and_then(|e| e.as_db_error().map(|d| d.message().to_string())).unwrap_or_default();
    assert!(refused.contains("needs a new, empty node"), "{refused}");
    n2.exec("SELECT trompe.remove_peer('n1')");
    n2.exec("CREATE DATABASE rejoined");
    let mut fresh = n2.connect_to("rejoined");
    fresh
        .batch_execute(&format!("CREATE EXTENSION trompe; SELECT trompe.add_peer('n1', '{conninfo}', sync => true)"))
        .expect("joining again from an empty database");
    let count = |c: &mut postgres::Client| -> i64 {
        c.query_one("SELECT count(*) FROM items", &[]).map(|r| r.get(0)).unwrap_or(-1)
    };
    assert!(wait_for(Duration::from_secs(120), || count(&mut fresh) == 2001), "the node did not join again");
    n0.exec("INSERT INTO items VALUES (-1, 'after the rejoin')");
    assert!(wait_for(Duration::from_secs(60), || count(&mut fresh) == 2002), "the rejoined node does not replicate");
    n0.exec(&format!("SELECT trompe.drop_consumer('{laggard}')"));
    assert_eq!(n0.query_i64("SELECT count(*) FROM trompe.consumer_log WHERE lost_at IS NOT NULL"), 0);
}

/// The peak resident memory (VmHWM, in MB) of `node`'s trompe worker.
fn worker_peak_mb(node: &trompe_tests::Node) -> i64 {
    let pid = node.query_i64("SELECT pid FROM pg_stat_activity WHERE backend_type = 'trompe worker' LIMIT 1");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the worker's /proc status");
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
        .expect("VmHWM in /proc/<pid>/status");
    kb / 1024
}

#[test]
fn a_large_transaction_replicates_with_the_workers_memory_bounded() {
    let cluster = Cluster::start("large-txn-memory", 2);
    items_on(&cluster);
    cluster.add_peer(1, 0);
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    n0.exec("INSERT INTO items VALUES (0, 'first')");
    cluster.wait_sync(Duration::from_secs(60));
    let before = worker_peak_mb(n1);
    // About 200 MB of row data that does not compress, in one transaction.
    let rows = 100_000;
    n0.exec(&big_insert(rows));
    let started = Instant::now();
    cluster.wait_sync(Duration::from_secs(900));
    let took = started.elapsed();
    assert_eq!(n1.query_i64("SELECT count(*) FROM items"), rows + 1);
    let peak = worker_peak_mb(n1);
    eprintln!("a 200 MB transaction replicated in {took:?}; the applying worker's peak RSS went from {before} MB to {peak} MB");
    // Applied chunk by chunk from a spool file: the worker never holds the transaction (it
    // grew by about 1.3 times the transaction's size while it decoded it whole).
    assert!(peak - before < 100, "the applying worker grew from {before} MB to {peak} MB for a 200 MB transaction");
}

/// Waits until `bytes` more have crossed `link` than `from` (a pull is under way).
fn wait_bytes(link: &trompe_tests::proxy::Proxy, from: u64, bytes: u64) {
    assert!(
        wait_for(Duration::from_secs(60), || link.bytes_forwarded() >= from + bytes),
        "the pull did not move {bytes} bytes"
    );
}

/// Two nodes, the second pulling from the first through a link throttled to 256 kB/s, with
/// short timeouts and retries; connected.
fn pulling_through_a_slow_link(name: &str) -> Cluster {
    let cluster = Cluster::builder(name)
        .nodes(2)
        .setting("trompe.peer_timeout", "'3s'")
        .setting("trompe.pull_interval", "'1s'")
        .setting("trompe.retry_max_delay", "'1s'")
        .start();
    items_on(&cluster);
    cluster.add_peer(1, 0);
    assert!(wait_for(Duration::from_secs(60), || {
        cluster.node(1).query_text("SELECT state FROM trompe.status").as_deref() == Some("connected")
    }));
    cluster.link(1, 0).throttle(256 << 10);
    cluster
}

#[test]
fn a_large_transaction_survives_kill_9_of_either_node_mid_pull() {
    let cluster = pulling_through_a_slow_link("big-txn-kill-9");
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let link = cluster.link(1, 0);
    let rows = 2000; // about 4 MB: some 16 s through the link
    n0.exec(&big_insert(rows));
    n0.exec("INSERT INTO items VALUES (0, 'behind the big one')");
    // The applying node dies in the middle of the pull: nothing of the transaction is there.
    wait_bytes(link, link.bytes_forwarded(), 1 << 20);
    n1.crash_and_restart();
    assert_eq!(n1.query_i64("SELECT count(*) FROM items"), 0, "part of a transaction was applied");
    // The origin dies in the middle of the next attempt.
    wait_bytes(link, link.bytes_forwarded(), 1 << 20);
    n0.crash_and_restart();
    assert_eq!(n1.query_i64("SELECT count(*) FROM items"), 0, "part of a transaction was applied");
    link.throttle(0);
    assert!(
        wait_for(Duration::from_secs(120), || n1.query_i64("SELECT count(*) FROM items") == rows + 1),
        "{:?}",
        n1.query_row("SELECT state, last_error FROM trompe.status")
    );
    assert_eq!(n0.query_text(&checksum("items")), n1.query_text(&checksum("items")));
    assert!(wait_for(Duration::from_secs(60), || {
        n1.query_row("SELECT state, last_error FROM trompe.status") == vec![Some("connected".into()), None]
    }));
}

#[test]
fn a_large_transaction_survives_a_pause_and_a_silent_link_mid_pull() {
    let cluster = pulling_through_a_slow_link("big-txn-pause");
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let link = cluster.link(1, 0);
    let rows = 2000;
    n0.exec(&big_insert(rows));
    // Paused by the administrator mid-pull: the pull is dropped, nothing applied, state paused.
    wait_bytes(link, link.bytes_forwarded(), 1 << 20);
    n1.exec("SELECT trompe.pause_peer('n1')");
    assert_eq!(n1.query_text("SELECT state FROM trompe.status").as_deref(), Some("paused"));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(n1.query_i64("SELECT count(*) FROM items"), 0);
    n1.exec("SELECT trompe.resume_peer('n1')");
    // The link goes silent mid-pull: given up on after trompe.peer_timeout, and said so.
    wait_bytes(link, link.bytes_forwarded(), 1 << 20);
    link.blackhole();
    assert!(
        wait_for(Duration::from_secs(30), || {
            n1.query_text("SELECT last_error FROM trompe.status").is_some_and(|e| e.contains("did not answer in time"))
        }),
        "{:?}",
        n1.query_row("SELECT state, last_error FROM trompe.status")
    );
    assert_eq!(n1.query_i64("SELECT count(*) FROM items"), 0);
    link.heal();
    link.throttle(0);
    assert!(
        wait_for(Duration::from_secs(120), || n1.query_i64("SELECT count(*) FROM items") == rows),
        "{:?}",
        n1.query_row("SELECT state, last_error FROM trompe.status")
    );
    assert_eq!(n0.query_text(&checksum("items")), n1.query_text(&checksum("items")));
}

/// The private resident memory (RssAnon, in kB) of process `pid`.
fn rss_anon_kb(pid: i32) -> i64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_session_writing_many_savepoints_keeps_its_memory_flat() {
    let cluster = Cluster::start("savepoint-memory", 2);
    items_on(&cluster);
    cluster.add_peer(1, 0);
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let mut writer = n0.connect();
    let pid: i32 = writer.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    writer.batch_execute("INSERT INTO items VALUES (0, 'warm-up')").unwrap();
    let base = rss_anon_kb(pid);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                peak = peak.max(rss_anon_kb(pid));
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        })
    };
    // 20,000 released savepoints of 2 KB that does not compress: 40 MB in about 10 chunks.
    writer
        .batch_execute(
            "DO $$ BEGIN
                 FOR g IN 1..20000 LOOP
                     BEGIN
                         INSERT INTO items VALUES
                             (g, (SELECT string_agg(md5(g::text || ':' || i), '') FROM generate_series(1, 64) i));
                     EXCEPTION WHEN unique_violation THEN NULL;
                     END;
                 END LOOP;
             END $$",
        )
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Release);
    let grew_mb = (sampler.join().unwrap() - base) / 1024;
    eprintln!("the writing session grew by {grew_mb} MB for 40 MB of released savepoints");
    // Each chunk written at a savepoint's release stayed in its memory until the commit: it
    // grew by about twice the data (91 MB here, 432 MB for 200 MB in bench/bigtxn); 20 MB now.
    assert!(grew_mb < 30, "the writing session grew by {grew_mb} MB for 40 MB of changes");
    cluster.wait_sync(Duration::from_secs(120));
    assert_eq!(n0.query_text(&checksum("items")), n1.query_text(&checksum("items")));
}

/// `rows` rows of about 2 KB into `big` from id `from`, with `extra` set if `extra`.
fn big_rows(from: i64, rows: i64, extra: bool) -> String {
    format!(
        "INSERT INTO big (id, note, u{}) SELECT g, (SELECT string_agg(md5(g::text || ':' || i), '') FROM generate_series(1, 64) i), g{}
           FROM generate_series({from}, {}) g;",
        if extra { ", extra" } else { "" },
        if extra { ", 'x' || g" } else { "" },
        from + rows - 1
    )
}

/// Whether `node`'s worker is inside a transaction writing to table `big`.
fn applying_big(node: &trompe_tests::Node) -> bool {
    node.query_i64(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
          WHERE a.backend_type = 'trompe worker' AND l.relation = 'big'::regclass",
    ) > 0
}

#[test]
fn a_large_transaction_applied_in_segments_keeps_its_order_ddl_retries_and_skip() {
    let cluster = Cluster::start("big-txn-segments", 2);
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    cluster.exec_all(
        "CREATE TABLE big (id bigint PRIMARY KEY, note text, u bigint UNIQUE); SELECT trompe.add_table('big')",
    );
    // A row of the applying node that collides on `u` with one of the transaction, written
    // before it: the transaction's row wins, found only by the careful second attempt.
    n1.exec("INSERT INTO big VALUES (-1, 'local, older', 14000)");
    cluster.add_peer(1, 0);
    // About 30 MB (spilled to a file, applied in several segments): rows, DDL, then rows of a
    // subtransaction larger than a chunk while the top level holds buffered changes (their
    // chunks interleave), then rows using the new column.
    n0.exec(&format!(
        "BEGIN; {} ALTER TABLE big ADD COLUMN extra text; SAVEPOINT s; {} RELEASE s; {} COMMIT",
        big_rows(1, 5000, false),
        big_rows(5001, 5000, true),
        big_rows(10001, 5000, true)
    ));
    // Killed in the middle of applying it: nothing of it is there after the restart.
    assert!(wait_for(Duration::from_secs(120), || applying_big(n1)), "the worker never applied the transaction");
    let link = cluster.link(1, 0);
    link.throttle(64 << 10);
    n1.crash_and_restart();
    assert_eq!(n1.query_i64("SELECT count(*) FROM big"), 1, "part of a transaction was applied");
    link.throttle(0);
    assert!(
        wait_for(Duration::from_secs(300), || n1.query_i64("SELECT count(*) FROM big") == 15000),
        "{:?}",
        n1.query_row("SELECT state, last_error FROM trompe.status")
    );
    assert_eq!(n0.query_text(&checksum("big")), n1.query_text(&checksum("big")));
    assert_eq!(n1.query_i64("SELECT count(*) FROM trompe.conflicts WHERE kind = 'unique_violation'"), 1);

    // A large transaction that cannot be applied: its last change breaks a constraint only
    // the applying node has. The status says so; skip keeps it whole.
    n1.exec("ALTER TABLE big ADD CONSTRAINT below CHECK (id <> 29999)");
    n0.exec(&format!("BEGIN; {} COMMIT", big_rows(20000, 10000, true)));
    n0.exec("INSERT INTO big (id, note) VALUES (40000, 'behind it')");
    let stalled = || {
        n1.query_text("SELECT last_error FROM trompe.status")
            .is_some_and(|e| e.contains("23514") && e.contains("(INSERT into public.big)"))
    };
    assert!(
        wait_for(Duration::from_secs(300), stalled),
        "{:?}",
        n1.query_row("SELECT state, last_error FROM trompe.status")
    );
    n1.exec("SELECT trompe.skip('n1')");
    assert!(
        wait_for(Duration::from_secs(120), || n1.query_i64("SELECT count(*) FROM big WHERE id = 40000") == 1),
        "{:?}",
        n1.query_row("SELECT state, last_error FROM trompe.status")
    );
    assert_eq!(n1.query_i64("SELECT count(*) FROM big"), 15001);
    assert_eq!(
        n1.query_text(
            "SELECT jsonb_array_length(changes) || ':' || (changes -> 9999 -> 'new' ->> 'id') FROM trompe.exceptions"
        )
        .as_deref(),
        Some("10000:29999")
    );
}

#[test]
fn the_log_a_peer_retains_for_this_node_is_shown_in_its_status() {
    let cluster = Cluster::builder("retained-in-status").nodes(2).setting("trompe.retry_max_delay", "'1s'").start();
    items_on(&cluster);
    cluster.add_peer(1, 0);
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    n0.exec("INSERT INTO items VALUES (1, 'first')");
    cluster.wait_sync(Duration::from_secs(60));
    // The consumer is connected but cannot apply: the peer keeps its log for it.
    n1.exec("ALTER TABLE items ADD CONSTRAINT short CHECK (length(note) < 100)");
    for i in 2..=6 {
        n0.exec(&format!("INSERT INTO items VALUES ({i}, repeat('z', 10000))"));
    }
    let retained = || {
        let row = n1.query_row("SELECT retained_transactions, retained_bytes FROM trompe.status");
        let num = |i: usize| row[i].as_deref().and_then(|v| v.parse::<i64>().ok());
        (num(0), num(1))
    };
    assert!(
        wait_for(Duration::from_secs(60), || {
            let (txns, bytes) = retained();
            txns.is_some_and(|t| t >= 5) && bytes.is_some_and(|b| b > 0)
        }),
        "{:?} at the consumer, {:?} at the origin",
        retained(),
        n0.query_row("SELECT retained_transactions, retained_bytes FROM trompe.consumer_log")
    );
    n1.exec("ALTER TABLE items DROP CONSTRAINT short");
    cluster.wait_sync(Duration::from_secs(60));
    assert!(wait_for(Duration::from_secs(60), || retained() == (Some(0), Some(0))), "{:?}", retained());
}

#[test]
fn a_change_too_large_for_the_log_fails_at_the_origin() {
    let cluster = Cluster::start("change-too-large", 2);
    cluster.exec_all("CREATE TABLE wide (id int PRIMARY KEY, a text, b text, c text); SELECT trompe.add_table('wide')");
    cluster.add_peer(1, 0);
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    let logged = n0.query_i64("SELECT count(*) FROM trompe.log");
    // Three values of 340 MB: each fits PostgreSQL, the change (one log entry) would not.
    let (code, message) = trompe_tests::expect_error(
        &mut n0.connect(),
        "INSERT INTO wide VALUES (1, repeat('a', 340 << 20), repeat('b', 340 << 20), repeat('c', 340 << 20))",
    );
    assert_eq!(code, "54000", "{message}");
    assert!(message.contains("public.wide") && message.contains("1 GB"), "{message}");
    assert_eq!(n0.query_i64("SELECT count(*) FROM wide"), 0);
    assert_eq!(n0.query_i64("SELECT count(*) FROM trompe.log"), logged);
    n0.exec("INSERT INTO wide VALUES (2, 'small', NULL, NULL)");
    cluster.wait_sync(Duration::from_secs(60));
    assert_eq!(n1.query_i64("SELECT count(*) FROM wide"), 1);
    assert_eq!(
        n1.query_text("SELECT state || ':' || coalesce(last_error, '') FROM trompe.status").as_deref(),
        Some("connected:")
    );
}

/// A node back from a long outage catches up in steps of bounded size: each step ends at a
/// snapshot the origin recorded while the backlog grew (a mark) instead of listing the whole
/// backlog before the first change, and everything arrives.
#[test]
fn a_long_outage_is_caught_up_in_bounded_steps() {
    let cluster = Cluster::start("outage-steps", 2);
    let (a, b) = (cluster.node(0), cluster.node(1));
    cluster.exec_all(
        "CREATE TABLE t (id int PRIMARY KEY); SELECT trompe.add_table('t');
         CREATE PROCEDURE fill(n int, base int) LANGUAGE plpgsql AS $$
         BEGIN FOR i IN 1..n LOOP INSERT INTO t VALUES (base + i); COMMIT; END LOOP; END $$",
    );
    cluster.add_peer(1, 0);
    cluster.wait_sync(Duration::from_secs(120));
    b.exec(&format!("SELECT trompe.pause_peer('{}')", a.name));
    // The backlog in chunks, each followed by the mark the worker takes every 100 ms: marks at
    // most 3,000 ids apart whatever the machine's load, so a step can end within 10,000 ids.
    let (chunks, chunk) = (10, 3_000);
    let backlog = chunks * chunk;
    for c in 0..chunks {
        a.exec(&format!("CALL fill({chunk}, {})", c * chunk));
        // After the chunk's last transaction: not after a snapshot taken now, whose xmax also
        // counts transactions without changes (the worker's marks among them).
        let last = a.query_text("SELECT max(txid)::text FROM trompe.log").expect("the chunk's last transaction");
        let marked =
            format!("SELECT count(*) FROM trompe.snapshot_marks WHERE pg_snapshot_xmax(snap) > '{last}'::xid8");
        assert!(
            wait_for(Duration::from_secs(30), || a.query_i64(&marked) > 0),
            "a mark after chunk {c} (last transaction {last}): marks {:?}, worker {:?}",
            a.query_row(
                "SELECT count(*)::text, max(pg_snapshot_xmax(snap))::text, max(id)::text FROM trompe.snapshot_marks"
            ),
            a.query_text(
                "SELECT string_agg(coalesce(state, '-') || ' ' || coalesce(wait_event_type || ':' || wait_event, '-')
                                   || ' ' || coalesce(query, ''), '; ')
                   FROM pg_stat_activity WHERE backend_type = 'trompe worker'"
            )
        );
    }
    let b_id = b.query_text("SELECT trompe.node_id()").expect("b's node id");
    // The step b's next pull would get (asked here as a superuser, b's position unchanged).
    let step = a.query_row(&format!(
        "SELECT p.cur, p.pending::text,
                (pg_snapshot_xmax(p.cur::pg_snapshot)::text::bigint - pg_snapshot_xmax(c.confirmed::pg_snapshot)::text::bigint)::text,
                (SELECT count(*) FROM trompe.snapshot_marks m WHERE m.snap::text = p.cur)::text
           FROM trompe.consumers c,
                trompe._pull_plan(c.node_id, c.confirmed, NULL, 0, 100, 0, -1, NULL) p
          WHERE c.node_id = '{b_id}'"
    ));
    let text = |i: usize| step.get(i).cloned().flatten().unwrap_or_default();
    let num = |i: usize| text(i).parse::<i64>().unwrap_or(-1);
    assert_eq!(num(3), 1, "the step ends at a mark ({})", text(0));
    assert!(
        (1..=10_000).contains(&num(2)) && (1..=10_000).contains(&num(1)),
        "the step spans at most 10,000 transaction ids ({}) and changes ({}) of the {backlog}",
        num(2),
        num(1)
    );
    b.exec(&format!("SELECT trompe.resume_peer('{}')", a.name));
    assert!(
        wait_for(Duration::from_secs(180), || b.query_i64("SELECT count(*) FROM t") == i64::from(backlog)),
        "every row of the backlog arrived"
    );
    cluster.wait_sync(Duration::from_secs(120));
    cluster.assert_same(&checksum("t"));
}

/// Two nodes, n1 pulling from n0 directly (not through the harness's link proxy, which would
/// take in a whole answer) with `trompe.batch_size` 1000, caught up on one row of `items`, then
/// paused; n0 has `fill(n)`, which commits `n` rows of 80 KB one transaction each.
fn paused_direct_pair(name: &str) -> Cluster {
    let cluster = Cluster::builder(name).nodes(2).setting("trompe.batch_size", "1000").start();
    items_on(&cluster);
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    n0.exec(
        "CREATE PROCEDURE fill(n int) LANGUAGE plpgsql AS $$
         BEGIN FOR i IN 1..n LOOP
             INSERT INTO items SELECT 1000000 + i, string_agg(md5(i || ':' || j), '') FROM generate_series(1, 2560) j;
             COMMIT;
         END LOOP; END $$",
    );
    n1.exec(&format!("SELECT trompe.add_peer('{}', '{}')", n0.name, n0.conninfo()));
    n0.exec("INSERT INTO items VALUES (0, 'first')");
    cluster.wait_sync(Duration::from_secs(60));
    n1.exec(&format!("SELECT trompe.pause_peer('{}')", n0.name));
    cluster
}

/// How long, in seconds, the oldest transaction of another client of `node` has been open.
fn oldest_transaction_s(node: &trompe_tests::Node) -> f64 {
    node.query_text(
        "SELECT coalesce(max(extract(epoch FROM clock_timestamp() - xact_start)), 0)::text FROM pg_stat_activity
          WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
    )
    .and_then(|v| v.parse::<f64>().ok())
    .unwrap_or(0.0)
}

/// A node applying a transaction larger than `trompe.batch_size` sends no pull ahead of it: the
/// answer, too large for the socket buffers, would keep the peer's pull transaction open
/// (holding back the peer's xmin, so VACUUM and `CREATE INDEX CONCURRENTLY` there) for as long
/// as the large transaction takes to apply.
#[test]
fn applying_a_large_transaction_keeps_no_transaction_open_at_the_peer() {
    let cluster = paused_direct_pair("large-txn-no-ahead");
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    // About 200 MB in one transaction, then 600 transactions of 80 KB: the answer after the
    // large transaction's carries 256 of them (pulls start small after a resume), 20 MB.
    let rows = 100_000;
    n0.exec(&big_insert(rows));
    n0.exec("CALL fill(600)");
    n1.exec(&format!("SELECT trompe.resume_peer('{}')", n0.name));
    let applying_large = || {
        n1.query_i64(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
              WHERE a.backend_type = 'trompe worker' AND l.relation = 'items'::regclass
                AND (SELECT count(*) FROM items) = 1",
        ) > 0
    };
    let total = rows + 601;
    let (mut applying_for, mut oldest) = (Duration::ZERO, 0.0f64);
    let deadline = Instant::now() + Duration::from_secs(600);
    while n1.query_i64("SELECT count(*) FROM items") < total {
        assert!(Instant::now() < deadline, "everything arrives");
        let sampled = Instant::now();
        if applying_large() {
            oldest = oldest.max(oldest_transaction_s(n0));
            std::thread::sleep(Duration::from_millis(100));
            applying_for += sampled.elapsed();
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    eprintln!(
        "applied the large transaction in {applying_for:?}; the peer's oldest transaction meanwhile: {oldest:.1} s"
    );
    // The test means something only if applying took longer than the bound below.
    assert!(applying_for > Duration::from_millis(1500), "the large transaction was applied in {applying_for:?}");
    assert!(
        oldest < 0.5,
        "while this node applied the large transaction ({applying_for:?}), a transaction at the peer stayed open {oldest:.1} s"
    );
    cluster.wait_sync(Duration::from_secs(120));
    cluster.assert_same(&checksum("items"));
}

/// Nor does a node send a pull ahead of applying DDL, which may wait for a lock or rewrite a
/// table for long: here an `ALTER TABLE` waits behind a local reader while the peer must keep no
/// transaction open.
#[test]
fn applying_ddl_keeps_no_transaction_open_at_the_peer() {
    let cluster = paused_direct_pair("ddl-no-ahead");
    let (n0, n1) = (cluster.node(0), cluster.node(1));
    // The DDL, then 600 transactions of 80 KB: a pull sent ahead of the DDL's batch would ask
    // for 256 of them, 20 MB.
    n0.exec("ALTER TABLE items ADD COLUMN extra int");
    n0.exec("CALL fill(600)");
    let mut reader = n1.connect();
    reader.batch_execute("BEGIN; SELECT count(*) FROM items").expect("a local reader holds items");
    n1.exec(&format!("SELECT trompe.resume_peer('{}')", n0.name));
    let worker_waits = || {
        n1.query_i64(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'trompe worker' AND wait_event_type = 'Lock'",
        ) > 0
    };
    assert!(wait_for(Duration::from_secs(60), worker_waits), "the worker waits to apply the ALTER TABLE");
    let mut oldest = 0.0f64;
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(3) {
        assert!(worker_waits(), "the worker still waits for the reader");
        oldest = oldest.max(oldest_transaction_s(n0));
        std::thread::sleep(Duration::from_millis(100));
    }
    reader.batch_execute("COMMIT").expect("the reader ends");
    assert!(oldest < 0.5, "while this node waited to apply DDL, a transaction at the peer stayed open {oldest:.1} s");
    cluster.wait_sync(Duration::from_secs(120));
    assert_eq!(n1.query_i64("SELECT count(*) FROM items"), 601);
    cluster.assert_same(&checksum("items"));
}

/// Serving a pull looks each transaction's rows up through the log's index, whatever the log
/// looked like when the serving session planned it: a plan kept from when the current log child
/// was (nearly) empty, as after a rotation, scanned the whole child for every transaction pulled
/// while it filled up again, and the origin's serving backends took most of its CPU.
#[test]
fn pulls_look_the_log_up_by_index_after_the_log_was_emptied() {
    // Generic plans from the start (as some DBAs set for prepared statements), so that the plan
    // is made from the statistics below whatever plancache's heuristics would pick.
    let cluster =
        Cluster::builder("pull-index-lookup").nodes(2).setting("plan_cache_mode", "force_generic_plan").start();
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    items_on(&cluster);
    cluster.mesh();
    cluster.wait_sync(Duration::from_secs(60));
    // Statistics of a nearly empty log, as autovacuum leaves them after a rotation.
    n1.exec("VACUUM ANALYZE trompe.log_0, trompe.log_1, trompe.log_2");
    let current = n1.query_text("SELECT 'trompe.log_' || slot FROM trompe.log_rotation WHERE is_current").unwrap();
    let before = scans_of(n1, &current);
    let parent_before = scans_of(n1, "trompe.log");
    let transactions = 300;
    n1.exec(&format!(
        "DO $$ BEGIN FOR i IN 1..{transactions} LOOP INSERT INTO items VALUES (i, 'x'); COMMIT; END LOOP; END $$"
    ));
    cluster.wait_sync(Duration::from_secs(60));
    assert_eq!(n2.query_i64("SELECT count(*) FROM items"), transactions);
    // The serving backend reports its scans when it goes idle.
    assert_looked_up_by_index(n1, &current, before, transactions, "transactions pulled");
    // Nor is the (always empty) parent scanned again for each transaction: every scan of it asks
    // the kernel for its size.
    let parent = scans_of(n1, "trompe.log");
    let parent_scans = parent.0 + parent.1 - parent_before.0 - parent_before.1;
    assert!(
        parent_scans < transactions / 10,
        "{parent_scans} scans of trompe.log for {transactions} transactions pulled"
    );
    // Which is only right while the parent holds no rows: it refuses any (a row there would be
    // listed in a step but never served).
    let (code, message) = trompe_tests::expect_error(
        &mut n1.connect(),
        "INSERT INTO trompe.log VALUES (nextval('trompe.log_id_seq'), pg_current_xact_id(), 1, '\\x00')",
    );
    assert_eq!(code, "23514", "{message}");
}

/// Changes applied by statement (tables the executor path leaves alone: row-level security,
/// triggers that fire on apply) look the row up by key through the index, whatever the table
/// looked like when the worker planned the statement: a plan kept from when the table was empty
/// scanned the whole table for every change as it grew.
#[test]
fn applied_updates_look_rows_up_by_key_in_a_table_that_grew_from_empty() {
    let cluster = Cluster::start("apply-index-lookup", 2);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    // Row-level security keeps the table on the statement path; no autovacuum that would make
    // the worker plan again meanwhile.
    cluster.exec_all(
        "CREATE TABLE grows (id int PRIMARY KEY, v int) WITH (autovacuum_enabled = false);
         ALTER TABLE grows ENABLE ROW LEVEL SECURITY;
         SELECT trompe.add_table('grows')",
    );
    cluster.mesh();
    // Statistics of an empty table, as after a VACUUM of it.
    n2.exec("VACUUM ANALYZE grows");
    let before = scans_of(n2, "grows");
    // Each transaction adds ten rows and updates one of the first ones.
    let transactions = 300;
    n1.exec(&format!(
        "DO $$ BEGIN FOR i IN 0..{} LOOP
             INSERT INTO grows SELECT g, 0 FROM generate_series(i * 10 + 1, i * 10 + 10) g;
             UPDATE grows SET v = v + 1 WHERE id = i % 10 + 1;
             COMMIT;
         END LOOP; END $$",
        transactions - 1
    ));
    cluster.wait_sync(Duration::from_secs(120));
    assert_eq!(n2.query_i64("SELECT sum(v) FROM grows"), transactions);
    assert_looked_up_by_index(n2, "grows", before, transactions, "updates applied");
}

/// The sequential and index scans of `relation` on `node` so far (each query is a new session:
/// fresh statistics).
fn scans_of(node: &Node, relation: &str) -> (i64, i64) {
    let row = node.query_row(&format!(
        "SELECT coalesce(seq_scan, 0), coalesce(idx_scan, 0) FROM pg_stat_all_tables WHERE relid = '{relation}'::regclass"
    ));
    let count = |i: usize| row.get(i).cloned().flatten().and_then(|v| v.parse().ok()).unwrap_or(0);
    (count(0), count(1))
}

/// Waits until `node` has reported at least `lookups` index scans of `relation` since `before`
/// (its scans then), and asserts that fewer than a tenth as many were sequential scans.
fn assert_looked_up_by_index(node: &Node, relation: &str, before: (i64, i64), lookups: i64, what: &str) {
    let looked_up = wait_for(Duration::from_secs(20), || scans_of(node, relation).1 - before.1 >= lookups);
    let (seq, idx) = scans_of(node, relation);
    assert!(looked_up, "{} index scans of {relation} for {lookups} {what}", idx - before.1);
    assert!(seq - before.0 < lookups / 10, "{} sequential scans of {relation} for {lookups} {what}", seq - before.0);
}
