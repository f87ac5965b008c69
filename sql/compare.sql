-- Compare and repair (trompe.compare, trompe.repair): both nodes hash a replicated table's rows
-- in the same canonical form, grouped into buckets by a hash of the primary key; only the
-- buckets whose digests differ are listed row by row, and only differing rows are shipped.
--
-- Canonical form: a row is to_jsonb(row)::text (keys sorted, so column order does not matter),
-- with columns that may refer to large objects replaced by the objects' global ids (each node
-- has its own oids), its key jsonb_build_object(primary key columns)::text; the functions fix
-- every setting that changes how values print, so two nodes print the same values the same way.

-- What trompe.repair changed on this node, row by row.
CREATE TABLE trompe.repairs (
    id bigserial PRIMARY KEY,
    repaired_at timestamptz NOT NULL DEFAULT now(),
    peer text NOT NULL,
    table_name text NOT NULL,
    key jsonb NOT NULL,
    action text NOT NULL CHECK (action IN ('insert', 'update', 'delete')),
    old_row jsonb,
    new_row jsonb
);
COMMENT ON TABLE trompe.repairs IS 'Rows trompe.repair() inserted, updated or deleted on this node, with their old and new contents.';

-- The pieces of SQL that name a replicated table's columns: its primary key as a jsonb object
-- (of alias t), the quoted key columns, the writable columns (not generated, not dropped), the
-- SET list of an upsert, a row of alias t in canonical form (row_json), a canonical row r
-- turned back into local values (row_local), and the columns that may refer to large objects.
-- Raises if the table is not replicated.
CREATE FUNCTION trompe._table_sql(rel regclass,
                                  OUT key_object text, OUT key_columns text[], OUT key_list text,
                                  OUT columns text, OUT set_list text,
                                  OUT row_json text, OUT row_local text, OUT lo_columns text[])
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    pk int2[];
BEGIN
    IF NOT EXISTS (SELECT 1 FROM trompe.tables WHERE relid = rel) THEN
        RAISE EXCEPTION 'table % is not replicated by trompe', rel USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    SELECT i.indkey::int2[] INTO pk FROM pg_index i WHERE i.indrelid = rel AND i.indisprimary;
    SELECT 'jsonb_build_object(' || string_agg(format('%L, t.%I', a.attname, a.attname), ', ' ORDER BY a.attnum) || ')',
           array_agg(format('%I', a.attname) ORDER BY a.attnum),
           string_agg(format('%I', a.attname), ', ' ORDER BY a.attnum)
      INTO key_object, key_columns, key_list
      FROM pg_attribute a WHERE a.attrelid = rel AND a.attnum = ANY (pk);
    SELECT string_agg(format('%I', a.attname), ', ' ORDER BY a.attnum),
           string_agg(format('%I = EXCLUDED.%I', a.attname, a.attname), ', ' ORDER BY a.attnum)
               FILTER (WHERE NOT a.attnum = ANY (pk))
      INTO columns, set_list
      FROM pg_attribute a
     WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '';
    SELECT array_agg(a.attname::text ORDER BY a.attnum),
           '(to_jsonb(t) || jsonb_build_object('
               || string_agg(format('%L, trompe._lo_reference(t.%I)', a.attname, a.attname), ', ' ORDER BY a.attnum) || '))',
           '(r || jsonb_build_object('
               || string_agg(format('%L, trompe._lo_from_reference(r->>%L)', a.attname, a.attname), ', ' ORDER BY a.attnum) || '))'
      INTO lo_columns, row_json, row_local
      FROM pg_attribute a
     WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped AND NOT a.attnum = ANY (pk)
       AND (SELECT coalesce(nullif(ty.typbasetype, 0), ty.oid) FROM pg_type ty WHERE ty.oid = a.atttypid) = 'oid'::regtype;
    row_json := coalesce(row_json, 'to_jsonb(t)');
    row_local := coalesce(row_local, 'r');
END
$$;

