//! In-server unit tests (`cargo pgrx test`): each runs inside one transaction of a real server
//! that is rolled back afterwards, so they cover what one session can see: capture, the log,
//! table registration and DDL checks. Replication itself is tested with real nodes in `tests/`.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn run(sql: &str) {
        Spi::run(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    fn one<T: pgrx::FromDatum + pgrx::IntoDatum>(sql: &str) -> Option<T> {
        Spi::get_one::<T>(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// op, cols, vals, oldkey of one log entry.
    type LogRow = (String, Vec<Option<String>>, Option<Vec<Option<String>>>, Option<Vec<Option<String>>>);

    fn log_count() -> i64 {
        one::<i64>("SELECT count(*) FROM trompe.log_changes()").unwrap_or(0)
    }

    /// A schema script from a peer's dump runs as written, but its settings are put back
    /// afterwards, and internal column options (`pg_attver`, which a newer pg_dump dumps from
    /// 15.20) are left out of its statements.
    #[pg_test]
    fn a_schema_script_keeps_no_settings_and_leaves_out_internal_column_options() {
        let settings = "SELECT current_setting('work_mem') || ' ' || current_setting('search_path')";
        let before = one::<String>(settings);
        crate::join::script::run(
            "SET work_mem = '77MB';
             SELECT pg_catalog.set_config('search_path', '', false);
             CREATE TABLE public.dumped (a int, b int, c int);
             ALTER TABLE ONLY public.dumped ALTER COLUMN a SET (pg_attver=1);
             ALTER TABLE ONLY public.dumped ALTER COLUMN b SET (pg_attver=2, n_distinct=-1);
             ALTER TABLE ONLY public.dumped ALTER COLUMN c SET STATISTICS 50, ALTER COLUMN c SET (pg_attver=3);",
        )
        .unwrap();
        assert_eq!(one::<String>(settings), before, "the script's settings are put back");
        // 15.20 keeps a `pg_attver` of its own in every column's options: only the script's
        // values (1, 2, 3) must be gone.
        let options = "SELECT string_agg(attname || ':' ||
                                         array_to_string(ARRAY(SELECT o FROM unnest(attoptions) o
                                                                WHERE o NOT LIKE 'pg_attver=%'
                                                                   OR o IN ('pg_attver=1', 'pg_attver=2', 'pg_attver=3')), ',')
                                         || ':' || coalesce(nullif(attstattarget, -1), 0), ' ' ORDER BY attnum)
                         FROM pg_attribute WHERE attrelid = 'public.dumped'::regclass AND attnum > 0";
        assert_eq!(one::<String>(options).as_deref(), Some("a::0 b:n_distinct=-1:0 c::50"));
    }

    #[pg_test]
    fn node_id_is_a_stable_random_uuid() {
        let a = one::<pgrx::Uuid>("SELECT trompe.node_id()").expect("node id");
        let b = one::<pgrx::Uuid>("SELECT trompe.node_id()").expect("node id");
        assert_eq!(a, b);
        assert_eq!(one::<i32>("SELECT get_byte(uuid_send(trompe.node_id()), 6) >> 4"), Some(4), "a version-4 UUID");
    }

    #[pg_test(error = "table public.nopk has no primary key")]
    fn add_table_refuses_a_table_without_primary_key() {
        run("CREATE TABLE nopk (a int)");
        run("SELECT trompe.add_table('nopk')");
    }

    #[pg_test(error = "table pg_temp.tmp is temporary; only permanent tables can be replicated")]
    fn add_table_refuses_temporary_tables() {
        run("CREATE TEMP TABLE tmp (a int PRIMARY KEY)");
        run("SELECT trompe.add_table('tmp')");
    }

    #[pg_test(error = "table public.unl is unlogged; only permanent tables can be replicated")]
    fn add_table_refuses_unlogged_tables() {
        run("CREATE UNLOGGED TABLE unl (a int PRIMARY KEY)");
        run("SELECT trompe.add_table('unl')");
    }

    #[pg_test(
        error = "column \"n\" of table public.ident is an identity column GENERATED ALWAYS outside the primary key"
    )]
    fn add_table_refuses_an_always_identity_outside_the_key() {
        run("CREATE TABLE ident (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, n int GENERATED ALWAYS AS IDENTITY)");
        run("SELECT trompe.add_table('ident')");
    }

    #[pg_test(
        error = "column \"n\" of table public.ident is an identity column GENERATED ALWAYS outside the primary key"
    )]
    fn adding_an_always_identity_outside_the_key_to_a_replicated_table_fails() {
        run("CREATE TABLE ident (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY)");
        run("SELECT trompe.add_table('ident')");
        run("ALTER TABLE ident ADD COLUMN n int GENERATED ALWAYS AS IDENTITY");
    }

    #[pg_test(error = "public.v is a view, not an ordinary table")]
    fn add_table_refuses_views() {
        run("CREATE VIEW v AS SELECT 1 AS a");
        run("SELECT trompe.add_table('v')");
    }

    #[pg_test]
    fn add_table_twice_is_a_no_op() {
        run("CREATE TABLE t (id int PRIMARY KEY)");
        assert_eq!(one::<bool>("SELECT trompe.add_table('t')"), Some(true));
        assert_eq!(one::<bool>("SELECT trompe.add_table('t')"), Some(false));
        assert_eq!(one::<i64>("SELECT count(*) FROM trompe.tables WHERE relid = 't'::regclass"), Some(1));
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pg_trigger WHERE tgrelid = 't'::regclass AND tgname LIKE 'trompe%'"),
            Some(2)
        );
        assert_eq!(one::<bool>("SELECT trompe.remove_table('t')"), Some(true));
        assert_eq!(one::<bool>("SELECT trompe.remove_table('t')"), Some(false));
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pg_trigger WHERE tgrelid = 't'::regclass AND tgname LIKE 'trompe%'"),
            Some(0)
        );
    }

    #[pg_test]
    fn row_changes_are_logged_with_key_first() {
        run("CREATE TABLE acct (name text, id int, region text, PRIMARY KEY (region, id))");
        run("SELECT trompe.add_table('acct')");
        let before = log_count();
        run("INSERT INTO acct VALUES ('ann', 1, 'eu'), ('bob', 2, 'us')");
        run("UPDATE acct SET name = 'anna' WHERE id = 1");
        run("UPDATE acct SET id = 20 WHERE id = 2");
        run("DELETE FROM acct WHERE id = 1");
        assert_eq!(log_count() - before, 5);
        let rows: Vec<LogRow> = Spi::connect(|c| {
            c.select("SELECT op::text, cols, vals, oldkey FROM trompe.log_changes() ORDER BY seq", None, &[])
                .unwrap()
                .map(|r| (r.get(1).unwrap().unwrap(), r.get(2).unwrap().unwrap(), r.get(3).unwrap(), r.get(4).unwrap()))
                .collect()
        });
        let rows = &rows[rows.len() - 5..];
        let s = |v: &[&str]| v.iter().map(|x| Some(x.to_string())).collect::<Vec<_>>();
        assert_eq!(rows[0].0, "I");
        assert_eq!(rows[0].1, s(&["region", "id", "name"]));
        assert_eq!(rows[0].2, Some(s(&["eu", "1", "ann"])));
        assert_eq!(rows[0].3, None);
        assert_eq!(rows[2].0, "U");
        assert_eq!(rows[2].2, Some(s(&["eu", "1", "anna"])));
        assert_eq!(rows[2].3, Some(s(&["eu", "1"])));
        assert_eq!(rows[3].0, "U", "a primary key change is an update with the old key");
        assert_eq!(rows[3].2, Some(s(&["us", "20", "bob"])));
        assert_eq!(rows[3].3, Some(s(&["us", "2"])));
        assert_eq!(rows[4].0, "D");
        assert_eq!(rows[4].1, s(&["region", "id"]));
        assert_eq!(rows[4].2, None);
        assert_eq!(rows[4].3, Some(s(&["eu", "1"])));
        assert_eq!(
            one::<bool>("SELECT bool_and(txid::xid8 = pg_current_xact_id()) FROM trompe.log_changes()"),
            Some(true),
            "entries carry the writing transaction"
        );
    }

    #[pg_test]
    fn changes_of_rolled_back_savepoints_are_dropped() {
        run("CREATE TABLE s (id int PRIMARY KEY)");
        run("SELECT trompe.add_table('s')");
        run("INSERT INTO s VALUES (1)");
        run("DO $$ BEGIN INSERT INTO s VALUES (2); RAISE EXCEPTION 'undo'; EXCEPTION WHEN others THEN NULL; END $$");
        run("DO $$ BEGIN BEGIN INSERT INTO s VALUES (3); EXCEPTION WHEN others THEN NULL; END; END $$");
        // Enough changes in a savepoint to be written out before it is rolled back.
        run("DO $$ BEGIN INSERT INTO s SELECT generate_series(100, 10099); RAISE EXCEPTION 'undo'; \
             EXCEPTION WHEN others THEN NULL; END $$");
        run("INSERT INTO s VALUES (4)");
        assert_eq!(
            one::<String>("SELECT string_agg(vals[1], ',' ORDER BY seq) FROM trompe.log_changes()").as_deref(),
            Some("1,3,4")
        );
    }

    #[pg_test]
    fn generated_and_dropped_columns_are_not_sent() {
        run("CREATE TABLE g (id int PRIMARY KEY, gone int, a int, twice int GENERATED ALWAYS AS (a * 2) STORED)");
        run("ALTER TABLE g DROP COLUMN gone");
        run("SELECT trompe.add_table('g')");
        run("INSERT INTO g (id, a) VALUES (1, 21)");
        assert_eq!(
            one::<Vec<String>>("SELECT cols FROM trompe.log_changes() ORDER BY seq DESC LIMIT 1"),
            Some(vec!["id".to_string(), "a".to_string()])
        );
    }

    /// Every type round-trips exactly through the log's text form, whatever the session's
    /// output settings: the values are re-read with the column types and compared.
    #[pg_test]
    fn every_type_round_trips_under_odd_session_settings() {
        run("CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')");
        run("CREATE DOMAIN posint AS int CHECK (VALUE > 0)");
        run("CREATE TYPE pair AS (a int, b text)");
        run("CREATE TABLE every (
                id uuid PRIMARY KEY, i2 int2, i4 int4, i8 int8, num numeric(20,6), num_nan numeric,
                f4 float4, f8 float8, f8_nan float8, f8_inf float8, t text, vc varchar(10), bp char(3),
                b bytea, bo bool, d date, tm time, ttz timetz, ts timestamp, tstz timestamptz, iv interval,
                j json, jb jsonb, arr int[], arr2 text[][], arrn int[], e mood, dom posint, comp pair,
                comparr pair[], inet_v inet, nul text, big text)");
        run("SELECT trompe.add_table('every')");
        run("SET LOCAL DateStyle = 'SQL, DMY'");
        run("SET LOCAL IntervalStyle = 'sql_standard'");
        run("SET LOCAL extra_float_digits = -3");
        run("SET LOCAL TimeZone = 'Asia/Kathmandu'");
        run("SET LOCAL bytea_output = 'escape'");
        run(r#"INSERT INTO every VALUES (
                'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', -32768, 2147483647, -9223372036854775808,
                12345678901234.123456, 'NaN', 1.17549435e-38, 0.1, 'NaN', '-Infinity',
                E'ünïcödé \\ back\\slash ''quote'' "dq" \t tab', 'short', 'ab',
                '\x00ff5c27', true, '2024-02-29', '23:59:59.999999', '12:00+05:45',
                '1999-12-31 23:59:59.5', '2000-01-01 00:00:00+00', '-1 year +2 days -03:04:05.5',
                '{"b": 1,  "a" : [1, 2]}', '{"b": 1, "a": [1, 2]}', '{1,NULL,3}', '{{a,"b c"},{NULL,"\"q\""}}',
                '[0:1]={7,8}', 'happy', 5, '(1,"x,y")', ARRAY[ROW(1,'a')::pair, NULL, ROW(NULL, NULL)::pair],
                '10.1.2.3/8', NULL, repeat('xyz', 1500000))"#);
        run("CREATE TABLE every_copy (LIKE every)");
        run("RESET DateStyle; RESET IntervalStyle; RESET extra_float_digits; RESET TimeZone");
        // Rebuild the row from the log, casting each text value to its column's type.
        let cols: Vec<String> = one("SELECT cols FROM trompe.log_changes() ORDER BY seq DESC LIMIT 1").unwrap();
        let casts: Vec<String> = cols
            .iter()
            .enumerate()
            .map(|(i, c)| {
                format!(
                    "(SELECT vals[{}] FROM trompe.log_changes() ORDER BY seq DESC LIMIT 1)::{}",
                    i + 1,
                    one::<String>(&format!(
                        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'every'::regclass AND attname = '{c}'"
                    ))
                    .unwrap()
                )
            })
            .collect();
        run(&format!("INSERT INTO every_copy ({}) SELECT {}", cols.join(", "), casts.join(", ")));
        for c in &cols {
            // Text output (with default settings now) is exact for every type, json included.
            let same = one::<bool>(&format!(
                "SELECT (SELECT {c}::text FROM every) IS NOT DISTINCT FROM (SELECT {c}::text FROM every_copy)"
            ));
            assert_eq!(same, Some(true), "column {c} changed on the way through the log");
        }
        assert_eq!(one::<i32>("SELECT length(big) FROM every_copy"), Some(4_500_000));
    }

    #[pg_test]
    fn truncate_is_logged_per_table_with_restart_identity() {
        run("CREATE TABLE p (id serial PRIMARY KEY)");
        run("CREATE TABLE c (id int PRIMARY KEY, p int REFERENCES p)");
        run("SELECT trompe.add_table('p'), trompe.add_table('c')");
        let before = log_count();
        run("TRUNCATE p, c RESTART IDENTITY");
        run("TRUNCATE c");
        let ops: Vec<(String, String, Vec<String>)> = Spi::connect(|cl| {
            cl.select("SELECT op, rel, vals FROM trompe.log_changes() WHERE op = 'T' ORDER BY seq", None, &[])
                .unwrap()
                .map(|r| (r.get(1).unwrap().unwrap(), r.get(2).unwrap().unwrap(), r.get(3).unwrap().unwrap()))
                .collect()
        });
        assert_eq!(log_count() - before, 3);
        let mut first_two: Vec<String> = ops[..2].iter().map(|o| o.1.clone()).collect();
        first_two.sort();
        assert_eq!(first_two, vec!["c".to_string(), "p".to_string()]);
        assert!(ops[..2].iter().all(|o| o.2 == vec!["restart".to_string()]));
        assert_eq!(ops[2].1, "c");
        assert_eq!(ops[2].2, vec!["continue".to_string()]);
    }

    #[pg_test]
    fn ddl_on_replicated_tables_is_logged_as_the_statement_alone() {
        run("CREATE TABLE r (id int PRIMARY KEY)");
        run("CREATE TABLE other (id int PRIMARY KEY)");
        let before = log_count();
        run("SELECT trompe.add_table('r')");
        assert_eq!(log_count(), before, "trompe's own DDL (CREATE TRIGGER) is not captured");
        run("SET LOCAL search_path = public, pg_temp");
        run("ALTER TABLE r ADD COLUMN c int DEFAULT 0; ALTER TABLE other ADD COLUMN c int");
        run("CREATE INDEX r_c ON r (c)");
        run("CREATE INDEX other_c ON other (c)");
        let entries: Vec<(String, Vec<String>)> = Spi::connect(|cl| {
            cl.select("SELECT op::text, vals FROM trompe.log_changes() ORDER BY seq", None, &[])
                .unwrap()
                .map(|r| (r.get(1).unwrap().unwrap(), r.get(2).unwrap().unwrap()))
                .collect()
        });
        let ddl: Vec<&Vec<String>> = entries.iter().filter(|e| e.0 == "S").map(|e| &e.1).collect();
        assert_eq!(ddl.len(), 2, "only DDL on the replicated table: {ddl:?}");
        assert_eq!(ddl[0][0], "ALTER TABLE r ADD COLUMN c int DEFAULT 0");
        assert_eq!(ddl[0][1], "public, pg_temp");
        assert_eq!(ddl[0][3], "ALTER TABLE");
        assert_eq!(ddl[1][0], "CREATE INDEX r_c ON r (c)");
    }

    #[pg_test(error = "cannot remove the primary key of replicated table public.k")]
    fn dropping_the_primary_key_of_a_replicated_table_fails() {
        run("CREATE TABLE k (id int CONSTRAINT k_pk PRIMARY KEY)");
        run("SELECT trompe.add_table('k')");
        run("ALTER TABLE k DROP CONSTRAINT k_pk");
    }

    #[pg_test(error = "cannot disable or remove the capture triggers of replicated table public.k")]
    fn disabling_capture_fails() {
        run("CREATE TABLE k (id int PRIMARY KEY)");
        run("SELECT trompe.add_table('k')");
        run("ALTER TABLE k DISABLE TRIGGER trompe_capture");
    }

    #[pg_test(error = "cannot make replicated table public.k unlogged")]
    fn making_a_replicated_table_unlogged_fails() {
        run("CREATE TABLE k (id int PRIMARY KEY)");
        run("SELECT trompe.add_table('k')");
        run("ALTER TABLE k SET UNLOGGED");
    }

    #[pg_test]
    fn dropped_tables_are_forgotten_and_the_drop_is_logged() {
        run("CREATE TABLE gone (id int PRIMARY KEY)");
        run("SELECT trompe.add_table('gone')");
        run("DROP TABLE gone");
        assert_eq!(one::<i64>("SELECT count(*) FROM trompe.tables"), Some(0));
        assert_eq!(
            one::<String>("SELECT vals[1] FROM trompe.log_changes() WHERE op = 'S' ORDER BY seq DESC LIMIT 1")
                .as_deref(),
            Some("DROP TABLE gone")
        );
    }

    #[pg_test]
    fn schemas_replicate_present_and_future_tables() {
        run("CREATE SCHEMA shop");
        run("CREATE TABLE shop.a (id int PRIMARY KEY)");
        run("CREATE TABLE shop.nokey (x int)");
        run("CREATE TABLE public.outside (id int PRIMARY KEY)");
        assert_eq!(one::<i64>("SELECT trompe.add_schema('shop')"), Some(1));
        run("CREATE TABLE shop.b (id int PRIMARY KEY, v text)");
        assert_eq!(
            one::<String>("SELECT string_agg(relid::text, ',' ORDER BY relid::text) FROM trompe.tables").as_deref(),
            Some("shop.a,shop.b")
        );
        let create = one::<String>("SELECT vals[1] FROM trompe.log_changes() WHERE op = 'S' ORDER BY seq DESC LIMIT 1");
        assert_eq!(create.as_deref(), Some("CREATE TABLE shop.b (id int PRIMARY KEY, v text)"));
        run("ALTER TABLE shop.nokey ADD PRIMARY KEY (x)");
        assert_eq!(one::<i64>("SELECT count(*) FROM trompe.tables WHERE relid = 'shop.nokey'::regclass"), Some(1));
        run("INSERT INTO shop.b VALUES (1, 'x')");
        assert_eq!(
            one::<String>("SELECT op FROM trompe.log_changes() ORDER BY seq DESC LIMIT 1").as_deref(),
            Some("I")
        );
        assert_eq!(one::<i64>("SELECT trompe.remove_schema('shop')"), Some(3));
        assert_eq!(one::<i64>("SELECT count(*) FROM trompe.tables"), Some(0));
    }

    #[pg_test]
    fn schemas_are_named_as_sql_names_them() {
        run(r#"CREATE SCHEMA "Shop""#);
        run("CREATE SCHEMA lower_shop");
        run(r#"CREATE TABLE "Shop".a (id int PRIMARY KEY)"#);
        run("CREATE TABLE lower_shop.a (id int PRIMARY KEY)");
        // The exact name, a quoted identifier, and an unquoted one folded to lower case.
        assert_eq!(one::<i64>("SELECT trompe.add_schema('Shop')"), Some(1));
        assert_eq!(one::<i64>(r#"SELECT trompe.add_schema('"Shop"')"#), Some(0));
        assert_eq!(one::<i64>("SELECT trompe.add_schema('Lower_Shop')"), Some(1));
        assert_eq!(
            one::<String>("SELECT string_agg(schema_name, ',' ORDER BY schema_name) FROM trompe.schemas").as_deref(),
            Some("Shop,lower_shop")
        );
        assert_eq!(one::<i64>(r#"SELECT trompe.remove_schema('"Shop"')"#), Some(1));
        assert_eq!(one::<i64>("SELECT trompe.remove_schema('LOWER_SHOP')"), Some(1));
        assert_eq!(one::<i64>("SELECT count(*) FROM trompe.schemas"), Some(0));
    }

    #[pg_test(error = "schema \"Nope\" does not exist")]
    fn a_quoted_unknown_schema_is_an_error() {
        run(r#"SELECT trompe.add_schema('"Nope"')"#);
    }

    #[pg_test(error = "schema \"trompe\" cannot be replicated")]
    fn trompe_schema_cannot_be_replicated() {
        run("SELECT trompe.add_schema('trompe')");
    }

    #[pg_test(error = "schema \"nope\" does not exist")]
    fn unknown_schema_is_an_error() {
        run("SELECT trompe.add_schema('nope')");
    }

    #[pg_test]
    fn changes_applied_for_a_peer_are_not_captured() {
        run("CREATE TABLE t (id int PRIMARY KEY)");
        run("SELECT trompe.add_table('t')");
        run("SELECT pg_replication_origin_create('trompe_test_origin')");
        run("SELECT pg_replication_origin_session_setup('trompe_test_origin')");
        let before = log_count();
        run("INSERT INTO t VALUES (1)");
        run("SELECT pg_replication_origin_session_reset()");
        assert_eq!(log_count(), before);
        run("INSERT INTO t VALUES (2)");
        assert_eq!(log_count(), before + 1, "ordinary writes in the same session are captured");
    }
}
