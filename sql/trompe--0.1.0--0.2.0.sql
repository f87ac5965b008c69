-- Upgrade of trompe from 0.1.0 to 0.2.0 (ALTER EXTENSION trompe UPDATE): adds compare and
-- repair (trompe.compare, trompe.repair, the functions a peer serves them with, and the
-- trompe.repairs record) and large-object replication (trompe.large_objects, lo_chunk).
-- Nothing existing changes; replication keeps running throughout.
\echo Use "ALTER EXTENSION trompe UPDATE TO '0.2.0'" to load this file. \quit

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

CREATE FUNCTION trompe.compare(
	"peer" TEXT,
	"rel" regclass DEFAULT NULL
) RETURNS TABLE (
	"table_name" TEXT,
	"rows_here" bigint,
	"rows_there" bigint,
	"only_here" bigint,
	"only_there" bigint,
	"different" bigint
)
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'compare_wrapper';

CREATE FUNCTION trompe.repair(
	"peer" TEXT,
	"rel" regclass DEFAULT NULL
) RETURNS TABLE (
	"table_name" TEXT,
	"inserted" bigint,
	"updated" bigint,
	"deleted" bigint
)
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'repair_wrapper';

-- Large objects referenced by replicated tables (columns of type oid, or a domain over it such
-- as contrib's lo). A reference travels as the object's global id (the node that created it and
-- its oid there); each node keeps its own copy of the object and maps the global id to it here.
-- Objects of this node that it has sent are recorded too (origin = this node, local_oid =
-- origin_oid): only those can a peer refer to or read.
CREATE TABLE trompe.large_objects (
    origin uuid NOT NULL,
    origin_oid oid NOT NULL,
    local_oid oid NOT NULL UNIQUE,
    copied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (origin, origin_oid)
);
COMMENT ON TABLE trompe.large_objects IS 'Large objects copied from other nodes or sent to them: their global id and their oid here.';

-- This node's copy of a large object by its global id, NULL if it has none (an object of this
-- node counts only if it was sent: a peer cannot point a row at any other object here).
CREATE FUNCTION trompe._lo_local(origin uuid, origin_oid oid) RETURNS oid
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT m.local_oid FROM trompe.large_objects m JOIN pg_largeobject_metadata l ON l.oid = m.local_oid
     WHERE m.origin = _lo_local.origin AND m.origin_oid = _lo_local.origin_oid
$$;

-- What a peer is sent for the value `o` of a column that may refer to large objects: the
-- object's global id ('lo:<node>:<oid>'), or o itself if no large object has that oid.
CREATE FUNCTION trompe._lo_reference(o oid) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE
        WHEN o IS NULL THEN NULL
        WHEN NOT EXISTS (SELECT 1 FROM pg_largeobject_metadata WHERE oid = o) THEN o::text
        ELSE coalesce((SELECT format('lo:%s:%s', m.origin, m.origin_oid) FROM trompe.large_objects m WHERE m.local_oid = o),
                      format('lo:%s:%s', (SELECT node_id FROM trompe.node), o))
    END
$$;

-- Capture: _lo_reference, and a record that this node sent its object `o` (see above).
CREATE FUNCTION trompe._lo_export(o oid) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    me uuid := (SELECT node_id FROM trompe.node);
    sent text := trompe._lo_reference(o);
BEGIN
    IF sent = format('lo:%s:%s', me, o) THEN
        INSERT INTO trompe.large_objects (origin, origin_oid, local_oid) VALUES (me, o, o) ON CONFLICT DO NOTHING;
    END IF;
    RETURN sent;
END
$$;

-- The local value for what _lo_reference sent: the oid of this node's copy of the object (NULL
-- if it has none), or the plain oid.
CREATE FUNCTION trompe._lo_from_reference(reference text) RETURNS oid
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE
        WHEN reference IS NULL THEN NULL
        WHEN reference NOT LIKE 'lo:%' THEN reference::oid
        ELSE trompe._lo_local(split_part(reference, ':', 2)::uuid, split_part(reference, ':', 3)::oid)
    END
$$;

-- One piece of a large object by its global id, for a peer copying it (NULL if this node does
-- not have it, e.g. it was unlinked meanwhile). Peers copy objects piece by piece, never whole.
CREATE FUNCTION trompe.lo_chunk(origin uuid, origin_oid oid, "offset" bigint, length int) RETURNS bytea
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    here oid;
BEGIN
    IF length < 1 OR length > 16777216 OR "offset" < 0 THEN
        RAISE EXCEPTION 'invalid large object piece: offset %, length %', "offset", length
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    here := trompe._lo_local(origin, origin_oid);
    RETURN CASE WHEN here IS NULL THEN NULL ELSE lo_get(here, "offset", length) END;
END
$$;

REVOKE EXECUTE ON FUNCTION
    trompe.compare(text, regclass), trompe.repair(text, regclass),
    trompe._row_digests(regclass, integer, integer[]), trompe.table_digest(regclass, integer),
    trompe.fetch_rows(regclass, text[]), trompe._repair_rows(regclass, text, text[], jsonb),
    trompe.lo_chunk(uuid, oid, bigint, integer)
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    trompe._row_digests(regclass, integer, integer[]), trompe.table_digest(regclass, integer),
    trompe.fetch_rows(regclass, text[]), trompe.lo_chunk(uuid, oid, bigint, integer)
TO trompe_puller;
GRANT EXECUTE ON FUNCTION trompe.compare(text, regclass), trompe.repair(text, regclass) TO trompe_admin;
GRANT SELECT ON trompe.repairs TO trompe_admin;