-- The condition that rows `l` and `r` have the same key (columns as _table_sql quotes them).
CREATE FUNCTION trompe._key_match(key_columns text[], l text, r text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT string_agg(format('%s.%s = %s.%s', l, c, r, c), ' AND ') FROM unnest(key_columns) c
$$;

-- The query listing every row of a replicated table (or of the buckets $2 only, all if NULL)
-- as bucket (of $1 buckets), key and two 64-bit hashes of the row in canonical form
-- (PostgreSQL's hashtextextended with two seeds). Checks the number of buckets it will get.
CREATE FUNCTION trompe._rows_sql(rel regclass, buckets int) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s record;
BEGIN
    IF buckets IS NULL OR buckets < 1 THEN
        RAISE EXCEPTION 'buckets must be at least 1' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    s := trompe._table_sql(rel);
    RETURN format(
        'SELECT d.bucket, d.key, d.h1, d.h2 FROM (
             SELECT ((hashtext(k.key) & 2147483647) %% $1)::int AS bucket, k.key,
                    hashtextextended(k.row_text, 0) AS h1, hashtextextended(k.row_text, 1) AS h2
               FROM %s t CROSS JOIN LATERAL (SELECT (%s)::text AS key, (%s)::text AS row_text) k) d
          WHERE $2 IS NULL OR d.bucket = ANY ($2)', rel, s.key_object, s.row_json);
END
$$;

-- Every row of a replicated table (or of the listed buckets only), as _rows_sql lists them.
CREATE FUNCTION trompe._row_digests(rel regclass, buckets int, wanted int[] DEFAULT NULL)
RETURNS TABLE (bucket int, key text, h1 bigint, h2 bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' SET datestyle = 'ISO, YMD'
SET intervalstyle = 'postgres' SET extra_float_digits = 3 SET bytea_output = 'hex' AS $$
BEGIN
    PERFORM trompe._require_peer_login();
    RETURN QUERY EXECUTE trompe._rows_sql(rel, buckets) USING buckets, wanted;
END
$$;

-- A replicated table's digest: per bucket, the row count and the sums of both row hashes
-- (order does not matter, so no sorting; only one row per bucket leaves the function).
CREATE FUNCTION trompe.table_digest(rel regclass, buckets int)
RETURNS TABLE (bucket int, row_count bigint, digest text)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' SET datestyle = 'ISO, YMD'
SET intervalstyle = 'postgres' SET extra_float_digits = 3 SET bytea_output = 'hex' AS $$
BEGIN
    PERFORM trompe._require_peer_login();
    RETURN QUERY EXECUTE format(
        'SELECT d.bucket, count(*), sum(d.h1)::text || '':'' || sum(d.h2)::text FROM (%s) d GROUP BY d.bucket',
        trompe._rows_sql(rel, buckets))
        USING buckets, NULL::int[];
END
$$;

-- The rows of a replicated table with the given keys (as produced by _row_digests).
CREATE FUNCTION trompe.fetch_rows(rel regclass, keys text[])
RETURNS TABLE (key text, row_data jsonb)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' SET datestyle = 'ISO, YMD'
SET intervalstyle = 'postgres' SET extra_float_digits = 3 SET bytea_output = 'hex' AS $$
DECLARE
    s record;
BEGIN
    PERFORM trompe._require_peer_login();
    s := trompe._table_sql(rel);
    RETURN QUERY EXECUTE format(
        'SELECT (%s)::text, %s
           FROM jsonb_populate_recordset(NULL::%s, (SELECT jsonb_agg(k::jsonb) FROM unnest($1::text[]) k)) a
           JOIN %s t ON %s', s.key_object, s.row_json, rel, rel, trompe._key_match(s.key_columns, 'a', 't'))
        USING keys;
END
$$;

-- Brings rows of a replicated table in line with a peer's: deletes the rows with keys `gone`,
-- inserts or updates the rows `incoming` (a jsonb array of rows as fetch_rows returns them; the
-- large objects they refer to must have been copied here already),
-- and records every change in trompe.repairs. These are ordinary writes: they are captured and
-- reach every node.
CREATE FUNCTION trompe._repair_rows(rel regclass, peer text, gone text[], incoming jsonb,
                                    OUT inserted bigint, OUT updated bigint, OUT deleted bigint)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' SET datestyle = 'ISO, YMD'
SET intervalstyle = 'postgres' SET extra_float_digits = 3 SET bytea_output = 'hex' AS $$
DECLARE
    s record;
BEGIN
    s := trompe._table_sql(rel);
    EXECUTE format(
        'WITH gone AS (
             DELETE FROM %s b USING jsonb_populate_recordset(NULL::%s, (SELECT jsonb_agg(k::jsonb) FROM unnest($1::text[]) k)) a
              WHERE %s RETURNING b.*),
         logged AS (
             INSERT INTO trompe.repairs (peer, table_name, key, action, old_row)
             SELECT $2, $3, %s, ''delete'', to_jsonb(t) FROM gone t RETURNING 1)
         SELECT count(*) FROM logged', rel, rel, trompe._key_match(s.key_columns, 'a', 'b'), s.key_object)
        INTO deleted USING gone, peer, rel::text;
    EXECUTE format(
        'WITH a AS (SELECT * FROM jsonb_populate_recordset(NULL::%s, (SELECT jsonb_agg(%s) FROM jsonb_array_elements($1) r))),
         old AS (SELECT b.* FROM %s b JOIN a ON %s),
         up AS (
             INSERT INTO %s AS b (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM a
             ON CONFLICT (%s) DO %s
             RETURNING b.*, b.xmax = 0 AS "trompe fresh row"),
         logged AS (
             INSERT INTO trompe.repairs (peer, table_name, key, action, old_row, new_row)
             SELECT $2, $3, (SELECT %s FROM (SELECT (u).*) t),
                    CASE WHEN u."trompe fresh row" THEN ''insert'' ELSE ''update'' END,
                    to_jsonb(o), to_jsonb(u) - ''trompe fresh row''
               FROM up u LEFT JOIN old o ON %s
             RETURNING action)
         SELECT count(*) FILTER (WHERE action = ''insert''), count(*) FILTER (WHERE action = ''update'') FROM logged',
        rel, s.row_local, rel, trompe._key_match(s.key_columns, 'a', 'b'), rel, s.columns, s.columns, s.key_list,
        coalesce('UPDATE SET ' || s.set_list, 'NOTHING'), s.key_object, trompe._key_match(s.key_columns, 'o', 'u'))
        INTO inserted, updated USING incoming, peer, rel::text;
END
$$;
