//! Convergence under routine operations that race replication: table rewrites and freezing,
//! DDL against changes in flight, clocks that disagree, and streams that cannot go on (each
//! must end with identical nodes, or stop visibly with a way out).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use postgres::IsolationLevel;
use trompe_tests::{checksum, expect_error, wait_for, Cluster, Node};

const SYNC: Duration = Duration::from_secs(120);

/// `node` stops (`pause`) or starts again (`resume`) pulling from `peer`.
fn link(node: &Node, what: &str, peer: &Node) {
    node.exec(&format!("SELECT trompe.{what}_peer('{}')", peer.name));
}

/// Waits until `node` has applied everything `peer` committed so far.
fn caught_up(node: &Node) {
    assert_eq!(
        node.query_text("SELECT trompe.wait_sync('120 seconds')").as_deref(),
        Some("t"),
        "{} caught up",
        node.name
    );
}

/// Waits until no session on `node` but the caller's holds a snapshot (a pull in flight when its
/// peer paused it, for one), so that a statement starting now may freeze every row committed.
fn no_other_snapshots(node: &Node) {
    assert!(
        wait_for(Duration::from_secs(60), || {
            node.query_text(
                "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND backend_xmin IS NOT NULL",
            )
            .as_deref()
                == Some("0")
        }),
        "no session on {} holds a snapshot",
        node.name
    );
}

/// While `a` does not pull from `b`: `b` runs `on_b`, then `a` runs `on_a`; once both are
/// everywhere, `check` must read `want` on every node (`why` says what was expected).
fn race(cluster: &Cluster, on_b: &str, on_a: &str, check: &str, want: &str, why: &str) {
    let (a, b) = (cluster.node(0), cluster.node(1));
    link(a, "pause", b);
    b.exec(on_b);
    a.exec(on_a);
    caught_up(b);
    link(a, "resume", b);
    cluster.wait_sync(SYNC);
    for node in cluster.nodes() {
        assert_eq!(node.query_text(check).as_deref(), Some(want), "on {}: {why}", node.name);
    }
}

/// `a` and `b` pull from each other again; once both are caught up, `check` must read `want` on
/// every node (`why` says what was expected).
fn resume_both_and_expect(cluster: &Cluster, check: &str, want: &str, why: &str) {
    let (a, b) = (cluster.node(0), cluster.node(1));
    link(a, "resume", b);
    link(b, "resume", a);
    cluster.wait_sync(SYNC);
    for node in cluster.nodes() {
        assert_eq!(node.query_text(check).as_deref(), Some(want), "on {}: {why}", node.name);
    }
}

/// Two meshed nodes replicating `r (id int PRIMARY KEY, v int, w text)` with rows 1 to `rows`
/// (`v` 0, `w` 'x') on both.
fn cluster_with_rows(name: &str, rows: usize) -> Cluster {
    let cluster = Cluster::start(name, 2);
    cluster.exec_all("CREATE TABLE r (id int PRIMARY KEY, v int, w text); SELECT trompe.add_table('r')");
    cluster.mesh();
    cluster.node(0).exec(&format!("INSERT INTO r SELECT g, 0, 'x' FROM generate_series(1, {rows}) g"));
    cluster.wait_sync(SYNC);
    cluster
}

/// For each of `rewrites` in turn (row `first`, then the next rows): b's update of the row
/// commits first, then a rewrites its table, and b's update (older than the rewrite, newer than
/// the row it replaced) must win on every node.
fn older_updates_win_over(cluster: &Cluster, first: usize, rewrites: &[&str]) {
    for (i, rewrite) in rewrites.iter().enumerate() {
        let id = first + i;
        race(
            cluster,
            &format!("UPDATE r SET v = 2 WHERE id = {id}"),
            rewrite,
            &format!("SELECT v::int FROM r WHERE id = {id}"),
            "2",
            &format!("b's update of row {id} was older than `{rewrite}` but newer than the row it replaced"),
        );
    }
}

/// Updates committed on one node while another rewrites the table (ALTER ... TYPE, VACUUM FULL
/// with FREEZE, CLUSTER) arrive after the rewrite and still win: a rewrite gives every row a
/// new physical version, but not a new replication version.
#[test]
fn updates_in_flight_win_over_table_rewrites() {
    let cluster = cluster_with_rows("rewrite-versions", 6);
    // b applies the rewrite after its update.
    older_updates_win_over(
        &cluster,
        1,
        &[
            "ALTER TABLE r ALTER COLUMN v TYPE bigint",
            "VACUUM (FULL, FREEZE) r",
            "CLUSTER r USING r_pkey",
            "ALTER TABLE r ALTER COLUMN w TYPE varchar(20)",
            "ALTER TABLE r ALTER COLUMN w SET DATA TYPE text, ALTER COLUMN v TYPE numeric",
            "VACUUM FREEZE r",
        ],
    );
    cluster.assert_same(&checksum("r"));
}

/// Two nodes insert the same key written differently (`numeric` `1.0` and `1`, equal as keys):
/// the newer insert wins on every node, its key text too (an update of the row's other columns
/// left the loser's `1.0` on the node that wrote it).
#[test]
fn equal_keys_written_differently_end_the_same_everywhere() {
    let cluster = Cluster::start("equal-keys", 2);
    cluster.exec_all(
        "CREATE TABLE n (id numeric PRIMARY KEY, v text); SELECT trompe.add_table('n');
         CREATE TABLE k (id numeric PRIMARY KEY); SELECT trompe.add_table('k')",
    );
    cluster.mesh();
    race(
        &cluster,
        "INSERT INTO n VALUES (1.0, 'b'); INSERT INTO k VALUES (2.50)",
        "INSERT INTO n VALUES (1, 'a'); INSERT INTO k VALUES (2.5)",
        "SELECT (SELECT string_agg(id::text || v, ',') FROM n) || ' ' || (SELECT string_agg(id::text, ',') FROM k)",
        "1a 2.5",
        "a's inserts were newer than b's",
    );
}

/// `CLUSTER` and `VACUUM FULL` freeze every row they can, whatever `vacuum_freeze_min_age`
/// says: a row written here after a peer's change, then frozen by them, keeps its version, and
/// the peer's older change arriving afterwards loses to it.
#[test]
fn rows_frozen_by_cluster_or_vacuum_full_keep_their_versions() {
    let cluster = Cluster::start("freeze-keeps-versions", 2);
    let (a, b) = (cluster.node(0), cluster.node(1));
    cluster.exec_all("CREATE TABLE r (id int PRIMARY KEY, v int); SELECT trompe.add_table('r')");
    cluster.mesh();
    a.exec("INSERT INTO r VALUES (1, 0), (2, 0)");
    cluster.wait_sync(SYNC);
    for (id, freeze) in [(1, "CLUSTER r USING r_pkey"), (2, "VACUUM FULL r")] {
        link(a, "pause", b);
        b.exec(&format!("UPDATE r SET v = 1 WHERE id = {id}"));
        a.exec(&format!("UPDATE r SET v = 2 WHERE id = {id}"));
        a.exec(freeze);
        resume_both_and_expect(
            &cluster,
            &format!("SELECT v FROM r WHERE id = {id}"),
            "2",
            &format!("a's update was newer than b's, and `{freeze}` froze it"),
        );
    }
}

/// `VACUUM FREEZE` and `VACUUM FULL` of a partitioned table (not replicated itself) freeze its
/// replicated partitions' rows: those keep their versions too.
#[test]
fn vacuum_of_a_partitioned_table_keeps_its_partitions_versions() {
    let cluster = Cluster::builder("freeze-partitioned").nodes(2).setting("autovacuum", "off").start();
    let (a, b) = (cluster.node(0), cluster.node(1));
    cluster.exec_all(
        "CREATE TABLE ev (id int, k int, v int, PRIMARY KEY (id, k)) PARTITION BY LIST (k);
         CREATE TABLE ev1 PARTITION OF ev FOR VALUES IN (1);
         SELECT trompe.add_table('ev1')",
    );
    cluster.mesh();
    a.exec("INSERT INTO ev VALUES (1, 1, 0), (2, 1, 0)");
    cluster.wait_sync(SYNC);
    for (id, freeze) in [(1, "VACUUM FREEZE ev"), (2, "VACUUM FULL ev")] {
        link(a, "pause", b);
        b.exec(&format!("UPDATE ev SET v = 1 WHERE id = {id}"));
        a.exec(&format!("UPDATE ev SET v = 2 WHERE id = {id}"));
        caught_up(b);
        link(b, "pause", a);
        no_other_snapshots(a);
        a.exec(freeze);
        resume_both_and_expect(
            &cluster,
            &format!("SELECT v FROM ev WHERE id = {id}"),
            "2",
            &format!("a's update was newer than b's, and `{freeze}` froze it"),
        );
    }
}

