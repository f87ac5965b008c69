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
    // The index build replaying on n2 waits for older transactions there, a `wait_sync` among
    // them (README, known limits: poll around such migrations); short queries first.
    n2.wait_for_value("SELECT to_regclass('public.after_index') IS NOT NULL", "t", Duration::from_secs(60));
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
    // An owner's privileges on a table: MAINTAIN (m) exists from PostgreSQL 17 on.
    let owner_all = if n1.query_i64("SELECT current_setting('server_version_num')::int") >= 170000 {
        "arwdDxtm"
    } else {
        "arwdDxt"
    };
    for expected in [
        // add_schema grants trompe_peer_ddl (peers' DDL) on every node.
        "schema app owner app_owner acl {app_owner=UC/app_owner,trompe_peer_ddl=UC/app_owner,app_reader=U/app_owner,app_writer=U*/app_owner} comment the application's schema".to_string(),
        format!("relation app.t acl {{postgres={owner_all}/postgres,app_reader=r/postgres,app_writer=a/postgres}}"),
        "column app.t.v acl {app_writer=w/postgres}".to_string(),
        format!("relation solo acl {{postgres={owner_all}/postgres,app_reader=r/postgres}}"),
        "default acl app_owner in app for S: {app_writer=rU/app_owner}".to_string(),
    ] {
        assert!(same.contains(&expected), "missing `{expected}` in\n{same}");
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

/// A schema file as `pg_dump --schema-only` writes it (settings first, functions before the
/// tables they use, sequences apart from their tables, keys, partitions and indexes attached
/// later, a trigger keeping a tsvector, a materialized view with a unique index, grants).
const KITCHEN_SINK: &str = r#"
SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

CREATE TYPE public.mood AS ENUM ('calm', 'busy', 'angry');
CREATE DOMAIN public.email AS text CONSTRAINT email_check CHECK ((VALUE ~ '@'::text));
CREATE TYPE public.money_pair AS (amount numeric, currency text);

CREATE FUNCTION public.order_total(o_id bigint) RETURNS numeric
    LANGUAGE sql STABLE
    AS $$ SELECT coalesce(sum(qty * price), 0) FROM public.order_lines WHERE order_id = o_id $$;

CREATE FUNCTION public.docs_tsv() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    NEW.tsv := to_tsvector('simple', coalesce(NEW.title, '') || ' ' || coalesce(NEW.body, ''));
    RETURN NEW;
END
$$;

SET default_tablespace = '';
SET default_table_access_method = heap;

CREATE SEQUENCE public.customers_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

CREATE TABLE public.customers (
    id bigint DEFAULT nextval('public.customers_id_seq'::regclass) NOT NULL,
    email public.email NOT NULL,
    mood public.mood DEFAULT 'calm'::public.mood,
    tags text[] DEFAULT '{}'::text[],
    balance public.money_pair
);

CREATE TABLE public.orders (
    id integer NOT NULL,
    customer_id bigint,
    placed_at timestamp with time zone DEFAULT '2024-01-01 00:00:00+00'::timestamp with time zone NOT NULL
);

CREATE SEQUENCE public.orders_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.orders_id_seq OWNED BY public.orders.id;

CREATE TABLE public.order_lines (
    order_id integer NOT NULL,
    line integer NOT NULL,
    qty integer,
    price numeric(10,2)
);

CREATE TABLE public.docs (
    id bigint NOT NULL,
    title text,
    body text,
    tsv tsvector
);

ALTER TABLE public.docs ALTER COLUMN id ADD GENERATED BY DEFAULT AS IDENTITY (
    SEQUENCE NAME public.docs_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

CREATE TABLE public.events (
    id bigint NOT NULL,
    at timestamp with time zone NOT NULL,
    what text
)
PARTITION BY RANGE (at);

CREATE TABLE public.events_2024_01 (
    id bigint NOT NULL,
    at timestamp with time zone NOT NULL,
    what text
);

ALTER TABLE ONLY public.events ATTACH PARTITION public.events_2024_01 FOR VALUES FROM ('2024-01-01 00:00:00+00') TO ('2024-02-01 00:00:00+00');

CREATE VIEW public.order_totals AS
 SELECT o.id,
    public.order_total((o.id)::bigint) AS total
   FROM public.orders o;

CREATE MATERIALIZED VIEW public.customer_counts AS
 SELECT customers.mood,
    count(*) AS n
   FROM public.customers
  GROUP BY customers.mood
  WITH NO DATA;

ALTER TABLE ONLY public.orders ALTER COLUMN id SET DEFAULT nextval('public.orders_id_seq'::regclass);

ALTER TABLE ONLY public.customers
    ADD CONSTRAINT customers_email_key UNIQUE (email);

ALTER TABLE ONLY public.customers
    ADD CONSTRAINT customers_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.docs
    ADD CONSTRAINT docs_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.events
    ADD CONSTRAINT events_pkey PRIMARY KEY (id, at);

ALTER TABLE ONLY public.events_2024_01
    ADD CONSTRAINT events_2024_01_pkey PRIMARY KEY (id, at);

ALTER TABLE ONLY public.order_lines
    ADD CONSTRAINT order_lines_pkey PRIMARY KEY (order_id, line);

ALTER TABLE ONLY public.orders
    ADD CONSTRAINT orders_pkey PRIMARY KEY (id);

CREATE UNIQUE INDEX customer_counts_mood ON public.customer_counts USING btree (mood);

CREATE INDEX docs_tsv_idx ON public.docs USING gin (tsv);

ALTER INDEX public.events_pkey ATTACH PARTITION public.events_2024_01_pkey;

CREATE TRIGGER docs_tsv BEFORE INSERT OR UPDATE ON public.docs FOR EACH ROW EXECUTE FUNCTION public.docs_tsv();

ALTER TABLE ONLY public.order_lines
    ADD CONSTRAINT order_lines_order_id_fkey FOREIGN KEY (order_id) REFERENCES public.orders(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.orders
    ADD CONSTRAINT orders_customer_id_fkey FOREIGN KEY (customer_id) REFERENCES public.customers(id);

GRANT SELECT ON TABLE public.orders TO app_reader;
GRANT SELECT ON TABLE public.order_totals TO app_reader;
"#;

/// What a data dump of it adds: rows with their keys, then `setval` of every sequence.
const KITCHEN_SINK_DATA: &str = r#"
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
INSERT INTO public.customers (id, email, mood, tags, balance)
    SELECT g, 'loaded-' || g || '@x', 'calm', ARRAY['loaded', 'n' || g], ROW(g * 1.5, 'EUR'::text)::public.money_pair FROM generate_series(1, 100) g;
INSERT INTO public.orders (id, customer_id) SELECT g, (g % 100) + 1 FROM generate_series(1, 50) g;
INSERT INTO public.order_lines SELECT o, l, l, 1.25 FROM generate_series(1, 50) o, generate_series(1, 2) l;
INSERT INTO public.docs (id, title, body) SELECT g, 'loaded doc ' || g, 'text ' || g FROM generate_series(1, 20) g;
INSERT INTO public.events SELECT g, '2024-01-05 00:00+00'::timestamptz + g * interval '1 hour', 'loaded' FROM generate_series(1, 30) g;
SELECT pg_catalog.setval('public.customers_id_seq', 100, true);
SELECT pg_catalog.setval('public.docs_id_seq', 20, true);
SELECT pg_catalog.setval('public.orders_id_seq', 50, true);
REFRESH MATERIALIZED VIEW public.customer_counts;
"#;

/// A schema dump loaded with psql on one node of a three-node mesh replicating its schema, a
/// data dump after it, then writes on every node and a partition added on another: every node
/// ends with the same schema (as pg_dump prints it), the same rows, keys that never collided,
/// and trompe.compare finds nothing.
#[test]
fn a_schema_dump_loaded_on_one_node_ends_identical_everywhere() {
    let cluster = Cluster::start("kitchen-sink", 3);
    let (n1, n2, n3) = (cluster.node(0), cluster.node(1), cluster.node(2));
    for (i, node) in cluster.nodes().iter().enumerate() {
        node.exec(&format!(
            "CREATE ROLE app_reader; SELECT trompe.add_schema('public'); SELECT trompe.set_sequence_slot({}, 16)",
            i + 1
        ));
    }
    cluster.mesh();
    n1.psql(KITCHEN_SINK);
    n1.psql(KITCHEN_SINK_DATA);
    synced(&cluster, SYNC);
    for (i, node) in cluster.nodes().iter().enumerate() {
        let tag = &node.name;
        let base = (i as i64 + 1) * 1_000_000;
        node.exec(&format!(
            "INSERT INTO public.customers (email, mood, tags) SELECT '{tag}-' || g || '@x', 'busy', ARRAY['{tag}'] FROM generate_series(1, 20) g;
             INSERT INTO public.orders (customer_id) SELECT id FROM public.customers WHERE email LIKE '{tag}-%';
             INSERT INTO public.order_lines SELECT o.id, l, l, 9.99 FROM public.orders o
               JOIN public.customers c ON c.id = o.customer_id, generate_series(1, 3) l WHERE c.email LIKE '{tag}-%';
             INSERT INTO public.docs (title, body) SELECT '{tag} doc ' || g, 'body' FROM generate_series(1, 10) g;
             INSERT INTO public.events SELECT {base} + g, '2024-01-20 00:00+00', '{tag}' FROM generate_series(1, 10) g;
             UPDATE public.customers SET mood = 'angry', balance = ROW(1::numeric, 'USD'::text)::public.money_pair WHERE email LIKE '{tag}-1%';
             UPDATE public.docs SET body = 'changed on {tag}' WHERE title LIKE '{tag} doc 1%';
             DELETE FROM public.order_lines WHERE line = 3 AND order_id IN
               (SELECT o.id FROM public.orders o JOIN public.customers c ON c.id = o.customer_id WHERE c.email LIKE '{tag}-2%');"
        ));
    }
    n2.exec(
        "CREATE TABLE public.events_2024_02 PARTITION OF public.events
             FOR VALUES FROM ('2024-02-01 00:00+00') TO ('2024-03-01 00:00+00');
         INSERT INTO public.events VALUES (5000000, '2024-02-10 00:00+00', 'february')",
    );
    n3.exec("REFRESH MATERIALIZED VIEW CONCURRENTLY public.customer_counts");
    synced(&cluster, SYNC);
    // pg_dump's \restrict lines carry a random key of each run.
    let schema = |node: &trompe_tests::Node| {
        node.pg_dump(&["--schema-only", "--exclude-schema=trompe"])
            .lines()
            .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let first = schema(n1);
    assert!(first.iter().any(|l| l.contains("CREATE TABLE public.events_2024_02")), "{first:#?}");
    for node in [n2, n3] {
        let other = schema(node);
        let differing: Vec<_> = first.iter().zip(&other).filter(|(a, b)| a != b).take(5).collect();
        assert!(
            other.len() == first.len() && differing.is_empty(),
            "pg_dump --schema-only of {} differs from n1's: {differing:#?}",
            node.name
        );
    }
    for table in [
        "public.customers",
        "public.orders",
        "public.order_lines",
        "public.docs",
        "public.events",
        "public.customer_counts",
    ] {
        cluster.assert_same(&checksum(table));
    }
    assert_eq!(n1.query_i64("SELECT count(*) FROM public.customers"), 160);
    assert_eq!(n1.query_i64("SELECT count(*) FROM public.events"), 61);
    assert_eq!(
        cluster.assert_same("SELECT count(*) FROM trompe.conflicts").as_deref(),
        Some("0"),
        "keys drawn on different nodes never collided"
    );
    for peer in ["n2", "n3"] {
        assert_eq!(
            n1.query_i64(&format!(
                "SELECT count(*) FROM trompe.compare('{peer}') WHERE only_here + only_there + different > 0"
            )),
            0,
            "compare with {peer}"
        );
    }
    assert_eq!(
        n2.query_i64("SELECT count(*) FROM public.docs WHERE tsv @@ to_tsquery('simple', 'changed')"),
        n1.query_i64("SELECT count(*) FROM public.docs WHERE tsv @@ to_tsquery('simple', 'changed')")
    );
}

/// Two schemas swap names (a way to swap in a rebuilt schema), so the name `app.t` leads to
/// another table: changes a peer makes to `app.t` then reach that table here, although this
/// node's worker had applied changes to the old one under that name (no DDL touched either
/// table, only their schemas).
#[test]
fn changes_follow_a_table_name_when_schemas_swap_names() {
    let cluster = Cluster::start("schema-swap", 2);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    for node in cluster.nodes() {
        node.exec("CREATE SCHEMA app; SELECT trompe.add_schema('app'); CREATE SCHEMA fresh; SELECT trompe.add_schema('fresh')");
    }
    cluster.mesh();
    n1.exec("CREATE TABLE app.t (id int PRIMARY KEY, v text); CREATE TABLE fresh.t (id int PRIMARY KEY, v text)");
    synced(&cluster, SYNC);
    // Applied by transactions of their own after the DDL's: n2's worker knows app.t by then.
    for id in [1, 3] {
        n1.exec(&format!("INSERT INTO app.t VALUES ({id}, 'old')"));
        synced(&cluster, SYNC);
    }
    assert_eq!(n2.query_i64("SELECT count(*) FROM app.t"), 2);
    // Done by hand on each node, outside replication (no event trigger runs: nothing of
    // trompe's touches the tables), after n2's worker applied n1's change to app.t.
    for node in cluster.nodes() {
        node.exec(
            "SET session_replication_role = replica;
             ALTER SCHEMA app RENAME TO app_old; ALTER SCHEMA fresh RENAME TO app",
        );
    }
    n1.exec("INSERT INTO app.t VALUES (2, 'new'); INSERT INTO app_old.t VALUES (4, 'old')");
    synced(&cluster, SYNC);
    let rows = "SELECT coalesce((SELECT string_agg(id::text, ',' ORDER BY id) FROM app.t), '-') || ' / '
                    || coalesce((SELECT string_agg(id::text, ',' ORDER BY id) FROM app_old.t), '-')";
    assert_eq!(n2.query_text(rows).as_deref(), Some("2 / 1,3,4"));
    assert_eq!(cluster.assert_same(rows).as_deref(), Some("2 / 1,3,4"));
}

/// A table of a replicated schema that becomes replicable only later brings its rows along:
/// loaded while unlogged and then `SET LOGGED` (the usual fast load, also all in one
/// transaction), or given its primary key after it was filled. A table made with its rows by
/// `CREATE TABLE AS`, which each peer replays, ends with the same rows and no conflict.
#[test]
fn rows_of_a_table_that_becomes_replicable_reach_every_node() {
    let cluster = Cluster::start("schemas-becomes-replicable", 2);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    cluster.exec_all("CREATE SCHEMA s; SELECT trompe.add_schema('s')");
    cluster.mesh();
    n1.exec(
        "CREATE UNLOGGED TABLE s.loaded (id int PRIMARY KEY, note text, dropped int);
         ALTER TABLE s.loaded DROP COLUMN dropped;
         INSERT INTO s.loaded SELECT g, 'bulk ' || g FROM generate_series(1, 5000) g;
         CREATE TABLE s.keyless (id int, note text);
         INSERT INTO s.keyless VALUES (1, 'before the key'), (2, 'also before');
         CREATE TABLE s.made AS SELECT g AS id FROM generate_series(1, 3) g;
         ALTER TABLE s.made ADD PRIMARY KEY (id);",
    );
    n1.exec(
        "BEGIN;
         CREATE UNLOGGED TABLE s.one_go (id int PRIMARY KEY);
         INSERT INTO s.one_go SELECT generate_series(1, 10);
         ALTER TABLE s.one_go SET LOGGED;
         COMMIT",
    );
    n1.exec("ALTER TABLE s.loaded SET LOGGED");
    n1.exec("ALTER TABLE s.keyless ADD PRIMARY KEY (id)");
    n1.exec("INSERT INTO s.loaded VALUES (5001, 'after'); INSERT INTO s.keyless VALUES (3, 'after')");
    synced(&cluster, SYNC);
    for (table, rows) in [("s.loaded", 5001), ("s.keyless", 3), ("s.made", 3), ("s.one_go", 10)] {
        assert_eq!(n2.query_i64(&format!("SELECT count(*) FROM {table}")), rows, "{table} on n2");
        assert_eq!(n1.query_text(&checksum(table)), n2.query_text(&checksum(table)), "{table}");
    }
    assert_eq!(n2.query_i64("SELECT count(*) FROM trompe.conflicts"), 0, "nothing collided");
    // A table taken out with remove_table and added back by later DDL does not send its rows
    // again: the peer changed them meanwhile, and its change stands.
    n1.exec("SELECT trompe.remove_table('s.keyless')");
    n2.exec("UPDATE s.keyless SET note = 'changed on n2 meanwhile' WHERE id = 1");
    n1.exec("CREATE INDEX ON s.loaded (note)");
    assert_eq!(n1.query_i64("SELECT count(*) FROM trompe.tables WHERE relid = 's.keyless'::regclass"), 1);
    n1.exec("INSERT INTO s.loaded VALUES (5002, 'last')");
    synced(&cluster, SYNC);
    assert_eq!(n2.query_i64("SELECT count(*) FROM s.loaded"), 5002);
    assert_eq!(n2.query_text("SELECT note FROM s.keyless WHERE id = 1").as_deref(), Some("changed on n2 meanwhile"));
}

/// A database restored from a dump of a node (`pg_dump` / `pg_restore`, the way to give a new
/// node the same schema) is a node of its own: trompe's capture triggers came with the tables
/// but capture nothing there until `add_table` takes them over, and on a table it does not
/// replicate they may be dropped.
#[test]
fn a_restored_dump_is_a_new_node_whose_tables_replicate_once_added() {
    let cluster = Cluster::builder("schemas-restored-dump").nodes(1).start();
    let n1 = cluster.node(0);
    n1.exec(
        "CREATE TABLE t (id int PRIMARY KEY); CREATE TABLE other (id int PRIMARY KEY);
         SELECT trompe.add_table('t'); SELECT trompe.add_table('other'); INSERT INTO t VALUES (1)",
    );
    n1.exec("CREATE DATABASE restored");
    let dump = trompe_tests::system::scratch_root().join(format!("restored-{}.dump", n1.port));
    let port = n1.port.to_string();
    let common = ["-h", "127.0.0.1", "-p", port.as_str(), "-U", "postgres"];
    let run = |program: &str, args: &[&str]| {
        let out = std::process::Command::new(trompe_tests::system::pg_bin(program))
            .args(common)
            .args(args)
            .output()
            .expect("runs");
        assert!(out.status.success(), "{program}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let file = dump.to_string_lossy().into_owned();
    run("pg_dump", &["-Fc", "-f", &file, "app"]);
    run("pg_restore", &["-d", "restored", &file]);
    let mut c = n1.connect_to("restored");
    let value = |c: &mut postgres::Client, sql: &str| c.query_one(sql, &[]).unwrap().get::<_, i64>(0);
    c.batch_execute("INSERT INTO t VALUES (2); UPDATE t SET id = 3 WHERE id = 1; TRUNCATE other").unwrap();
    assert_eq!(value(&mut c, "SELECT count(*) FROM trompe.tables"), 0, "a new node replicates nothing yet");
    assert_eq!(value(&mut c, "SELECT count(*) FROM trompe.log"), 0, "nothing captured for tables not replicated");
    c.batch_execute("SELECT trompe.add_table('t')").expect("add_table takes the restored triggers over");
    c.batch_execute("INSERT INTO t VALUES (4)").unwrap();
    assert_eq!(value(&mut c, "SELECT count(*) FROM trompe.log"), 1, "captured once added");
    c.batch_execute("DROP TRIGGER trompe_capture ON other; DROP TRIGGER trompe_truncate ON other")
        .expect("triggers of a table not replicated here may go");
    let error = c.batch_execute("DROP TRIGGER trompe_capture ON t").expect_err("a replicated table's may not");
    assert_eq!(error.code().map(|c| c.code()), Some("2BP01"), "{error:?}");
    // A repeatable read transaction that began before add_table committed still captures what
    // it writes after (the triggers fire for it).
    let mut before = n1.connect_to("restored");
    before.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM t").unwrap();
    c.batch_execute("SELECT trompe.add_table('other')").unwrap();
    before.batch_execute("INSERT INTO other VALUES (1); COMMIT").unwrap();
    assert_eq!(value(&mut c, "SELECT count(*) FROM trompe.log"), 2, "captured in repeatable read too");
}

/// `ALTER TABLE ... SET SCHEMA` across the edge of what is replicated cannot be followed by the
/// peers (moved out, they refuse to put it where nothing is replicated; moved in, they do not
/// have the table): it is refused where it is run, with what to do instead, and the streams go
/// on. Between replicated schemas it replicates.
#[test]
fn moving_a_table_across_the_edge_of_replicated_schemas_is_refused_where_it_runs() {
    let cluster = Cluster::start("schemas-set-schema", 2);
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    cluster.exec_all(
        "CREATE SCHEMA o; CREATE SCHEMA o2; SELECT trompe.add_schema('o'); SELECT trompe.add_schema('o2');
         CREATE TABLE o.leaveme (id int PRIMARY KEY); CREATE TABLE public.moveme (id int PRIMARY KEY)",
    );
    cluster.mesh();
    let mut c = n1.connect();
    for (sql, needle) in [
        ("ALTER TABLE o.leaveme SET SCHEMA public", "into schema public, which is not replicated"),
        ("ALTER TABLE public.moveme SET SCHEMA o", "which is not replicated, into replicated schema o"),
    ] {
        let (code, message) = trompe_tests::expect_error(&mut c, sql);
        assert_eq!(code, "0A000", "{sql}: {message}");
        assert!(message.contains(needle), "{sql}: {message}");
    }
    n1.exec("ALTER TABLE o.leaveme SET SCHEMA o2; INSERT INTO o2.leaveme VALUES (1)");
    synced(&cluster, SYNC);
    assert_eq!(n2.query_i64("SELECT count(*) FROM o2.leaveme"), 1);
    assert_eq!(n2.query_i64("SELECT count(*) FROM trompe.status WHERE last_error IS NOT NULL"), 0);
}
