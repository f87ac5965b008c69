//! A broken or malicious peer's DDL: forged log entries with statements a peer may not run
//! (COPY, DO, CREATE ROLE, ALTER SYSTEM, untrusted languages, objects that are not replicated,
//! several statements in one entry), role names that do not exist or are superusers here, and
//! escalation through a function body. Each is refused with an error naming the problem, its
//! transaction is set aside with `trompe.skip` into `trompe.exceptions` (never run, never
//! dropped unseen), the server stays up and the other peer keeps replicating. The origin refuses
//! such DDL up front where it can tell.

use std::time::Duration;

use trompe_core::changeset::{chunk, ChangeWriter, OldVersion};
use trompe_core::logformat::Op;
use trompe_tests::{expect_error, wait_for, Cluster, Node};

/// A DDL entry as a peer's log carries it: the statement, its search_path and role, and tag.
fn ddl(statement: &str, role: &str) -> Vec<u8> {
    ddl_in(statement, "public", role)
}

/// [`ddl`] with `search_path`.
fn ddl_in(statement: &str, search_path: &str, role: &str) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut w =
        ChangeWriter::begin(&mut buf, Op::Ddl, 1, b"public", b"forged").cols(std::iter::empty::<&[u8]>()).list(4);
    for part in [statement, search_path, role, "FORGED"] {
        w = w.value(Some(part.as_bytes()));
    }
    w.none().finish(OldVersion::Unknown);
    chunk(1, &buf)
}

/// The checks after each forged entry: n2's stream from n1 stops with an error containing
/// `expected` (SQLSTATE `code`), the server answers, nothing outside replicated tables
/// changed, n3 still replicates to n2 meanwhile (row `probe`), and the transaction is set
/// aside with `trompe.skip`, into `trompe.exceptions`.
fn refused(cluster: &Cluster, expected: &str, code: &str, probe: i32) {
    let (n2, n3) = (cluster.node(1), cluster.node(2));
    let mut last = None;
    let seen = wait_for(Duration::from_secs(30), || {
        last = n2.query_text("SELECT last_error FROM trompe.status WHERE name = 'n1' AND state = 'error'");
        last.as_deref().is_some_and(|e| e.contains(expected))
    });
    assert!(seen, "expected an error containing {expected:?}, last error {last:?}\n{}", n2.log_tail(30));
    let last = last.unwrap_or_default();
    assert!(last.contains(&format!("SQLSTATE {code}")), "{last}");
    assert_eq!(n2.query_text("SELECT 1").as_deref(), Some("1"), "the server is up");
    assert_eq!(n2.query_i64("SELECT count(*) FROM victim"), 1, "nothing outside replicated tables changed");
    assert_eq!(
        n2.query_i64(
            "SELECT count(*) FROM pg_roles WHERE rolname = 'evil' OR (rolname = 'trompe_peer_ddl' AND rolsuper)"
        ),
        0,
        "no role was made or raised"
    );
    n3.exec(&format!("INSERT INTO t VALUES ({probe}, 'from n3')"));
    n2.wait_for_value(&format!("SELECT count(*) FROM t WHERE id = {probe}"), "1", Duration::from_secs(30));
    let parked = n2.query_i64("SELECT count(*) FROM trompe.exceptions");
    n2.exec("SELECT trompe.skip('n1')");
    n2.wait_for_value("SELECT count(*) FROM trompe.exceptions", &(parked + 1).to_string(), Duration::from_secs(30));
    n2.wait_for_value("SELECT state FROM trompe.status WHERE name = 'n1'", "connected", Duration::from_secs(30));
}

fn cluster() -> Cluster {
    // The default trompe.peer_ddl_role (the harness sets a superuser for other tests).
    let cluster = Cluster::builder("hostile-ddl").nodes(3).setting("trompe.peer_ddl_role", "''").start();
    cluster.exec_all(
        "CREATE TABLE t (id int PRIMARY KEY, v text); SELECT trompe.add_table('t');
         CREATE TABLE wake (id bigserial PRIMARY KEY); SELECT trompe.add_table('wake');
         CREATE TABLE victim (id int PRIMARY KEY); INSERT INTO victim VALUES (1);
         CREATE SCHEMA app; SELECT trompe.add_schema('app');",
    );
    cluster.add_peer(1, 0);
    cluster.add_peer(1, 2);
    cluster
}