/// Runs `n` transactions on `node`, each taking a transaction id.
fn burn_xids(node: &Node, n: u32) {
    node.exec(&format!("DO $$ BEGIN FOR i IN 1..{n} LOOP PERFORM pg_catalog.txid_current(); COMMIT; END LOOP; END $$"));
}

/// On meshed nodes a and b replicating `r (id int PRIMARY KEY, v int)`: rows 1 and 2 (`v` 0)
/// everywhere, then, while neither pulls from the other, b updates row 1 (`v` 1), then a does
/// (`v` 2, the newer update).
fn updates_of_row_1_apart(cluster: &Cluster) {
    let (a, b) = (cluster.node(0), cluster.node(1));
    a.exec("INSERT INTO r VALUES (1, 0), (2, 0)");
    cluster.wait_sync(SYNC);
    link(a, "pause", b);
    b.exec("UPDATE r SET v = 1 WHERE id = 1");
    a.exec("UPDATE r SET v = 2 WHERE id = 1");
    caught_up(b);
    link(b, "pause", a);
}

/// Lets autovacuum in on table `r` of `node` (created with `autovacuum_enabled = false`) and
/// waits until it has vacuumed it.
fn autovacuum_runs_on_r(node: &Node) {
    no_other_snapshots(node);
    node.exec("ALTER TABLE r SET (autovacuum_enabled = true)");
    assert!(
        wait_for(Duration::from_secs(60), || {
            node.query_i64("SELECT autovacuum_count FROM pg_stat_user_tables WHERE relid = 'r'::regclass") > 0
        }),
        "autovacuum ran on {}",
        node.name
    );
}

/// Waits until the worker of `node` has kept the version of row 1 of `r` as it is (it looks
/// every minute).
fn worker_keeps_row_1s_version(node: &Node, why: &str) {
    assert!(
        wait_for(Duration::from_secs(150), || {
            node.query_text(
                "SELECT count(*) FROM trompe.row_versions k JOIN r ON k.key = ARRAY[r.id::text]
                  WHERE k.relid = 'r'::regclass AND r.id = 1 AND k.row_xmin = r.xmin AND k.committed_us IS NOT NULL",
            )
            .as_deref()
                == Some("1")
        }),
        "the worker of {} kept the version of row 1: {why}",
        node.name
    );
}

/// Autovacuum freezes a table's rows from the table's own `autovacuum_freeze_min_age`: the
/// worker keeps their versions before that age, not only before the server's setting (and
/// settings written in hexadecimal or with an exponent, on other tables, do not stop it).
#[test]
fn autovacuum_freeze_min_age_of_a_table_is_honoured() {
    let cluster = Cluster::builder("freeze-reloption")
        .nodes(2)
        .setting("autovacuum_naptime", "1")
        .setting("autovacuum_vacuum_threshold", "0")
        .setting("autovacuum_vacuum_scale_factor", "0")
        .start();
    let a = cluster.node(0);
    cluster.exec_all(
        "CREATE TABLE r (id int PRIMARY KEY, v int) WITH (autovacuum_enabled = false, autovacuum_freeze_min_age = 1000);
         SELECT trompe.add_table('r');
         CREATE TABLE hex (id int PRIMARY KEY) WITH (autovacuum_freeze_min_age = '0x10');
         CREATE TABLE exp (id int PRIMARY KEY) WITH (autovacuum_freeze_min_age = '1e5');
         SELECT trompe.add_table('hex'); SELECT trompe.add_table('exp')",
    );
    cluster.mesh();
    updates_of_row_1_apart(&cluster);
    // Half-way to the table's freeze age, the worker keeps the row's version...
    burn_xids(a, 600);
    worker_keeps_row_1s_version(a, "older than half the table's autovacuum_freeze_min_age");
    // ... before autovacuum freezes it.
    burn_xids(a, 600);
    autovacuum_runs_on_r(a);
    resume_both_and_expect(
        &cluster,
        "SELECT v FROM r WHERE id = 1",
        "2",
        "a's update was newer than b's, and autovacuum froze it",
    );
}

/// Since PostgreSQL 16 vacuum (autovacuum here) freezes a whole page, however young its rows,
/// when it writes a full-page image of it anyway (its first change after a checkpoint, with
/// `full_page_writes = on`, the default), and moves `relfrozenxid` past them.
/// Such a row keeps its version: first from its own commit timestamp, then from the version
/// the worker keeps once it is old enough to be frozen anyway, also once it is older than
/// the age up to which commit timestamps are trusted. b's older update, arriving only then,
/// loses to a's newer one on every node.
#[test]
fn young_rows_vacuum_freezes_after_a_checkpoint_keep_their_versions() {
    let cluster = Cluster::builder("young-frozen-rows")
        .nodes(2)
        .setting("autovacuum_naptime", "1")
        .setting("autovacuum_vacuum_threshold", "0")
        .setting("autovacuum_vacuum_scale_factor", "0")
        .setting("vacuum_freeze_min_age", "1000")
        .setting("autovacuum_freeze_max_age", "100000")
        .start();
    let a = cluster.node(0);
    // Autovacuum leaves the table alone until the test lets it in.
    cluster.exec_all(
        "CREATE TABLE r (id int PRIMARY KEY, v int) WITH (autovacuum_enabled = false); SELECT trompe.add_table('r')",
    );
    cluster.mesh();
    updates_of_row_1_apart(&cluster);
    no_other_snapshots(a);
    a.exec("CHECKPOINT");
    autovacuum_runs_on_r(a);
    let frozen_past_row = "SELECT pg_catalog.age(c.relfrozenxid) < pg_catalog.age(r.xmin)
                             FROM r, pg_catalog.pg_class c WHERE c.oid = 'r'::regclass AND r.id = 1";
    if a.query_i64("SELECT current_setting('server_version_num')::int") >= 160000 {
        assert_eq!(
            a.query_text(frozen_past_row).as_deref(),
            Some("t"),
            "autovacuum froze a's young row (relfrozenxid moved past it)"
        );
    }
    // Half-way to the freeze age, the worker keeps the row's version...
    burn_xids(a, 600);
    worker_keeps_row_1s_version(a, "frozen young, older than half the freeze age");
    // ... which the row reads once its commit timestamp is too old to be trusted (half of
    // autovacuum_freeze_max_age).
    burn_xids(a, 51_000);
    resume_both_and_expect(
        &cluster,
        "SELECT string_agg(v::text, ',' ORDER BY id) FROM r",
        "2,0",
        "a's update was newer than b's",
    );
}

