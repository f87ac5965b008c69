-- Large objects referenced by replicated tables (columns of type oid, or a domain over it such
-- as contrib's lo). A reference travels as the object's global id (the node that created it and
-- its oid there); each node keeps its own copy of the object and maps the global id to it here.
CREATE TABLE trompe.large_objects (
    origin uuid NOT NULL,
    origin_oid oid NOT NULL,
    local_oid oid NOT NULL UNIQUE,
    copied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (origin, origin_oid)
);
COMMENT ON TABLE trompe.large_objects IS 'Large objects copied from other nodes: their global id and the oid of the copy here.';

-- This node's copy of a large object by its global id, NULL if it has none.
CREATE FUNCTION trompe._lo_local(origin uuid, origin_oid oid) RETURNS oid
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE
        WHEN origin = (SELECT node_id FROM trompe.node)
             AND EXISTS (SELECT 1 FROM pg_largeobject_metadata WHERE oid = origin_oid) THEN origin_oid
        ELSE (SELECT m.local_oid FROM trompe.large_objects m JOIN pg_largeobject_metadata l ON l.oid = m.local_oid
               WHERE m.origin = _lo_local.origin AND m.origin_oid = _lo_local.origin_oid)
    END
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