#[test]
fn ddl_a_peer_may_not_run_is_refused_and_set_aside() {
    let cluster = cluster();
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    n1.exec("INSERT INTO t VALUES (1, 'fine')");
    n2.wait_for_value("SELECT count(*) FROM t", "1", Duration::from_secs(30));

    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "COPY victim TO PROGRAM 'touch /tmp/trompe-pwned'",
            "postgres",
            "COPY is not DDL a peer may run here",
            "42501",
        ),
        ("DO $$BEGIN CREATE ROLE evil SUPERUSER; END$$", "postgres", "DO is not DDL a peer may run here", "42501"),
        ("CREATE ROLE evil SUPERUSER", "postgres", "CREATE ROLE is not DDL a peer may run here", "42501"),
        ("ALTER SYSTEM SET work_mem = '1GB'", "postgres", "ALTER SYSTEM is not DDL a peer may run here", "42501"),
        ("GRANT pg_execute_server_program TO trompe_peer_ddl", "postgres", "GRANT ROLE is not DDL", "42501"),
        (
            "CREATE FUNCTION app.sh(cstring) RETURNS int4 LANGUAGE internal STRICT AS 'int4in'",
            "postgres",
            "functions in language \"internal\" are not trusted",
            "42501",
        ),
        (
            "CREATE FUNCTION app.sh() RETURNS int LANGUAGE c AS 'libc.so.6', 'system'",
            "postgres",
            "functions in language \"c\" are not trusted",
            "42501",
        ),
        ("CREATE TABLE public.outside (id int PRIMARY KEY)", "postgres", "public.outside is not replicated", "42501"),
        ("ALTER TABLE victim ADD COLUMN x int", "postgres", "victim is not replicated", "42501"),
        (
            "CREATE TABLE app.child (id int PRIMARY KEY) INHERITS (victim)",
            "postgres",
            "victim is not replicated",
            "42501",
        ),
        ("DROP TABLE victim", "postgres", "table victim is not replicated", "42501"),
        ("COMMENT ON TABLE victim IS 'mine'", "postgres", "table victim is not replicated", "42501"),
        // Run outside the apply transaction, and checked the same way.
        ("CREATE INDEX CONCURRENTLY victim_x ON victim (id)", "postgres", "victim is not replicated", "42501"),
        (
            "CREATE TABLE app.a (id int PRIMARY KEY); DROP TABLE victim",
            "postgres",
            "must hold exactly one statement, this one holds 2",
            "42501",
        ),
        // What the origin logs as a setval is the only SELECT a peer may send.
        (
            "SELECT pg_catalog.pg_read_file('/etc/passwd')",
            "postgres",
            "SELECT other than pg_catalog.setval of a sequence is not DDL",
            "42501",
        ),
        (
            "SELECT pg_catalog.setval((SELECT 'victim_seq')::regclass, 5)",
            "postgres",
            "SELECT other than pg_catalog.setval of a sequence is not DDL",
            "42501",
        ),
        (
            "SELECT pg_catalog.setval('public.victim_seq'::regclass, 5, true)",
            "postgres",
            "public.victim_seq is not replicated",
            "42501",
        ),
        // The schemas themselves: only replicated ones.
        ("GRANT CREATE ON SCHEMA public TO PUBLIC", "postgres", "schema public is not replicated", "42501"),
        (
            "GRANT SELECT ON ALL TABLES IN SCHEMA public TO PUBLIC",
            "postgres",
            "schema public is not replicated",
            "42501",
        ),
        (
            "ALTER DEFAULT PRIVILEGES GRANT ALL ON TABLES TO PUBLIC",
            "postgres",
            "ALTER DEFAULT PRIVILEGES is not DDL",
            "42501",
        ),
        ("ALTER SCHEMA public OWNER TO trompe_peer_ddl", "postgres", "schema public is not replicated", "42501"),
        ("ALTER SCHEMA public RENAME TO mine", "postgres", "schema public is not replicated", "42501"),
        ("ALTER TABLE app.moved SET SCHEMA public", "postgres", "schema public is not replicated", "42501"),
        ("ALTER ROLE trompe_peer_ddl SUPERUSER", "postgres", "ALTER ROLE is not DDL", "42501"),
        ("CREATE EXTENSION dblink", "postgres", "CREATE EXTENSION is not DDL", "42501"),
        (
            "CREATE CONSTRAINT TRIGGER late AFTER INSERT ON t DEFERRABLE INITIALLY DEFERRED
             FOR EACH ROW EXECUTE FUNCTION suppress_redundant_updates_trigger()",
            "postgres",
            "CREATE CONSTRAINT TRIGGER ... INITIALLY DEFERRED is not DDL",
            "42501",
        ),
        (
            "CREATE TABLE app.b (id int PRIMARY KEY) /* ; */; COPY victim TO PROGRAM 'touch /tmp/trompe-pwned'",
            "postgres",
            "must hold exactly one statement, this one holds 2",
            "42501",
        ),
        // A role that does not exist here, and a superuser: the DDL runs as trompe_peer_ddl,
        // which does not own t (the superuser here does).
        ("ALTER TABLE t ADD COLUMN w int", "no_such_role", "must be owner of table t", "42501"),
        ("ALTER TABLE t ADD COLUMN w int", "postgres", "must be owner of table t", "42501"),
    ];
    // Only on n2 (n2 pulls from the others, they do not pull from it).
    n2.exec("CREATE SEQUENCE victim_seq; CREATE TABLE app.moved (id int PRIMARY KEY)");
    for (i, (statement, role, expected, code)) in cases.iter().enumerate() {
        n1.serve_forged(&ddl(statement, role));
        refused(&cluster, expected, code, 100 + i as i32);
    }
    // Names resolve as they will when the statement runs: "$user" is the role it runs as.
    n2.exec(
        "CREATE ROLE sneaky; CREATE SCHEMA sneaky AUTHORIZATION sneaky; CREATE TABLE sneaky.t (id int PRIMARY KEY)",
    );
    n1.serve_forged(&ddl_in("DROP TABLE t", "\"$user\", public", "sneaky"));
    refused(&cluster, "is not replicated on this node", "42501", 300);
    assert_eq!(n2.query_text("SELECT to_regclass('sneaky.t')::text").as_deref(), Some("sneaky.t"));
    assert_eq!(n2.query_i64("SELECT count(*) FROM pg_class WHERE relname IN ('outside', 'a', 'victim_x', 'child')"), 0);
    assert_eq!(n2.query_i64("SELECT count(*) FROM pg_attribute WHERE attrelid = 't'::regclass AND attname = 'w'"), 0);
    assert_eq!(n2.query_i64("SELECT count(*) FROM pg_proc WHERE proname = 'sh'"), 0);
    assert_eq!(n2.query_i64("SELECT last_value FROM victim_seq"), 1);
    assert_eq!(
        n2.query_text("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'public'").as_deref(),
        Some("pg_database_owner")
    );
    assert_eq!(n2.query_i64("SELECT count(*) FROM pg_default_acl"), 0);
    assert_eq!(n2.query_text("SELECT to_regclass('app.moved')::text").as_deref(), Some("app.moved"));
    assert!(!std::path::Path::new("/tmp/trompe-pwned").exists());
    // Each is kept with its statement, to be applied by hand if wanted.
    assert_eq!(
        n2.query_i64("SELECT count(*) FROM trompe.exceptions WHERE changes::text LIKE '%DROP TABLE victim%'"),
        2,
        "{:?}",
        n2.query_text("SELECT string_agg(changes::text, ' | ') FROM trompe.exceptions")
    );

    // Allowed DDL from a superuser origin runs as trompe_peer_ddl, which owns what it creates.
    n1.serve_forged(&ddl("CREATE TABLE app.fine (id int PRIMARY KEY)", "postgres"));
    n2.wait_for_value(
        "SELECT r.rolname FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner WHERE c.oid = to_regclass('app.fine')",
        "trompe_peer_ddl",
        Duration::from_secs(30),
    );
    assert_eq!(n2.query_i64("SELECT count(*) FROM trompe.tables WHERE relid = 'app.fine'::regclass"), 1);

    // `;` inside a string or a comment does not split a statement: it is one, and runs.
    n1.serve_forged(&ddl(
        "CREATE TABLE app.semi (id int PRIMARY KEY, note text DEFAULT 'a; DROP TABLE victim; --') -- ; DROP TABLE t",
        "postgres",
    ));
    n2.wait_for_value("SELECT to_regclass('app.semi') IS NOT NULL", "t", Duration::from_secs(30));
    assert_eq!(n2.query_i64("SELECT count(*) FROM victim"), 1);

    // A peer names the role: one with more than ordinary rights here is not taken.
    n2.exec(
        "CREATE ROLE dba LOGIN IN ROLE pg_execute_server_program; GRANT USAGE, CREATE ON SCHEMA app TO dba;
         CREATE ROLE helper LOGIN; GRANT USAGE, CREATE ON SCHEMA app TO helper;
         CREATE ROLE boss SUPERUSER NOLOGIN;
         CREATE ROLE sidekick LOGIN NOINHERIT IN ROLE boss; GRANT USAGE, CREATE ON SCHEMA app TO sidekick;
         CREATE ROLE reader LOGIN IN ROLE pg_read_all_data; GRANT USAGE, CREATE ON SCHEMA app TO reader",
    );
    for (table, role, owner) in [
        ("by_dba", "dba", "trompe_peer_ddl"),
        // It could SET ROLE boss in a function its DDL runs.
        ("by_sidekick", "sidekick", "trompe_peer_ddl"),
        // Its DDL could copy any table into a replicated one.
        ("by_reader", "reader", "trompe_peer_ddl"),
        ("by_admin", "trompe_admin", "trompe_peer_ddl"),
        ("by_helper", "helper", "helper"),
    ] {
        n1.serve_forged(&ddl(&format!("CREATE TABLE app.{table} (id int PRIMARY KEY)"), role));
        n2.wait_for_value(
            &format!("SELECT r.rolname FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner WHERE c.oid = to_regclass('app.{table}')"),
            owner,
            Duration::from_secs(30),
        );
    }

    // After all that, replication from n1 still works.
    n1.exec("INSERT INTO t VALUES (2, 'still fine')");
    n2.wait_for_value("SELECT count(*) FROM t WHERE id = 2", "1", Duration::from_secs(30));
}