/// The worker reads the version of each aging row once, not once a minute: a sweep of a table
/// looks only at the rows that aged past half its freeze age since its last sweep (on a big
/// table, reading every old row's version each minute kept the worker from replicating), one
/// slice of the table at a time, whatever runs in other databases, and without passing by rows
/// of transactions still running.
#[test]
fn the_worker_reads_the_version_of_each_aging_row_once() {
    let cluster = Cluster::builder("version-sweeps")
        .nodes(1)
        .setting("autovacuum", "off")
        .setting("track_functions", "all")
        .start();
    let a = cluster.node(0);
    // Spread over more blocks than one slice of a sweep scans (all slices are swept).
    a.exec(
        "CREATE TABLE big (id int PRIMARY KEY, v int) WITH (autovacuum_freeze_min_age = 1000, fillfactor = 10);
         SELECT trompe.add_table('big');
         INSERT INTO big SELECT g, 0 FROM generate_series(1, 30000) g",
    );
    assert!(a.query_i64("SELECT pg_relation_size('big') / 8192") > 1024, "the table spans more than one slice");
    let kept = "SELECT count(*) FROM trompe.row_versions WHERE relid = 'big'::regclass";
    let calls = "SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions WHERE funcname = '_row_version'";
    burn_xids(a, 600);
    assert!(
        wait_for(Duration::from_secs(150), || a.query_i64(kept) == 30_000),
        "the worker kept the aging rows' versions"
    );
    assert!(
        wait_for(Duration::from_secs(30), || a.query_i64(calls) >= 30_000),
        "the worker's reads of versions are counted"
    );
    let before = a.query_i64(calls);
    // A transaction of another database, holding its xid meanwhile, does not hold the sweeps
    // back (vacuum here freezes rows regardless of it)...
    let mut elsewhere = a.connect_to("postgres");
    let mut other = elsewhere.transaction().expect("begin");
    other.batch_execute("SELECT pg_catalog.txid_current()").expect("an xid");
    // ... while one of this database, writing, does: the watermark stops at it.
    let mut here = a.connect();
    let mut long = here.transaction().expect("begin");
    long.batch_execute("INSERT INTO big VALUES (30011, 0)").expect("insert");
    let long_xid: i64 = long.query_one("SELECT pg_catalog.txid_current()", &[]).expect("its xid").get(0);
    a.exec("INSERT INTO big SELECT g, 0 FROM generate_series(30001, 30010) g");
    burn_xids(a, 600);
    let watermark = "SELECT coalesce((SELECT kept_below::text::bigint FROM trompe.version_sweeps
                                        WHERE relid = 'big'::regclass), 0)";
    assert!(
        wait_for(Duration::from_secs(150), || a.query_i64(watermark) >= long_xid),
        "a sweep went up to the running transaction of this database, past the other database's"
    );
    long.commit().expect("commit");
    other.rollback().expect("rollback");
    burn_xids(a, 600);
    assert!(
        wait_for(Duration::from_secs(150), || a.query_i64(kept) == 30_011),
        "the worker kept the new rows' versions, also the one the long transaction wrote"
    );
    assert!(wait_for(Duration::from_secs(30), || a.query_i64(calls) >= before + 11), "those reads are counted");
    let read = a.query_i64(calls) - before;
    assert!(read < 30_000, "the worker read {read} versions to keep 11 new ones: it read the old rows' again");
}

/// A replicated table a session holds locked (a migration, `LOCK TABLE`) while the worker would
/// keep the versions of its aging rows: the worker gives way (and tries again later), and goes
/// on replicating every other table meanwhile.
#[test]
fn a_locked_table_does_not_hold_replication_back() {
    let cluster = Cluster::start("locked-sweep", 2);
    let (a, b) = (cluster.node(0), cluster.node(1));
    cluster.exec_all(
        "CREATE TABLE t1 (id int PRIMARY KEY) WITH (autovacuum_freeze_min_age = 100);
         CREATE TABLE t2 (id int PRIMARY KEY);
         SELECT trompe.add_table('t1'); SELECT trompe.add_table('t2')",
    );
    cluster.mesh();
    a.exec("INSERT INTO t1 VALUES (1)");
    cluster.wait_sync(SYNC);
    let mut holder = a.connect();
    holder.batch_execute("BEGIN; LOCK TABLE t1 IN ACCESS EXCLUSIVE MODE").expect("lock");
    // t1's rows now age past half its freeze age: the worker's next sweep wants t1.
    burn_xids(a, 300);
    assert!(
        wait_for(Duration::from_secs(150), || {
            a.log().lines().any(|l| l.contains("versions of aging rows of table") && l.contains("lock timeout"))
        }),
        "the worker gave up waiting for t1's lock"
    );
    b.exec("INSERT INTO t2 VALUES (42)");
    assert!(
        wait_for(Duration::from_secs(30), || a.query_i64("SELECT count(*) FROM t2 WHERE id = 42") == 1),
        "b's insert into t2 reached a while t1 was locked"
    );
    holder.batch_execute("ROLLBACK").expect("unlock");
    cluster.wait_sync(SYNC);
}

/// A row committed while `VACUUM FREEZE`, `VACUUM FULL` or `CLUSTER` keeps the table's row
/// versions (after that pass read the table, before the statement froze it) keeps its version
/// too: the peer's older change arriving afterwards loses to it, and its version is kept once
/// the statement has ended. The pass is held at a kept version another session has locked, so
/// the row commits exactly inside that window. (`CLUSTER` of one table freezes nothing newer
/// than its own snapshot: only the form that clusters every table in turn has such a window.)
#[test]
fn rows_committed_while_versions_are_kept_keep_theirs() {
    // No autovacuum snapshot keeps the statement from freezing the row.
    let cluster = Cluster::builder("freeze-window").nodes(2).setting("autovacuum", "off").start();
    let (a, b) = (cluster.node(0), cluster.node(1));
    cluster.exec_all(
        "CREATE TABLE r (id int PRIMARY KEY, v int); ALTER TABLE r CLUSTER ON r_pkey; SELECT trompe.add_table('r')",
    );
    cluster.mesh();
    a.exec("INSERT INTO r SELECT g, 0 FROM generate_series(1, 3) g; INSERT INTO r VALUES (100, 0)");
    cluster.wait_sync(SYNC);
    // Keeps every row's version, row 100's too: the next pass meets it again and must lock it.
    a.exec("VACUUM FREEZE r");
    for (id, freeze) in [(1, "VACUUM FREEZE r"), (2, "VACUUM FULL r"), (3, "CLUSTER")] {
        // No pull of b's holds a snapshot on a that keeps the statement from freezing the row.
        link(a, "pause", b);
        link(b, "pause", a);
        no_other_snapshots(a);
        b.exec(&format!("UPDATE r SET v = 1 WHERE id = {id}"));
        let mut holder = a.connect();
        holder
            .batch_execute(
                "BEGIN; SELECT 1 FROM trompe.row_versions WHERE relid = 'r'::regclass AND key = '{100}' FOR UPDATE",
            )
            .expect("row 100's kept version is locked");
        std::thread::scope(|s| {
            let freezing = s.spawn(|| a.exec(freeze));
            assert!(
                wait_for(Duration::from_secs(30), || {
                    a.query_text(&format!(
                        "SELECT count(*) FROM pg_stat_activity WHERE query = '{freeze}' AND wait_event_type = 'Lock'"
                    ))
                    .as_deref()
                        == Some("1")
                }),
                "`{freeze}` waits for the kept version of row 100"
            );
            a.exec(&format!("UPDATE r SET v = 2 WHERE id = {id}"));
            holder.batch_execute("COMMIT").expect("the lock is released");
            freezing.join().expect("the freezing statement ends");
        });
        assert_eq!(
            a.query_text(&format!(
                "SELECT age(r.xmin) > age(c.relfrozenxid) FROM r, pg_class c WHERE r.id = {id} AND c.oid = 'r'::regclass"
            ))
            .as_deref(),
            Some("t"),
            "`{freeze}` froze a's update of row {id}"
        );
        assert_eq!(
            a.query_text(&format!(
                "SELECT (SELECT count(*) FROM trompe.freeze_windows)
                     || ' ' || (SELECT count(*) FROM trompe.row_versions k JOIN r ON k.key = ARRAY[r.id::text]
                                 WHERE k.relid = 'r'::regclass AND r.id = {id} AND k.row_xmin = r.xmin)"
            ))
            .as_deref(),
            Some("0 1"),
            "once `{freeze}` has ended, no freeze window is open and the frozen row's version is kept"
        );
        resume_both_and_expect(
            &cluster,
            &format!("SELECT v FROM r WHERE id = {id}"),
            "2",
            &format!("a's update was newer than b's, and `{freeze}` froze it"),
        );
    }
}

