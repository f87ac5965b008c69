//! Replicated schemas as applications have them: DDL replays with the session settings it ran
//! with, the replicated schema's own owner, grants, default privileges and comment replicate,
//! grants on replicated objects replicate, and warnings come once per table and cause.

use std::time::{Duration, Instant};

use trompe_tests::system::{make_postgres_dir, scratch_root};
use trompe_tests::{checksum, wait_for, Cluster};

const SYNC: Duration = Duration::from_secs(120);

/// Waits until every node has applied everything, failing fast (with every peer's error)
/// when a stream is stuck.
fn synced(cluster: &Cluster, timeout: Duration) {
    for node in cluster.nodes() {
        let done = node.query_text(&format!("SELECT trompe.wait_sync(interval '{} seconds')", timeout.as_secs()));
        if done.as_deref() != Some("t") {
            let errors = node.query_text("SELECT string_agg(name || ': ' || last_error, '; ') FROM trompe.status");
            panic!("node {} did not catch up: {errors:?}", node.name);
        }
    }
}

/// Session settings that change what a DDL statement does (function bodies checked or not,
/// how dates, intervals and times in it read, how backslashes in its strings read, where its
/// tables go and with which access method) are the origin's when a peer replays it.
#[test]
fn ddl_replays_with_the_session_settings_it_ran_with() {
    let cluster = Cluster::start("ddl-settings", 2);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    for node in cluster.nodes() {
        let dir = scratch_root().join(format!("tablespace-{}-{}", node.name, node.port));
        make_postgres_dir(&dir);
        node.exec(&format!("CREATE TABLESPACE fast LOCATION '{}'", dir.display()));
        node.exec(
            "CREATE ACCESS METHOD heap2 TYPE TABLE HANDLER heap_tableam_handler;
             SELECT trompe.add_schema('public')",
        );
    }
    cluster.mesh();
    n1.exec(
        "SET check_function_bodies = false;
         CREATE FUNCTION public.count_later() RETURNS bigint LANGUAGE sql AS $$ SELECT count(*) FROM public.later $$;
         CREATE TABLE public.later (id int PRIMARY KEY);
         SET DateStyle = 'German, DMY';
         SET IntervalStyle = 'sql_standard';
         SET TimeZone = 'Asia/Tokyo';
         SET standard_conforming_strings = off;
         SET escape_string_warning = off;
         SET transform_null_equals = on;
         CREATE TABLE public.styled (
             id int PRIMARY KEY,
             day date DEFAULT '01.02.2024' CHECK (day >= '01.01.2000'),
             span interval DEFAULT '-1 2:03:04',
             at timestamptz DEFAULT '2024-03-01 00:00',
             note text DEFAULT 'a\\tb' CHECK (note <> 'x\\y'),
             flag int CHECK (flag = NULL OR flag > 0));
         CREATE TABLE public.ev (id int, at timestamptz, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
         CREATE TABLE public.ev_2024 PARTITION OF public.ev FOR VALUES FROM ('01.01.2024 00:00') TO ('01.01.2025 00:00');
         SET default_tablespace = fast;
         SET default_table_access_method = heap2;
         CREATE TABLE public.placed (id int PRIMARY KEY);
         RESET default_tablespace;
         RESET default_table_access_method;
         RESET ALL;
         INSERT INTO public.styled (id) VALUES (1);
         INSERT INTO public.ev VALUES (1, '2024-06-01 12:00+00');
         INSERT INTO public.later VALUES (1);",
    );
    // The statements of one query string are all scanned before the first runs: the SET above
    // changed how backslashes read only for strings sent after it, as here.
    let mut session = n1.connect();
    session
        .batch_execute("SET standard_conforming_strings = off; SET escape_string_warning = off")
        .expect("settings of the session");
    session
        .batch_execute(
            "CREATE TABLE public.escaped (id int PRIMARY KEY, note text DEFAULT 'c\\td' CHECK (note <> 'x\\y'))",
        )
        .expect("a statement of its own");
    // A statement a peer runs as a command of its own (outside the apply transaction) takes the
    // settings too, and leaves the worker's own behind.
    session.batch_execute("SET default_tablespace = fast").expect("tablespace");
    session.batch_execute("CREATE INDEX CONCURRENTLY escaped_note ON public.escaped (note)").expect("index");
    session
        .batch_execute("RESET default_tablespace; CREATE TABLE public.after_index (id int PRIMARY KEY)")
        .expect("after");
    drop(session);
    synced(&cluster, Duration::from_secs(30));
    // Read back under the same settings on both nodes.
    let definitions = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres';
        SELECT string_agg(d, E'\\n' ORDER BY d) FROM (
            SELECT format('default %s.%s %s', c.relname, a.attname, pg_get_expr(ad.adbin, ad.adrelid)) d
              FROM pg_attrdef ad JOIN pg_class c ON c.oid = ad.adrelid
              JOIN pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum
             WHERE c.relnamespace = 'public'::regnamespace
            UNION ALL
            SELECT format('check %s %s', conname, pg_get_constraintdef(oid)) FROM pg_constraint
             WHERE connamespace = 'public'::regnamespace AND contype = 'c'
            UNION ALL
            SELECT format('bound %s %s', relname, pg_get_expr(relpartbound, oid)) FROM pg_class
             WHERE relnamespace = 'public'::regnamespace AND relispartition
            UNION ALL
            SELECT format('placed %s in %s with %s', c.relname, coalesce(t.spcname, 'default'), am.amname)
              FROM pg_class c LEFT JOIN pg_tablespace t ON t.oid = c.reltablespace
              LEFT JOIN pg_am am ON am.oid = c.relam
             WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'i')) x";
    let mut texts = Vec::new();
    for node in cluster.nodes() {
        let mut c = node.connect();
        let rows = c.simple_query(definitions).expect("definitions");
        let text = rows.iter().find_map(|m| match m {
            postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        });
        texts.push(text.unwrap_or_default());
    }
    assert_eq!(texts[0], texts[1], "the DDL means the same on both nodes");
    for expected in [
        "default styled.day '2024-02-01'::date",
        "default styled.span '-1 days -02:03:04'::interval",
        "default styled.at '2024-02-29 15:00:00+00'::timestamp with time zone",
        "default styled.note 'a\\tb'::text",
        "check styled_note_check CHECK ((note <> 'x\\y'::text))",
        "default escaped.note 'c\td'::text",
        "check escaped_note_check CHECK ((note <> 'xy'::text))",
        "check styled_flag_check CHECK (((flag IS NULL) OR (flag > 0)))",
        "bound ev_2024 FOR VALUES FROM ('2023-12-31 15:00:00+00') TO ('2024-12-31 15:00:00+00')",
        "placed placed in fast with heap2",
        "placed escaped_note in fast with btree",
        "placed after_index in default with heap",
        "placed after_index_pkey in default with btree",
    ] {
        assert!(texts[1].contains(expected), "n2 lacks `{expected}`:\n{}", texts[1]);
    }
    assert_eq!(n2.query_text("SELECT public.count_later()").as_deref(), Some("1"));
    for table in ["public.styled", "public.ev", "public.later"] {
        cluster.assert_same(&checksum(table));
    }
    // The worker's own settings are back once the statement ran: later rows apply as sent.
    n1.exec("INSERT INTO public.styled (id, day, span) VALUES (2, '2030-12-31', '1 day 02:00')");
    synced(&cluster, SYNC);
    cluster.assert_same(&checksum("public.styled"));
    assert_eq!(
        n2.query_text("SET DateStyle = 'ISO'; SELECT day::text || ' ' || span::text FROM public.styled WHERE id = 2")
            .as_deref(),
        Some("2030-12-31 1 day 02:00:00")
    );
}