#[test]
fn a_function_body_gives_a_peer_no_privilege() {
    let cluster = cluster();
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    // A SECURITY DEFINER function doing what only a superuser may: allowed DDL (plpgsql is
    // trusted), created by trompe_peer_ddl, so it runs with no more rights than that role.
    n1.serve_forged(&ddl(
        "CREATE FUNCTION app.boom() RETURNS int LANGUAGE plpgsql SECURITY DEFINER AS $$
             BEGIN
                 ALTER ROLE trompe_peer_ddl SUPERUSER;
                 COPY (SELECT 1) TO PROGRAM 'touch /tmp/trompe-pwned';
                 RETURN 1;
             END $$",
        "postgres",
    ));
    n2.wait_for_value(
        "SELECT r.rolname || ' ' || r.rolsuper FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner
          WHERE p.proname = 'boom'",
        "trompe_peer_ddl false",
        Duration::from_secs(30),
    );
    // DDL that runs the function while it is applied.
    n1.serve_forged(&ddl("CREATE TABLE app.x AS SELECT app.boom() AS id", "postgres"));
    refused(&cluster, "to alter", "42501", 200);
    assert_eq!(n2.query_i64("SELECT count(*) FROM pg_class WHERE relname = 'x'"), 0);
    // Called by a plain user, it has the rights of its owner, no more.
    n2.exec("CREATE ROLE plain LOGIN; GRANT USAGE ON SCHEMA app TO plain");
    let mut plain = postgres::Client::connect(&n2.conninfo().replace("user=postgres", "user=plain"), postgres::NoTls)
        .expect("plain connects");
    let (code, message) = expect_error(&mut plain, "SELECT app.boom()");
    assert_eq!(code, "42501", "{message}");
    assert!(!std::path::Path::new("/tmp/trompe-pwned").exists());
}