/// A freezing statement that fails leaves its freeze windows open: a row committed in one (and
/// frozen) keeps winning over an older change from a peer, and the worker keeps its version and
/// closes the windows once the statement no longer runs. The statement is held at a kept version
/// another session has locked while the row commits, then cancelled while it waits for a table.
#[test]
fn a_failed_freezing_statement_leaves_its_windows_to_the_worker() {
    // No autovacuum snapshot keeps the statement from freezing the row.
    let cluster = Cluster::builder("freeze-window-failed").nodes(2).setting("autovacuum", "off").start();
    let (a, b) = (cluster.node(0), cluster.node(1));
    cluster.exec_all(
        "CREATE TABLE r (id int PRIMARY KEY, v int); CREATE TABLE s (id int PRIMARY KEY);
         SELECT trompe.add_table('r'); SELECT trompe.add_table('s')",
    );
    cluster.mesh();
    a.exec("INSERT INTO r VALUES (1, 0), (100, 0)");
    cluster.wait_sync(SYNC);
    a.exec("VACUUM FREEZE r");
    link(a, "pause", b);
    link(b, "pause", a);
    no_other_snapshots(a);
    b.exec("UPDATE r SET v = 1 WHERE id = 1");
    let mut version_holder = a.connect();
    version_holder
        .batch_execute(
            "BEGIN; SELECT 1 FROM trompe.row_versions WHERE relid = 'r'::regclass AND key = '{100}' FOR UPDATE",
        )
        .expect("row 100's kept version is locked");
    let mut table_holder = a.connect();
    table_holder.batch_execute("BEGIN; LOCK TABLE s IN SHARE MODE").expect("s is locked");
    let waiting_on = |what: &str| {
        wait_for(Duration::from_secs(30), || {
            a.query_text(&format!(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'VACUUM (FREEZE, VERBOSE) r, s' AND wait_event = '{what}'"
            ))
            .as_deref()
                == Some("1")
        })
    };
    let report = std::thread::scope(|scope| {
        let vacuum = scope.spawn(|| {
            let (mut client, notices) = a.connect_keeping_notices();
            let message = expect_error(&mut client, "VACUUM (FREEZE, VERBOSE) r, s").1;
            let report = notices.lock().map(|n| n.join("\n")).unwrap_or_default();
            (message, report)
        });
        assert!(waiting_on("transactionid"), "VACUUM waits for the kept version of row 100");
        let update = a.query_text("UPDATE r SET v = 2 WHERE id = 1 RETURNING xmin::text").expect("a's update");
        // The worker records a snapshot mark for that commit in a short transaction of its own:
        // one still running when VACUUM picks its freeze cutoff (it started while the kept
        // version was locked) would keep VACUUM from freezing the update. Wait until it is done,
        // and no background process holds a snapshot or a transaction. (The holders run nothing
        // more: a query in the table holder's transaction would leave its snapshot's xmin.)
        let marked =
            format!("SELECT count(*) FROM trompe.snapshot_marks WHERE pg_snapshot_xmax(snap) > '{update}'::text::xid8");
        assert!(wait_for(Duration::from_secs(30), || a.query_i64(&marked) > 0), "the worker marked a's update");
        let others = "SELECT count(*) FROM pg_stat_activity
                       WHERE pid <> pg_backend_pid() AND backend_type <> 'client backend'
                         AND (backend_xmin IS NOT NULL OR backend_xid IS NOT NULL)";
        assert!(wait_for(Duration::from_secs(30), || a.query_i64(others) == 0), "no other snapshot on a");
        version_holder.batch_execute("COMMIT").expect("the kept version is unlocked");
        // VACUUM now ends the transaction that kept the versions and picks r's freeze cutoff: a
        // snapshot taken before that transaction ended (this test's first poll, sent at once,
        // did) holds the cutoff below a's update. Nothing to wait for can be observed without
        // taking a snapshot, hence the pause before polling.
        std::thread::sleep(Duration::from_millis(300));
        assert!(waiting_on("relation"), "VACUUM froze r and waits for s");
        a.exec("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query = 'VACUUM (FREEZE, VERBOSE) r, s'");
        let (message, report) = vacuum.join().expect("VACUUM ends");
        assert!(message.contains("canceling statement"), "VACUUM was cancelled: {message}");
        report
    });
    table_holder.batch_execute("COMMIT").expect("s is unlocked");
    assert_eq!(
        a.query_text(
            "SELECT (age(r.xmin) > age(c.relfrozenxid)) || ' ' || (SELECT count(*) FROM trompe.freeze_windows)
               FROM r, pg_class c WHERE r.id = 1 AND c.oid = 'r'::regclass"
        )
        .as_deref(),
        Some("true 2"),
        "the cancelled VACUUM froze a's update and left both windows open; it said:\n{report}"
    );
    resume_both_and_expect(&cluster, "SELECT v FROM r WHERE id = 1", "2", "a's update was newer than b's");
    // A fresh worker looks for the windows of statements that no longer run at once.
    a.restart();
    assert!(
        wait_for(Duration::from_secs(60), || {
            a.query_text(
                "SELECT (SELECT count(*) FROM trompe.freeze_windows)
                     || ' ' || (SELECT count(*) FROM trompe.row_versions k JOIN r ON k.key = ARRAY[r.id::text]
                                 WHERE k.relid = 'r'::regclass AND r.id = 1 AND k.row_xmin = r.xmin)",
            )
            .as_deref()
                == Some("0 1")
        }),
        "the worker closed both windows and kept the version of the row frozen in r's"
    );
}

/// A rewrite reads each row's version with the layout the row was written in: the key column
/// is not the first one, a column before it changes size, and an index on a changed column is
/// built anew by the same statement (planning any query on the table then fails).
#[test]
fn rewrites_read_rows_in_their_layout_before_the_statement() {
    let cluster = Cluster::start("rewrite-layout", 2);
    let (a, b) = (cluster.node(0), cluster.node(1));
    cluster.exec_all(
        "CREATE TABLE s (v int, id int PRIMARY KEY, w int); CREATE INDEX s_v ON s (v); SELECT trompe.add_table('s')",
    );
    cluster.mesh();
    a.exec("INSERT INTO s SELECT g * 10, g, 0 FROM generate_series(1, 6) g");
    cluster.wait_sync(SYNC);
    let rewrites = [
        "ALTER TABLE s ALTER COLUMN v TYPE bigint",
        "ALTER TABLE s ALTER COLUMN id TYPE bigint",
        "ALTER TABLE s ALTER COLUMN v TYPE text USING v::text",
        "ALTER TABLE s ALTER COLUMN v TYPE varchar(30)",
    ];
    for (i, rewrite) in rewrites.iter().enumerate() {
        let id = i + 1;
        race(
            &cluster,
            &format!("UPDATE s SET w = 2 WHERE id = {id}"),
            rewrite,
            &format!("SELECT w FROM s WHERE id = {id}"),
            "2",
            &format!("b's update of row {id} was older than `{rewrite}` but newer than the row it replaced"),
        );
    }
    // A row the rewriting transaction itself wrote keeps that transaction's version.
    race(
        &cluster,
        "UPDATE s SET w = 7 WHERE id = 5",
        "BEGIN; UPDATE s SET w = 8 WHERE id = 5; ALTER TABLE s ALTER COLUMN id TYPE int; COMMIT",
        "SELECT w FROM s WHERE id = 5",
        "8",
        "the rewriting transaction's own update is newer than b's",
    );
    // The same on the node that applied the earlier rewrites for its peer.
    b.exec("CREATE INDEX CONCURRENTLY s_w ON s (w)");
    b.exec("ALTER TABLE s ALTER COLUMN w TYPE bigint");
    cluster.wait_sync(SYNC);
    cluster.assert_same(&checksum("s"));
}