/// A statement the origin ran under a lock timeout gives up on a peer too when it waits that
/// long for a lock there (a peer's users are not held up behind it), and goes through once
/// the lock is free.
#[test]
fn lock_timeout_travels_with_ddl() {
    let cluster = Cluster::builder("ddl-lock-timeout").nodes(2).setting("trompe.retry_max_delay", "'1s'").start();
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    cluster.exec_all("CREATE TABLE locked (id int PRIMARY KEY); SELECT trompe.add_table('locked')");
    cluster.mesh();
    let mut holder = n2.connect();
    holder.batch_execute("BEGIN; LOCK TABLE locked IN ACCESS SHARE MODE").expect("lock on n2");
    n1.exec("SET lock_timeout = '200ms'; ALTER TABLE locked ADD COLUMN extra int");
    let mut last = None;
    let timed_out = wait_for(Duration::from_secs(30), || {
        last = n2.query_text("SELECT last_error FROM trompe.status WHERE name = 'n1'");
        last.as_deref().is_some_and(|e| e.contains("lock timeout"))
    });
    assert!(timed_out, "n2 gives up waiting for the lock after the origin's lock_timeout; last error {last:?}");
    holder.batch_execute("COMMIT").expect("release");
    synced(&cluster, SYNC);
    assert_eq!(
        n2.query_i64("SELECT count(*) FROM pg_attribute WHERE attrelid = 'locked'::regclass AND attname = 'extra'"),
        1
    );
}