#[test]
fn the_origin_refuses_ddl_its_peers_would_refuse() {
    let cluster = Cluster::builder("origin-ddl").nodes(2).setting("trompe.peer_ddl_role", "''").start();
    let n1 = cluster.node(0);
    n1.exec("CREATE SCHEMA app; SELECT trompe.add_schema('app')");
    let mut c = n1.connect();
    for (sql, needle) in [
        (
            "CREATE FUNCTION app.f(cstring) RETURNS int4 LANGUAGE internal STRICT AS 'int4in'",
            "functions in language \"internal\" are not trusted: a peer may create functions only in trusted languages: peers would refuse to run it",
        ),
        ("CREATE COLLATION app.c (locale = 'C')", "CREATE COLLATION is not DDL a peer may run here"),
        ("CREATE AGGREGATE app.s(int) (sfunc = int4pl, stype = int)", "CREATE AGGREGATE is not DDL a peer may run here"),
    ] {
        let (code, message) = expect_error(&mut c, sql);
        assert_eq!(code, "0A000", "{sql}: {message}");
        assert!(message.contains(needle), "{sql}: {message}");
    }
    assert_eq!(n1.query_i64("SELECT count(*) FROM trompe.log"), 0, "nothing was logged");
    // Checked as it was scanned: the whole query string before the SET in it ran (a backslash
    // is no escape then), as peers parse it.
    n1.exec("SET standard_conforming_strings = off; CREATE TABLE app.bs (id int PRIMARY KEY, v text DEFAULT 'a\\')");
    assert_eq!(
        n1.query_text("SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef WHERE adrelid = 'app.bs'::regclass")
            .as_deref(),
        Some("'a\\'::text")
    );
    // Outside replicated schemas, nothing is captured and nothing is refused.
    n1.exec("CREATE FUNCTION public.f(cstring) RETURNS int4 LANGUAGE internal STRICT AS 'int4in'");
}