/// A rewrite inside a subtransaction (a savepoint, a PL/pgSQL block with an `EXCEPTION`
/// clause) gives the rows that subtransaction's xid as `xmin`, not the top-level one; the rows
/// still read their kept versions, also after a second rewrite in another subtransaction of the
/// same transaction, and rows the rewriting transaction writes afterwards have its version.
#[test]
fn rewrites_inside_subtransactions_keep_row_versions() {
    let cluster = cluster_with_rows("rewrite-subxact", 10);
    older_updates_win_over(
        &cluster,
        1,
        &[
            "BEGIN; SAVEPOINT s; ALTER TABLE r ALTER COLUMN v TYPE bigint; RELEASE SAVEPOINT s; COMMIT",
            "BEGIN; SAVEPOINT s1; ALTER TABLE r ALTER COLUMN v TYPE int; RELEASE SAVEPOINT s1;
                    SAVEPOINT s2; ALTER TABLE r ALTER COLUMN v TYPE bigint; RELEASE SAVEPOINT s2; COMMIT",
            "BEGIN; ALTER TABLE r ALTER COLUMN v TYPE int;
                    SAVEPOINT s; ALTER TABLE r ALTER COLUMN v TYPE bigint; RELEASE SAVEPOINT s; COMMIT",
            "BEGIN; SAVEPOINT s; ALTER TABLE r ALTER COLUMN v TYPE numeric; ROLLBACK TO SAVEPOINT s;
                    ALTER TABLE r ALTER COLUMN v TYPE int; COMMIT",
            "DO $$ BEGIN
                 BEGIN ALTER TABLE r ALTER COLUMN v TYPE bigint; EXCEPTION WHEN division_by_zero THEN NULL; END;
             END $$",
        ],
    );
    // Rows the rewriting transaction writes after the rewrite, in the rewriting subtransaction
    // or after it, have that transaction's version: newer than b's.
    let newer_own_update = [
        (
            6,
            "BEGIN; SAVEPOINT s; ALTER TABLE r ALTER COLUMN v TYPE int; UPDATE r SET w = 'a' WHERE id = 6;
                    RELEASE SAVEPOINT s; COMMIT",
        ),
        (
            7,
            "BEGIN; SAVEPOINT s; ALTER TABLE r ALTER COLUMN v TYPE bigint; RELEASE SAVEPOINT s;
                    UPDATE r SET w = 'a' WHERE id = 7; COMMIT",
        ),
        (
            8,
            "BEGIN; SAVEPOINT s1; ALTER TABLE r ALTER COLUMN v TYPE int; UPDATE r SET w = 'a' WHERE id = 8;
                    RELEASE SAVEPOINT s1; SAVEPOINT s2; ALTER TABLE r ALTER COLUMN v TYPE bigint;
                    RELEASE SAVEPOINT s2; COMMIT",
        ),
        (
            9,
            "BEGIN; SAVEPOINT s1; ALTER TABLE r ALTER COLUMN v TYPE int;
                    SAVEPOINT s2; UPDATE r SET w = 'a' WHERE id = 9; RELEASE SAVEPOINT s2; RELEASE SAVEPOINT s1;
                    SAVEPOINT s3; ALTER TABLE r ALTER COLUMN v TYPE bigint; RELEASE SAVEPOINT s3; COMMIT",
        ),
        (
            10,
            "BEGIN; SAVEPOINT s; ALTER TABLE r ALTER COLUMN v TYPE int; RELEASE SAVEPOINT s;
                     UPDATE r SET w = 'a' WHERE id = 10; ALTER TABLE r ALTER COLUMN v TYPE bigint; COMMIT",
        ),
    ];
    for (id, rewrite) in newer_own_update {
        race(
            &cluster,
            &format!("UPDATE r SET v = 2 WHERE id = {id}"),
            rewrite,
            &format!("SELECT v::int || w FROM r WHERE id = {id}"),
            "0a",
            &format!("a's own update of row {id} in `{rewrite}` was newer than b's"),
        );
    }
    cluster.assert_same(&checksum("r"));
}

/// A peer applying a transaction that rewrote a table and then changed some of its rows keeps
/// the kept version of a row whose change lost there (the row it has is newer): a change
/// ranking between the two versions, arriving later, loses there as it does at the origin.
#[test]
fn changes_after_a_rewrite_that_lose_keep_the_rows_versions() {
    let cluster = cluster_with_rows("lose-after-rewrite", 2);
    let (a, b) = (cluster.node(0), cluster.node(1));
    link(a, "pause", b);
    link(b, "pause", a);
    // t1: a rewrites r, then updates row 1 and deletes row 2 in the same transaction.
    a.exec(
        "BEGIN; ALTER TABLE r ALTER COLUMN v TYPE bigint;
                UPDATE r SET w = 'T' WHERE id = 1; DELETE FROM r WHERE id = 2; COMMIT",
    );
    // t2 > t1: a changes both rows again.
    a.exec("UPDATE r SET w = 'U' WHERE id = 1; INSERT INTO r VALUES (2, 5, 'U')");
    // t3 > t2: b's updates of both rows are the newest changes.
    b.exec("UPDATE r SET w = 'B' WHERE id = 1; UPDATE r SET w = 'B' WHERE id = 2");
    resume_both_and_expect(
        &cluster,
        "SELECT string_agg(w, ',' ORDER BY id) FROM r",
        "B,B",
        "b's updates are the newest",
    );
    cluster.assert_same(&checksum("r"));
}

/// Sets each node's server time zone (`ALTER SYSTEM`), as nodes in different regions have them.
fn time_zones(cluster: &Cluster, zones: &[&str]) {
    for (node, zone) in cluster.nodes().iter().zip(zones) {
        node.exec(&format!("ALTER SYSTEM SET TimeZone = '{zone}'"));
        node.exec("SELECT pg_reload_conf()");
    }
    for (node, zone) in cluster.nodes().iter().zip(zones) {
        assert!(
            wait_for(Duration::from_secs(30), || node.query_text("SHOW TimeZone").as_deref() == Some(zone)),
            "{} runs in {zone}",
            node.name
        );
    }
}

/// Keys whose text depends on the session's time zone (`timestamptz`) or output settings
/// (`bytea_output`) are the same key on nodes in different zones and in any session: a delete's tombstone stops an older update of the same row from
/// another zone, and versions kept by `VACUUM FULL` are found by changes from another zone.
#[test]
fn time_zone_dependent_keys_match_across_zones() {
    let cluster = Cluster::start("time-zone-keys", 2);
    let (a, b) = (cluster.node(0), cluster.node(1));
    time_zones(&cluster, &["UTC", "Asia/Tokyo"]);
    cluster.exec_all(
        "CREATE TABLE readings (device int, at timestamptz, v int, PRIMARY KEY (device, at));
         SELECT trompe.add_table('readings');
         CREATE TABLE blobs (k bytea PRIMARY KEY, v int); SELECT trompe.add_table('blobs')",
    );
    cluster.mesh();
    a.exec(
        "INSERT INTO readings VALUES (1, '2026-01-01 00:00:00+00', 0), (2, '2026-01-01 00:00:00+00', 0);
         INSERT INTO blobs VALUES ('\\x01', 0)",
    );
    cluster.wait_sync(SYNC);
    // a's updates are older than b's deletes (one in a session printing bytea as escapes): the
    // deletes win on both nodes.
    link(a, "pause", b);
    link(b, "pause", a);
    a.exec("UPDATE readings SET v = 1 WHERE device = 1; UPDATE blobs SET v = 1");
    b.exec("DELETE FROM readings WHERE device = 1; SET bytea_output = 'escape'; DELETE FROM blobs");
    link(a, "resume", b);
    link(b, "resume", a);
    cluster.wait_sync(SYNC);
    // a's update is older than b's, whose row b then freezes (VACUUM FULL, in Tokyo): when a's
    // arrives there, b's kept version beats it.
    link(b, "pause", a);
    a.exec("UPDATE readings SET v = 1 WHERE device = 2");
    b.exec("UPDATE readings SET v = 2 WHERE device = 2");
    caught_up(a);
    link(a, "pause", b);
    no_other_snapshots(b);
    b.exec("VACUUM FULL readings");
    resume_both_and_expect(
        &cluster,
        "SELECT string_agg(device || ':' || v, ',' ORDER BY device) FROM readings",
        "2:2",
        "b's delete of row 1 and b's update of row 2 are the newest",
    );
    for node in cluster.nodes() {
        assert_eq!(node.query_text("SELECT count(*) FROM blobs").as_deref(), Some("0"), "on {}", node.name);
    }
    // Each node prints times in its own zone: compare the instants.
    cluster.assert_same(
        "SELECT string_agg(device || ' ' || extract(epoch FROM at) || ' ' || v, ',' ORDER BY device) FROM readings",
    );
}

/// The index scans of `trompe.row_versions` the calling session has made and not reported yet.
const KEPT_LOOKUPS: &str = "SELECT pg_catalog.pg_stat_get_xact_numscans('trompe.row_versions_pkey'::regclass)";