/// What a replicated schema is besides its objects: its owner, its privileges, the default
/// privileges of objects created in it, its comment; and the privileges of the objects in it
/// and of replicated tables elsewhere.
#[test]
fn the_replicated_schema_itself_replicates() {
    let cluster = Cluster::start("schema-itself", 2);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    // Roles are per server: every node has them.
    for node in cluster.nodes() {
        node.exec(
            "CREATE ROLE app_owner; CREATE ROLE app_reader; CREATE ROLE app_writer;
             CREATE SCHEMA app; SELECT trompe.add_schema('app');
             CREATE TABLE solo (id int PRIMARY KEY); SELECT trompe.add_table('solo');
             CREATE TABLE local_only (id int PRIMARY KEY);",
        );
    }
    cluster.mesh();
    n1.exec(
        "ALTER SCHEMA app OWNER TO app_owner;
         GRANT USAGE ON SCHEMA app TO app_reader;
         GRANT CREATE, USAGE ON SCHEMA app TO app_writer WITH GRANT OPTION;
         REVOKE CREATE ON SCHEMA app FROM app_writer CASCADE;
         COMMENT ON SCHEMA app IS 'the application''s schema';
         ALTER DEFAULT PRIVILEGES IN SCHEMA app GRANT SELECT ON TABLES TO app_reader;
         ALTER DEFAULT PRIVILEGES FOR ROLE app_owner IN SCHEMA app GRANT USAGE, SELECT ON SEQUENCES TO app_writer;
         ALTER DEFAULT PRIVILEGES IN SCHEMA app REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
         CREATE TABLE app.t (id serial PRIMARY KEY, v text);
         SET ROLE app_owner;
         CREATE TABLE app.owned (id bigserial PRIMARY KEY);
         RESET ROLE;
         CREATE FUNCTION app.f() RETURNS int LANGUAGE sql AS 'SELECT 1';
         CREATE TYPE app.mood AS ENUM ('calm', 'busy');
         GRANT INSERT, UPDATE (v) ON app.t TO app_writer;
         GRANT SELECT ON ALL SEQUENCES IN SCHEMA app TO app_reader;
         GRANT EXECUTE ON FUNCTION app.f() TO app_reader;
         GRANT USAGE ON TYPE app.mood TO app_writer;
         REVOKE USAGE ON TYPE app.mood FROM PUBLIC;
         GRANT SELECT ON solo TO app_reader;
         GRANT SELECT ON local_only TO app_reader;",
    );
    synced(&cluster, Duration::from_secs(30));
    let fingerprint = "SELECT string_agg(x, E'\\n' ORDER BY x) FROM (
        SELECT format('schema %s owner %s acl %s comment %s', nspname, nspowner::regrole, nspacl,
                      obj_description(oid, 'pg_namespace')) x FROM pg_namespace WHERE nspname = 'app'
        UNION ALL
        SELECT format('default acl %s in %s for %s: %s', defaclrole::regrole, defaclnamespace::regnamespace,
                      defaclobjtype, defaclacl) FROM pg_default_acl
        UNION ALL
        SELECT format('relation %s acl %s', oid::regclass, relacl) FROM pg_class
         WHERE relnamespace = 'app'::regnamespace OR oid = 'solo'::regclass
        UNION ALL
        SELECT format('column %s.%s acl %s', attrelid::regclass, attname, attacl) FROM pg_attribute
         WHERE attrelid = 'app.t'::regclass AND attacl IS NOT NULL
        UNION ALL
        SELECT format('function %s acl %s', oid::regprocedure, proacl) FROM pg_proc WHERE pronamespace = 'app'::regnamespace
        UNION ALL
        SELECT format('type %s acl %s', oid::regtype, typacl) FROM pg_type
         WHERE typnamespace = 'app'::regnamespace AND typtype = 'e') s";
    let same = cluster.assert_same(fingerprint).unwrap_or_default();
    for expected in [
        "schema app owner app_owner acl {app_owner=UC/app_owner,app_reader=U/app_owner,app_writer=U*/app_owner} comment the application's schema",
        "relation app.t acl {postgres=arwdDxt/postgres,app_reader=r/postgres,app_writer=a/postgres}",
        "column app.t.v acl {app_writer=w/postgres}",
        "relation solo acl {postgres=arwdDxt/postgres,app_reader=r/postgres}",
        "default acl app_owner in app for S: {app_writer=rU/app_owner}",
    ] {
        assert!(same.contains(expected), "missing `{expected}` in\n{same}");
    }
    assert_eq!(
        n2.query_text("SELECT relacl::text FROM pg_class WHERE oid = 'local_only'::regclass"),
        None,
        "privileges of tables that are not replicated stay where they were granted"
    );
    // Revoking replicates too, and the schema's owner can be changed back.
    n1.exec(
        "REVOKE ALL ON SCHEMA app FROM app_reader; ALTER SCHEMA app OWNER TO postgres;
         ALTER DEFAULT PRIVILEGES IN SCHEMA app REVOKE SELECT ON TABLES FROM app_reader;
         COMMENT ON SCHEMA app IS NULL",
    );
    synced(&cluster, SYNC);
    cluster.assert_same(fingerprint);
    assert_eq!(
        n2.query_text("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'app'").as_deref(),
        Some("postgres")
    );
    // A renamed schema stays replicated on every node, under its new name.
    n1.exec("ALTER SCHEMA app RENAME TO app2; CREATE TABLE app2.later (id int PRIMARY KEY); INSERT INTO app2.later VALUES (1)");
    synced(&cluster, SYNC);
    assert_eq!(cluster.assert_same("SELECT string_agg(schema_name, ',') FROM trompe.schemas").as_deref(), Some("app2"));
    assert_eq!(n2.query_i64("SELECT count(*) FROM app2.later"), 1);
    assert_eq!(
        cluster.assert_same("SELECT count(*) FROM trompe.tables WHERE relid::text LIKE 'app2.%'").as_deref(),
        Some("3")
    );
}