/// A client of `node` logged in as `user`.
fn connect_as(node: &Node, user: &str) -> postgres::Client {
    postgres::Client::connect(&node.conninfo().replace("user=postgres", &format!("user={user}")), postgres::NoTls)
        .unwrap_or_else(|e| panic!("{user} connects: {e}"))
}

#[test]
fn ddl_runs_as_its_origins_role_when_that_is_no_superuser_here() {
    let cluster = Cluster::builder("ddl-roles").nodes(2).setting("trompe.peer_ddl_role", "''").start();
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    cluster.exec_all(
        "CREATE ROLE appowner LOGIN; CREATE ROLE mallory LOGIN;
         CREATE SCHEMA app AUTHORIZATION appowner; SELECT trompe.add_schema('app');",
    );
    cluster.mesh();
    connect_as(n1, "appowner")
        .batch_execute("CREATE TABLE app.items (id int PRIMARY KEY); INSERT INTO app.items VALUES (1)")
        .unwrap();
    n2.wait_for_value(
        "SELECT r.rolname FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner WHERE c.oid = to_regclass('app.items')",
        "appowner",
        Duration::from_secs(30),
    );
    // The owner alters it on the other node; it replicates back, run as the owner there too.
    connect_as(n2, "appowner")
        .batch_execute("ALTER TABLE app.items ADD COLUMN v text; INSERT INTO app.items VALUES (2, 'x')")
        .unwrap();
    n1.wait_for_value("SELECT count(*) FROM app.items", "2", Duration::from_secs(30));
    assert_eq!(n1.query_text("SELECT v FROM app.items WHERE id = 2").as_deref(), Some("x"));
    // Another plain user can change neither its own node's table nor, so, any peer's.
    let (code, message) = expect_error(&mut connect_as(n1, "mallory"), "ALTER TABLE app.items ADD COLUMN w int");
    assert_eq!(code, "42501", "{message}");
    // A forged entry naming the owner's role runs as the owner: it can do what the owner can,
    // here drop its table, and nothing the owner cannot (another test: `victim`).
    n1.exec("CREATE TABLE wake (id bigserial PRIMARY KEY)");
    n2.exec("CREATE TABLE wake (id bigserial PRIMARY KEY)");
    cluster.exec_all("SELECT trompe.add_table('wake')");
    n1.serve_forged(&ddl("DROP TABLE app.items", "appowner"));
    n2.wait_for_value("SELECT count(*) FROM pg_class WHERE relname = 'items'", "0", Duration::from_secs(30));
}