/// The replaced versions the calling transaction captured, as `trompe.log_changes` shows them
/// (empty where unknown), in order.
const CAPTURED_OLD: &str =
    "SELECT pg_catalog.string_agg(coalesce(old_version, ''), ',' ORDER BY seq) FROM trompe.log_changes() WHERE id IS NULL";

/// Runs `sql` in a transaction of `session` that is rolled back: the lookups of kept versions
/// it made, and the replaced versions it captured (as `CAPTURED_OLD`).
fn lookups_and_captured(session: &mut postgres::Client, sql: &str) -> (i64, String) {
    // The counts are the session's not yet reported ones: they may include earlier
    // transactions'.
    let mut t = session.transaction().expect("begin");
    let before: i64 = t.query_one(KEPT_LOOKUPS, &[]).expect("scans").get(0);
    t.batch_execute(sql).expect("update");
    let scans = t.query_one(KEPT_LOOKUPS, &[]).expect("scans").get::<_, i64>(0) - before;
    let old: Option<String> = t.query_one(CAPTURED_OLD, &[]).expect("captured").get(0);
    t.rollback().expect("rollback");
    (scans, old.unwrap_or_default())
}

/// Capture finds the kept version of a frozen row by its key's canonical text, whatever the
/// writing session's `DateStyle` and `TimeZone`.
#[test]
fn kept_versions_are_found_whatever_the_sessions_date_style_and_time_zone() {
    let cluster = Cluster::builder("kept-version-date-style").nodes(1).setting("autovacuum", "off").start();
    let a = cluster.node(0);
    a.exec(
        "CREATE TABLE d (day date, at timestamptz, v int, PRIMARY KEY (day, at)); SELECT trompe.add_table('d');
         INSERT INTO d VALUES ('2026-01-02', '2026-01-02 03:00:00+00', 0)",
    );
    no_other_snapshots(a);
    a.exec("VACUUM FREEZE d");
    assert_eq!(
        a.query_text("SELECT count(*) FROM trompe.row_versions WHERE relid = 'd'::regclass").as_deref(),
        Some("1"),
        "VACUUM FREEZE kept the version of d's row"
    );
    let mut session = a.connect();
    session.batch_execute("SET DateStyle = 'SQL, DMY'; SET TimeZone = 'Asia/Tokyo'").expect("settings");
    let (_, old) = lookups_and_captured(&mut session, "UPDATE d SET v = 1");
    assert!(!old.is_empty(), "the update captured the frozen row's kept version: {old:?}");
}

/// Updates of frozen rows of a table without kept versions do not look for one (the table's
/// cached facts say it has none), and a session that read those facts before versions of the
/// table were kept finds them afterwards.
#[test]
fn kept_versions_are_looked_up_only_for_tables_that_have_some() {
    // No autovacuum snapshot keeps the freezing statements from freezing every row.
    let cluster = Cluster::builder("kept-version-lookups").nodes(1).setting("autovacuum", "off").start();
    let a = cluster.node(0);
    // Loaded and frozen before it is replicated: its rows have no kept versions.
    a.exec("CREATE TABLE cold (id int PRIMARY KEY, v int); INSERT INTO cold SELECT g, 0 FROM generate_series(1, 20) g");
    no_other_snapshots(a);
    a.exec("VACUUM FREEZE cold");
    a.exec("SELECT trompe.add_table('cold'); CREATE TABLE r (id int PRIMARY KEY, v int); SELECT trompe.add_table('r')");
    a.exec("INSERT INTO r SELECT g, 0 FROM generate_series(1, 3) g");
    let mut session = a.connect();
    // The first write reads the table's facts (one scan, for all the session's writes).
    lookups_and_captured(&mut session, "UPDATE cold SET v = v + 1 WHERE id = 1");
    let (scans, old) = lookups_and_captured(&mut session, "UPDATE cold SET v = v + 1");
    assert_eq!(scans, 0, "no lookup for the 20 frozen rows of a table without kept versions");
    let versions: Vec<&str> = old.split(',').collect();
    assert!(
        versions.len() == 20 && versions.iter().all(|v| !v.is_empty()),
        "their versions read from their commit timestamps (frozen while young): {old:?}"
    );
    // This session has read r's facts: no kept versions, rows not frozen.
    let (_, old) = lookups_and_captured(&mut session, "UPDATE r SET v = v + 1 WHERE id = 1");
    assert!(!old.is_empty(), "r's row has a known version: {old:?}");
    no_other_snapshots(a);
    a.exec("VACUUM FREEZE r");
    assert_eq!(
        a.query_text("SELECT count(*) FROM trompe.row_versions WHERE relid = 'r'::regclass").as_deref(),
        Some("3"),
        "VACUUM FREEZE kept the versions of r's rows"
    );
    let (scans, old) = lookups_and_captured(&mut session, "UPDATE r SET v = v + 1 WHERE id = 2");
    assert!(scans > 0, "r's frozen row is looked up");
    assert!(!old.is_empty(), "the same session reads r's kept version");
    // A transaction whose snapshot is older than the versions kept still finds them (and does
    // not leave its session believing there are none).
    a.exec("CREATE TABLE s (id int PRIMARY KEY, v int); SELECT trompe.add_table('s'); INSERT INTO s VALUES (1, 0)");
    let mut t = session.build_transaction().isolation_level(IsolationLevel::RepeatableRead).start().expect("begin");
    t.batch_execute("SELECT 1").expect("snapshot");
    a.exec("VACUUM FREEZE s");
    assert_eq!(
        a.query_text("SELECT count(*) FROM trompe.row_versions WHERE relid = 's'::regclass").as_deref(),
        Some("1"),
        "VACUUM FREEZE kept the version of s's row"
    );
    t.batch_execute("UPDATE s SET v = v + 1").expect("update");
    let old: Option<String> = t.query_one(CAPTURED_OLD, &[]).expect("captured").get(0);
    t.rollback().expect("rollback");
    assert!(!old.unwrap_or_default().is_empty(), "a repeatable read transaction reads s's kept version");
    let (_, old) = lookups_and_captured(&mut session, "UPDATE s SET v = v + 1");
    assert!(!old.is_empty(), "and so does the session's next transaction");
}

/// A row's version outlives PostgreSQL's commit timestamps: once `pg_commit_ts` has been
/// truncated past the transaction that wrote it (after freezing), an older change arriving late
/// still loses to it.
#[test]
fn row_versions_outlive_commit_timestamp_truncation() {
    let cluster = Cluster::start("commit-ts-truncation", 2);
    let (a, b) = (cluster.node(0), cluster.node(1));
    cluster.exec_all(
        "CREATE TABLE r (id int PRIMARY KEY, v int); SELECT trompe.add_table('r');
         CREATE PROCEDURE burn(n int) LANGUAGE plpgsql AS $$
         BEGIN FOR i IN 1..n LOOP PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$",
    );
    cluster.mesh();
    a.exec("INSERT INTO r VALUES (1, 0)");
    cluster.wait_sync(SYNC);
    link(a, "pause", b);
    b.exec("UPDATE r SET v = 2 WHERE id = 1");
    a.exec("UPDATE r SET v = 3 WHERE id = 1");
    caught_up(b);
    assert_eq!(b.query_text("SELECT v FROM r").as_deref(), Some("3"), "a's update is the newer one");
    // Move a's commit timestamps past that update: burn transactions, freeze every database.
    a.exec("CALL burn(70000)");
    a.exec("ALTER DATABASE template0 WITH ALLOW_CONNECTIONS true");
    for db in ["template0", "template1", "postgres", "app"] {
        let mut c = a.connect_to(db);
        c.batch_execute("VACUUM FREEZE").expect("vacuum freeze");
    }
    a.exec("ALTER DATABASE template0 WITH ALLOW_CONNECTIONS false");
    // Nothing of the update left in memory either (trompe's commit time cache).
    a.restart();
    assert_eq!(
        a.query_text("SELECT pg_xact_commit_timestamp(xmin) IS NULL FROM r").as_deref(),
        Some("t"),
        "the row's commit timestamp is gone"
    );
    link(a, "resume", b);
    cluster.wait_sync(SYNC);
    for node in cluster.nodes() {
        assert_eq!(node.query_text("SELECT v FROM r").as_deref(), Some("3"), "on {}", node.name);
    }
}

