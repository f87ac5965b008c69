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
    PERFORM trompe._require_peer_login();
    IF length < 1 OR length > 16777216 OR "offset" < 0 THEN
        RAISE EXCEPTION 'invalid large object piece: offset %, length %', "offset", length
              USING ERRCODE = 'invalid_parameter_value';
    END IF;
    here := trompe._lo_local(origin, origin_oid);
    RETURN CASE WHEN here IS NULL THEN NULL ELSE lo_get(here, "offset", length) END;
END
$$;