/// What schema `app` holds, in one line: relations, types, functions, comments, policies,
/// triggers and constraints, each with its owner where it has one.
const APP_CATALOG: &str = "SELECT concat_ws(' | ',
    (SELECT string_agg(c.relname || ':' || c.relkind::text || ':' || c.relowner::regrole::text, ',' ORDER BY c.relname)
       FROM pg_class c WHERE c.relnamespace = 'app'::regnamespace),
    (SELECT string_agg(t.typname || ':' || t.typowner::regrole::text, ',' ORDER BY t.typname)
       FROM pg_type t WHERE t.typnamespace = 'app'::regnamespace),
    (SELECT string_agg(p.proname || ':' || p.proowner::regrole::text, ',' ORDER BY p.proname)
       FROM pg_proc p WHERE p.pronamespace = 'app'::regnamespace),
    (SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder) FROM pg_enum e),
    (SELECT string_agg(d.description, ',' ORDER BY d.description) FROM pg_description d
       WHERE d.description LIKE 'app %'),
    (SELECT string_agg(po.polname, ',' ORDER BY po.polname) FROM pg_policy po),
    (SELECT string_agg(tg.tgname, ',' ORDER BY tg.tgname) FROM pg_trigger tg
       JOIN pg_class c ON c.oid = tg.tgrelid WHERE c.relnamespace = 'app'::regnamespace AND NOT tg.tgisinternal),
    (SELECT string_agg(x.stxname || ':' || coalesce(x.stxstattarget::int, -1), ',' ORDER BY x.stxname) FROM pg_statistic_ext x
       WHERE x.stxnamespace = 'app'::regnamespace),
    (SELECT string_agg(co.conname, ',' ORDER BY co.conname) FROM pg_constraint co
       WHERE co.connamespace = 'app'::regnamespace),
    (SELECT string_agg(a.attname, ',' ORDER BY a.attname) FROM pg_attribute a
       WHERE a.attrelid = to_regclass('app.items') AND a.attnum > 0 AND NOT a.attisdropped))";