/// A column added on one node while another keeps inserting ends with the same value on every
/// node for every row, whichever side of the DDL each insert falls on.
#[test]
fn a_column_added_during_inserts_gets_the_same_values_everywhere() {
    let cluster = Cluster::start("add-column-race", 2);
    let (a, b) = (cluster.node(0), cluster.node(1));
    cluster.exec_all("CREATE TABLE d (id int PRIMARY KEY, v text); SELECT trompe.add_table('d')");
    cluster.mesh();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, conninfo) = (stop.clone(), b.conninfo());
        std::thread::spawn(move || {
            let mut client = postgres::Client::connect(&conninfo, postgres::NoTls).expect("connect");
            let mut id = 0;
            while !stop.load(Ordering::SeqCst) {
                id += 1;
                client.execute("INSERT INTO d (id, v) VALUES ($1, 'b')", &[&id]).expect("insert on b");
                std::thread::sleep(Duration::from_millis(5));
            }
            id
        })
    };
    for i in 0..8 {
        std::thread::sleep(Duration::from_millis(150));
        a.exec(&format!("ALTER TABLE d ADD COLUMN extra{i} int DEFAULT {i}"));
    }
    std::thread::sleep(Duration::from_millis(150));
    stop.store(true, Ordering::SeqCst);
    let inserted = writer.join().expect("writer");
    cluster.wait_sync(SYNC);
    assert_eq!(cluster.assert_same("SELECT count(*) FROM d").as_deref(), Some(inserted.to_string().as_str()));
    cluster.assert_same(&checksum("d"));
    let nulls: String = (0..8).map(|i| format!(" + count(*) FILTER (WHERE extra{i} IS NULL)")).collect();
    assert_eq!(cluster.assert_same(&format!("SELECT 0{nulls} FROM d")).as_deref(), Some("0"));
}

/// A column default that gives each node a different value (volatile, or evaluated when the
/// DDL runs) cannot fill existing rows alike: refused up front with a way to do it instead.
#[test]
fn a_default_that_would_differ_between_nodes_is_refused() {
    let cluster = Cluster::start("volatile-default", 2);
    let a = cluster.node(0);
    cluster.exec_all("CREATE TABLE d (id int PRIMARY KEY); SELECT trompe.add_table('d')");
    cluster.mesh();
    a.exec("INSERT INTO d VALUES (1), (2)");
    for ddl in [
        "ALTER TABLE d ADD COLUMN r float8 DEFAULT random()",
        "ALTER TABLE d ADD COLUMN at timestamptz DEFAULT now()",
        "ALTER TABLE d ADD COLUMN n bigserial",
        "ALTER TABLE d ADD COLUMN g bigint GENERATED BY DEFAULT AS IDENTITY",
        "ALTER TABLE d ALTER COLUMN id TYPE bigint USING (id + (random() * 0)::int)",
    ] {
        let (code, message) = expect_error(&mut a.connect(), ddl);
        assert_eq!(code, "0A000", "{ddl}: {message}");
        assert!(message.contains("table public.d"), "{ddl}: {message}");
    }
    // What works instead: the column without a default, then the values as a replicated update.
    a.exec("ALTER TABLE d ADD COLUMN at timestamptz; ALTER TABLE d ALTER COLUMN at SET DEFAULT now(); UPDATE d SET at = now()");
    // A constant default, or one with a stable value, is fine.
    a.exec("ALTER TABLE d ADD COLUMN k int DEFAULT 7, ADD COLUMN s text DEFAULT 'x' || 'y'");
    cluster.wait_sync(SYNC);
    cluster.assert_same(&checksum("d"));
}

/// Changes in flight that name a column or table dropped or renamed on the applying node are
/// applied to what remains, and the stream goes on.
#[test]
fn changes_in_flight_for_dropped_or_renamed_columns_apply_to_what_remains() {
    let cluster = Cluster::start("drop-column-race", 2);
    let (a, b) = (cluster.node(0), cluster.node(1));
    cluster.exec_all(
        "CREATE TABLE t (id int PRIMARY KEY, b int, c int, x int);
         CREATE TABLE gone (id int PRIMARY KEY);
         CREATE TABLE moved (id int PRIMARY KEY, v int);
         SELECT trompe.add_table('t'), trompe.add_table('gone'), trompe.add_table('moved')",
    );
    cluster.mesh();
    a.exec("INSERT INTO t VALUES (1, 1, 1, 1), (2, 2, 2, 2); INSERT INTO moved VALUES (1, 1)");
    cluster.wait_sync(SYNC);
    link(a, "pause", b);
    b.exec(
        "UPDATE t SET b = 50 WHERE id = 1; UPDATE t SET c = 60 WHERE id = 2; UPDATE t SET x = 70 WHERE id = 1;
         INSERT INTO t VALUES (3, 3, 3, 3); INSERT INTO gone VALUES (1); UPDATE moved SET v = 2",
    );
    a.exec(
        "ALTER TABLE t DROP COLUMN b; ALTER TABLE t RENAME COLUMN x TO y; DROP TABLE gone;
         ALTER TABLE moved RENAME TO moved_here",
    );
    caught_up(b);
    link(a, "resume", b);
    cluster.wait_sync(SYNC);
    assert_eq!(
        cluster.assert_same("SELECT string_agg(format('%s:%s:%s', id, c, y), ' ' ORDER BY id) FROM t").as_deref(),
        Some("1:1:70 2:60:2 3:3:3")
    );
    assert_eq!(cluster.assert_same("SELECT v FROM moved_here").as_deref(), Some("2"));
    assert_eq!(a.query_i64("SELECT count(*) FROM trompe.status WHERE last_error IS NOT NULL"), 0);
    // The stream goes on.
    b.exec("INSERT INTO t VALUES (4, 4, 4)");
    cluster.wait_sync(SYNC);
    cluster.assert_same(&checksum("t"));
}

/// Index builds that cannot run inside a transaction replicate without stalling any stream.
#[test]
fn concurrent_index_builds_replicate() {
    let cluster = Cluster::start("concurrent-index", 2);
    let (a, b) = (cluster.node(0), cluster.node(1));
    cluster.exec_all("CREATE SCHEMA s; SELECT trompe.add_schema('s'); CREATE TABLE i (id int PRIMARY KEY, v int)");
    cluster.exec_all("SELECT trompe.add_table('i')");
    cluster.mesh();
    a.exec("CREATE TABLE s.t (id int PRIMARY KEY, v int)");
    cluster.wait_sync(SYNC);
    a.exec("INSERT INTO i SELECT g, g FROM generate_series(1, 100) g; INSERT INTO s.t SELECT g, g FROM generate_series(1, 100) g");
    a.exec("CREATE INDEX CONCURRENTLY i_v ON i (v)");
    a.exec("CREATE UNIQUE INDEX CONCURRENTLY ON s.t (v)");
    a.exec("REINDEX INDEX CONCURRENTLY i_v");
    b.exec("INSERT INTO i VALUES (101, 101)");
    cluster.wait_sync(SYNC);
    let indexes = "SELECT string_agg(indexname || ':' || indexdef, ' ' ORDER BY indexname) FROM pg_indexes WHERE tablename IN ('i', 't')";
    let both = cluster.assert_same(indexes).unwrap_or_default();
    assert!(both.contains("i_v") && both.contains("t_v_idx"), "{both}");
    assert_eq!(cluster.assert_same("SELECT count(*) FROM pg_index WHERE NOT indisvalid").as_deref(), Some("0"));
    a.exec("DROP INDEX CONCURRENTLY i_v");
    a.exec("DROP INDEX CONCURRENTLY s.t_v_idx");
    a.exec("INSERT INTO i VALUES (102, 102)");
    cluster.wait_sync(SYNC);
    assert_eq!(
        cluster.assert_same("SELECT count(*) FROM pg_indexes WHERE indexname IN ('i_v', 't_v_idx')").as_deref(),
        Some("0")
    );
    cluster.assert_same(&checksum("i"));
    for node in cluster.nodes() {
        assert_eq!(
            node.query_i64("SELECT count(*) FROM trompe.status WHERE last_error IS NOT NULL"),
            0,
            "{}",
            node.name
        );
    }
}