/// Loading a schema full of tables that get their primary key later warns once per table,
/// not after every statement, and says what happens to their rows.
#[test]
fn warnings_come_once_per_table_and_cause() {
    let cluster = Cluster::start("warnings-once", 1);
    let n1 = cluster.node(0);
    n1.exec("SELECT trompe.add_schema('public')");
    let (mut client, notices) = n1.connect_keeping_notices();
    let mut script = String::from("CREATE TABLE a (id int); CREATE TABLE b (id int); CREATE TABLE c (id int);");
    for i in 0..20 {
        script += &format!("CREATE INDEX ix{i} ON a (id); COMMENT ON TABLE b IS 'comment {i}';");
    }
    script += "ALTER TABLE a ADD PRIMARY KEY (id); CREATE TABLE d (id int PRIMARY KEY);";
    client.batch_execute(&script).expect("load");
    let notices = notices.lock().expect("notices").clone();
    let about = |table: &str| {
        notices.iter().filter(|n| n.contains(&format!("public.{table} ")) && n.contains("primary key")).count()
    };
    for table in ["a", "b", "c"] {
        assert_eq!(about(table), 1, "one warning about {table}: {notices:#?}");
    }
    assert_eq!(about("d"), 0, "{notices:#?}");
    assert!(
        notices.iter().any(|n| n.contains("public.b ") && n.contains("rows are not replicated")),
        "the warning says what happens to the rows: {notices:#?}"
    );
    assert_eq!(n1.query_i64("SELECT count(*) FROM trompe.tables"), 2, "a and d are replicated");
}

/// A stream that cannot apply a change is retried after the delay its log message announces.
#[test]
fn retries_come_when_the_log_says() {
    let cluster = Cluster::builder("retry-message")
        .nodes(2)
        .setting("trompe.retry_min_delay", "'300ms'")
        .setting("trompe.retry_max_delay", "'1200ms'")
        .start();
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    cluster.exec_all("SELECT trompe.add_schema('public')");
    cluster.mesh();
    // n2 has a table of that name already (made behind trompe's back): n1's CREATE TABLE fails
    // there until it is dropped.
    n2.exec("SET session_replication_role = replica; CREATE TABLE clash (id int)");
    n1.exec("CREATE TABLE clash (id int PRIMARY KEY)");
    let start = Instant::now();
    let ok = wait_for(Duration::from_secs(30), || n2.log().matches("cannot apply").count() >= 6);
    assert!(ok, "n2 retried the failing change");
    let elapsed = start.elapsed();
    n2.exec("SET session_replication_role = replica; DROP TABLE clash");
    synced(&cluster, SYNC);
    // Each retry comes no sooner than the delay the previous message announced.
    let log = n2.log();
    let mut previous: Option<(f64, u64)> = None;
    let mut checked = 0;
    for line in log.lines().filter(|l| l.contains("cannot apply") && l.contains("retrying in")) {
        let at = timestamp_seconds(line);
        let delay: u64 = line
            .rsplit("retrying in ")
            .next()
            .and_then(|r| r.split_whitespace().next())
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(|| panic!("no delay in `{line}`"));
        if let Some((then, announced)) = previous {
            let waited_ms = ((at - then) * 1000.0) as u64;
            assert!(waited_ms + 50 >= announced, "announced {announced} ms, retried after {waited_ms} ms:\n{line}");
            checked += 1;
        }
        previous = Some((at, delay));
    }
    assert!(checked >= 4, "{checked} retries checked in {elapsed:?}");
}

/// Seconds since midnight of a server log line's `%m` timestamp (`2026-01-02 10:11:12.345 UTC`).
fn timestamp_seconds(line: &str) -> f64 {
    let time = line.split_whitespace().nth(1).unwrap_or_else(|| panic!("no timestamp in `{line}`"));
    time.split(':').fold(0.0, |acc, part| acc * 60.0 + part.parse::<f64>().unwrap_or(0.0))
}