#[test]
fn allowed_ddl_of_every_kind_replicates_as_its_owner() {
    let cluster = Cluster::builder("ddl-kinds").nodes(2).setting("trompe.peer_ddl_role", "''").start();
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    cluster.exec_all(
        "CREATE ROLE appowner LOGIN; CREATE SCHEMA app AUTHORIZATION appowner; SELECT trompe.add_schema('app');",
    );
    cluster.mesh();
    let mut owner = connect_as(n1, "appowner");
    for statement in [
        "CREATE TABLE app.items (id int PRIMARY KEY, v text)",
        "CREATE INDEX items_v ON app.items (v)",
        "CREATE SEQUENCE app.s",
        "ALTER SEQUENCE app.s INCREMENT BY 2",
        "CREATE VIEW app.vw AS SELECT id FROM app.items",
        "CREATE MATERIALIZED VIEW app.mv AS SELECT id FROM app.items",
        "REFRESH MATERIALIZED VIEW app.mv",
        "CREATE TABLE app.copy AS SELECT * FROM app.items",
        "ALTER TABLE app.copy ADD PRIMARY KEY (id)",
        "CREATE TYPE app.pair AS (a int, b int)",
        "ALTER TYPE app.pair ADD ATTRIBUTE c int",
        "CREATE TYPE app.mood AS ENUM ('a', 'b')",
        "ALTER TYPE app.mood ADD VALUE 'c'",
        "CREATE TYPE app.span AS RANGE (subtype = int4)",
        "CREATE DOMAIN app.pos AS int CONSTRAINT pos_check CHECK (VALUE > 0)",
        "ALTER DOMAIN app.pos RENAME CONSTRAINT pos_check TO positive",
        "ALTER DOMAIN app.pos SET DEFAULT 1",
        "CREATE FUNCTION app.f() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$",
        "CREATE FUNCTION app.one() RETURNS int LANGUAGE sql IMMUTABLE RETURN 1",
        "CREATE PROCEDURE app.nothing() LANGUAGE sql AS $$SELECT 1$$",
        "CREATE TRIGGER tr BEFORE INSERT ON app.items FOR EACH ROW EXECUTE FUNCTION app.f()",
        "ALTER TABLE app.items ENABLE ALWAYS TRIGGER tr",
        "ALTER TABLE app.items ENABLE ROW LEVEL SECURITY",
        "CREATE POLICY p ON app.items USING (true)",
        "ALTER POLICY p ON app.items RENAME TO p2",
        "CREATE RULE r AS ON UPDATE TO app.vw DO INSTEAD NOTHING",
        "COMMENT ON TABLE app.items IS 'app items'",
        "COMMENT ON COLUMN app.items.v IS 'app v'",
        "COMMENT ON FUNCTION app.one() IS 'app one'",
        "COMMENT ON TYPE app.mood IS 'app mood'",
        "COMMENT ON INDEX app.items_v IS 'app index'",
        "COMMENT ON TRIGGER tr ON app.items IS 'app trigger'",
        "ALTER FUNCTION app.one() RENAME TO uno",
        "ALTER FUNCTION app.uno() STABLE",
        "ALTER TYPE app.mood RENAME TO feeling",
        "ALTER TYPE app.feeling OWNER TO appowner",
        "GRANT SELECT ON app.items TO PUBLIC",
        "REVOKE SELECT ON app.items FROM PUBLIC",
        "GRANT EXECUTE ON FUNCTION app.uno() TO PUBLIC",
        "ALTER TABLE app.items RENAME COLUMN v TO w",
        "ALTER INDEX app.items_v RENAME TO items_w",
        "ALTER TABLE app.items ADD COLUMN n app.pos",
        "REINDEX INDEX app.items_w",
        "CREATE STATISTICS app.st ON id, w FROM app.items",
        "ALTER STATISTICS app.st SET STATISTICS 10",
        "COMMENT ON STATISTICS app.st IS 'app statistics'",
        "DROP STATISTICS app.st",
        "CREATE STATISTICS app.kept ON id, w FROM app.items",
        "CREATE INDEX CONCURRENTLY items_n ON app.items (n)",
        "DROP INDEX CONCURRENTLY app.items_n",
        "DROP TRIGGER tr ON app.items",
        "DROP POLICY p2 ON app.items",
        "DROP RULE r ON app.vw",
        "DROP VIEW app.vw",
        "DROP MATERIALIZED VIEW app.mv",
        "DROP PROCEDURE app.nothing()",
        "DROP TYPE app.pair",
        "DROP SEQUENCE app.s",
        "CREATE TABLE app.done (id int PRIMARY KEY)",
    ] {
        owner.batch_execute(statement).unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
    n2.wait_for_value("SELECT to_regclass('app.done') IS NOT NULL", "t", Duration::from_secs(60));
    assert_eq!(
        n2.query_text("SELECT coalesce(last_error, 'none') FROM trompe.status WHERE name = 'n1'").as_deref(),
        Some("none")
    );
    let here = n1.query_text(APP_CATALOG);
    assert_eq!(n2.query_text(APP_CATALOG), here, "schema app is the same on both nodes");
    assert!(
        here.as_deref()
            .is_some_and(|h| h.contains("items:r:appowner") && h.contains("feeling:appowner") && h.contains("kept:")),
        "{here:?}"
    );
}

/// A peer's allowed DDL attaches a function to a replicated table (a CHECK constraint, a trigger
/// enabled ALWAYS, so that it fires in replica mode) whose body does what only a superuser may;
/// the peer's rows then make this node's worker call it while applying them. It runs with the
/// rights of the table's owner here (trompe_peer_ddl), not the worker's: refused, and the
/// stream stops until the transaction is skipped.
#[test]
fn functions_a_peer_attaches_to_tables_gain_no_privilege_when_its_rows_apply() {
    let cluster = cluster();
    let (n1, n2) = (cluster.node(0), cluster.node(1));
    // On n1 (the attacker's own node) it runs as n1's superuser; what matters is n2.
    n1.exec(
        "CREATE FUNCTION app.up() RETURNS bool LANGUAGE plpgsql AS $$
         BEGIN
             ALTER ROLE trompe_peer_ddl NOSUPERUSER;
             ALTER ROLE trompe_peer_ddl SUPERUSER;
             RETURN true;
         END $$;
         CREATE FUNCTION app.up_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM app.up();
             RETURN NEW;
         END $$;
         CREATE TABLE app.trap (id int PRIMARY KEY, CHECK (app.up()));
         CREATE TABLE app.trap2 (id int PRIMARY KEY, v int);
         INSERT INTO app.trap2 VALUES (1, 0);
         CREATE TRIGGER up BEFORE UPDATE ON app.trap2 FOR EACH ROW EXECUTE FUNCTION app.up_trigger();
         ALTER TABLE app.trap2 ENABLE ALWAYS TRIGGER up;
         CREATE TABLE app.trap3 (id int PRIMARY KEY);
         INSERT INTO app.trap3 VALUES (1);
         CREATE TRIGGER up BEFORE TRUNCATE ON app.trap3 FOR EACH STATEMENT EXECUTE FUNCTION app.up_trigger();
         ALTER TABLE app.trap3 ENABLE ALWAYS TRIGGER up;",
    );
    n2.wait_for_value(
        "SELECT tgenabled FROM pg_trigger WHERE tgname = 'up' AND tgrelid = to_regclass('app.trap3')",
        "A",
        Duration::from_secs(30),
    );
    n1.exec("INSERT INTO app.trap VALUES (1)");
    refused(&cluster, "alter", "42501", 500);
    n1.exec("UPDATE app.trap2 SET v = 1");
    refused(&cluster, "alter", "42501", 501);
    n1.exec("TRUNCATE app.trap3");
    refused(&cluster, "alter", "42501", 502);
    assert_eq!(n2.query_i64("SELECT count(*) FROM app.trap"), 0);
    assert_eq!(n2.query_i64("SELECT v FROM app.trap2"), 0);
    assert_eq!(n2.query_i64("SELECT count(*) FROM app.trap3"), 1);
    // Rows of tables whose functions stay within their owner's rights apply as before, and a
    // truncation too.
    n1.exec("CREATE TABLE app.fine (id int PRIMARY KEY CHECK (id > 0)); INSERT INTO app.fine VALUES (1), (2)");
    n2.wait_for_value("SELECT to_regclass('app.fine') IS NOT NULL", "t", Duration::from_secs(30));
    n2.wait_for_value("SELECT count(*) FROM app.fine", "2", Duration::from_secs(30));
    n1.exec("UPDATE app.fine SET id = 3 WHERE id = 2; DELETE FROM app.fine WHERE id = 1");
    n2.wait_for_value("SELECT string_agg(id::text, ',') FROM app.fine", "3", Duration::from_secs(30));
    n1.exec("TRUNCATE app.fine");
    n2.wait_for_value("SELECT count(*) FROM app.fine", "0", Duration::from_secs(30));
    // A TRUNCATE of tables with different owners here (n2's superuser owns one) runs no
    // trigger with another's rights: each table is emptied as its own owner.
    n1.exec(
        "CREATE TABLE app.trap4 (id int PRIMARY KEY);
         INSERT INTO app.trap4 VALUES (1);
         CREATE TRIGGER up BEFORE TRUNCATE ON app.trap4 FOR EACH STATEMENT EXECUTE FUNCTION app.up_trigger();
         ALTER TABLE app.trap4 ENABLE ALWAYS TRIGGER up;
         CREATE TABLE app.mine (id int PRIMARY KEY);
         INSERT INTO app.mine VALUES (1);",
    );
    n2.wait_for_value("SELECT to_regclass('app.mine') IS NOT NULL", "t", Duration::from_secs(30));
    n2.wait_for_value("SELECT count(*) FROM app.mine", "1", Duration::from_secs(30));
    n2.exec("ALTER TABLE app.mine OWNER TO postgres");
    n1.exec("TRUNCATE app.trap4, app.mine");
    n2.wait_for_value("SELECT count(*) FROM app.mine", "0", Duration::from_secs(30));
    assert_eq!(n2.query_i64("SELECT count(*) FROM app.trap4"), 0);
    assert_eq!(
        n2.query_i64("SELECT count(*) FROM pg_roles WHERE rolname = 'trompe_peer_ddl' AND rolsuper"),
        0,
        "no trigger ran as a superuser"
    );
    assert_eq!(n2.query_text("SELECT last_error FROM trompe.status WHERE name = 'n1'"), None);
}