/// With one node's clock ahead (within `trompe.max_clock_skew`): a TRUNCATE ranks above every
/// row it removes, also rows from that node, which carry commit times in this node's future.
#[test]
fn a_truncate_ranks_above_rows_from_a_node_whose_clock_runs_ahead() {
    let cluster = Cluster::builder("skew-truncate").nodes(2).clock_offset(1, "+3s").start();
    let (a, b) = (cluster.node(0), cluster.node(1));
    cluster.exec_all("CREATE TABLE t (id int PRIMARY KEY, v text); SELECT trompe.add_table('t')");
    cluster.mesh();
    b.exec("INSERT INTO t VALUES (1, 'from the node ahead')");
    caught_up(a);
    a.exec("TRUNCATE t");
    cluster.wait_sync(SYNC);
    assert_eq!(cluster.assert_same("SELECT count(*) FROM t").as_deref(), Some("0"));
}

/// With one node's clock ahead: a delete from that node, applied while a local transaction
/// still holds a new row of the same key, ends the same on both nodes.
#[test]
fn a_remote_delete_racing_a_local_insert_converges_under_clock_skew() {
    let cluster = Cluster::builder("skew-delete-insert").nodes(2).clock_offset(1, "+3s").start();
    let (a, b) = (cluster.node(0), cluster.node(1));
    cluster.exec_all("CREATE TABLE t (id int PRIMARY KEY, v text); SELECT trompe.add_table('t')");
    cluster.mesh();
    a.exec("INSERT INTO t VALUES (1, 'old'), (2, 'old')");
    cluster.wait_sync(SYNC);
    let mut local = a.connect();
    local.batch_execute("BEGIN; DELETE FROM t WHERE id = 1; INSERT INTO t VALUES (1, 'new on a'); INSERT INTO t VALUES (3, 'new on a')").expect("local");
    b.exec("DELETE FROM t WHERE id = 1; INSERT INTO t VALUES (3, 'b'); DELETE FROM t WHERE id = 3");
    // The delete is being applied on a, waiting for the local transaction.
    let blocked = wait_for(Duration::from_secs(30), || {
        a.query_i64(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'trompe%' AND wait_event_type = 'Lock'",
        ) > 0
    });
    assert!(blocked, "a's worker waits for the local transaction");
    local.batch_execute("COMMIT").expect("commit");
    cluster.wait_sync(SYNC);
    cluster.assert_same(&checksum("t"));
}

/// A transaction that cannot be applied stops its stream visibly: state `error`, what waits
/// behind it counted, a one-line error naming the SQLSTATE and the transaction; fixing the
/// cause resumes it, and `trompe.skip` sets it aside, content kept, for the stream to go on.
#[test]
fn a_stalled_stream_is_visible_and_skip_sets_the_transaction_aside() {
    let cluster = Cluster::start("stall-skip", 2);
    let (a, b) = (cluster.node(0), cluster.node(1));
    cluster.exec_all("CREATE TABLE t (id int PRIMARY KEY, v int); SELECT trompe.add_table('t')");
    b.exec("ALTER TABLE t ADD CONSTRAINT small CHECK (v < 100)");
    cluster.mesh();
    a.exec("INSERT INTO t VALUES (1, 1)");
    cluster.wait_sync(SYNC);
    a.exec("INSERT INTO t VALUES (2, 500), (3, 3)");
    for i in 4..9 {
        a.exec(&format!("INSERT INTO t VALUES ({i}, {i})"));
    }
    let stalled = "SELECT state = 'error' AND behind_changes = 7 AND last_error LIKE '%23514%' FROM trompe.status";
    let shown = wait_for(SYNC, || b.query_text(stalled).as_deref() == Some("t"));
    assert!(
        shown,
        "status shows the stall: {:?}",
        b.query_row("SELECT state, behind_changes, last_error FROM trompe.status")
    );
    let error = b.query_text("SELECT last_error FROM trompe.status").unwrap_or_default();
    assert!(!error.contains('\n'), "one line: {error}");
    assert!(error.contains("small") && error.contains("INSERT") && error.contains("public.t"), "{error}");
    let last_pull = b.query_text("SELECT last_pull FROM trompe.status");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(b.query_text("SELECT last_pull FROM trompe.status"), last_pull, "failed attempts are not pulls");
    assert!(
        b.query_text("SELECT behind_seconds FROM trompe.status").and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0)
            >= 3.0
    );
    // Skipping needs the transaction that fails; anything else is refused.
    let (code, _) = expect_error(&mut b.connect(), "SELECT trompe.skip('n1', 1)");
    assert_eq!(code, "22023");
    b.exec("SELECT trompe.skip('n1')");
    cluster.wait_sync(SYNC);
    assert_eq!(b.query_text("SELECT string_agg(id::text, ',' ORDER BY id) FROM t").as_deref(), Some("1,4,5,6,7,8"));
    assert_eq!(
        b.query_text("SELECT count(*) || ':' || bool_and(changes::text LIKE '%500%') || ':' || bool_and(error LIKE '%23514%') FROM trompe.exceptions")
            .as_deref(),
        Some("1:true:true")
    );
    assert_eq!(
        b.query_text("SELECT state || ':' || coalesce(last_error, '') FROM trompe.status").as_deref(),
        Some("connected:")
    );
}

/// Conflicts name only the rows in conflict: an applied update never evaluates its condition on
/// other rows of the table, whatever plan the statement gets.
#[test]
fn conflicts_name_only_the_rows_in_conflict() {
    let cluster = Cluster::start("spurious-conflicts", 2);
    let (a, b) = (cluster.node(0), cluster.node(1));
    cluster.exec_all("CREATE TABLE t (id int PRIMARY KEY, v int); SELECT trompe.add_table('t')");
    cluster.mesh();
    a.exec("INSERT INTO t SELECT g, 0 FROM generate_series(1, 5) g");
    cluster.wait_sync(SYNC);
    // Statistics that make a sequential scan the cheapest plan for any key.
    cluster.exec_all("ANALYZE t");
    link(a, "pause", b);
    // Concurrent with b's updates of row 1, but on other rows.
    a.exec("UPDATE t SET v = 1 WHERE id > 1");
    for i in 0..12 {
        b.exec(&format!("UPDATE t SET v = {i} WHERE id = 1; DELETE FROM t WHERE id = 99"));
    }
    link(a, "resume", b);
    cluster.wait_sync(SYNC);
    cluster.assert_same(&checksum("t"));
    assert_eq!(
        a.query_text("SELECT coalesce(string_agg(kind || ' ' || key::text, ', '), 'none') FROM trompe.conflicts")
            .as_deref(),
        Some("none")
    );
}

/// Rows applied from a peer keep that peer as their origin after it is removed and another
/// peer is added (a replication origin's number can be reused).
#[test]
fn rows_keep_their_origin_after_their_peer_is_removed() {
    let cluster = Cluster::start("origin-reuse", 3);
    let (a, b, c) = (cluster.node(0), cluster.node(1), cluster.node(2));
    cluster.exec_all("CREATE TABLE t (id int PRIMARY KEY, v text); SELECT trompe.add_table('t')");
    cluster.mesh();
    b.exec("INSERT INTO t VALUES (1, 'base')");
    cluster.wait_sync(SYNC);
    for node in cluster.nodes() {
        for peer in cluster.nodes().iter().filter(|p| p.name != node.name) {
            link(node, "pause", peer);
        }
    }
    a.exec("UPDATE t SET v = 'a' WHERE id = 1");
    b.exec("UPDATE t SET v = 'b' WHERE id = 1");
    // c applies a's update, then forgets a; resuming b makes its worker act on both.
    link(c, "resume", a);
    c.wait_for_value("SELECT v FROM t", "a", SYNC);
    c.exec("SELECT trompe.remove_peer('n1')");
    link(c, "resume", b);
    c.wait_for_value("SELECT v FROM t", "b", SYNC);
    let a_id = a.query_text("SELECT trompe.node_id()::text").unwrap_or_default();
    assert_eq!(
        c.query_text("SELECT local_origin::text FROM trompe.conflicts WHERE kind = 'update_update'").as_deref(),
        Some(a_id.as_str()),
        "the row c held came from a"
    );
}
