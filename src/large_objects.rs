//! Large objects referenced by replicated tables. A column of type `oid` (or a domain over it,
//! such as contrib's `lo`) whose value names a large object is sent as the object's global id
//! (`lo:<node>:<oid>`, see `trompe_core::large_object`), not its local oid. A node applying
//! such a change uses its own copy of the object, or copies it first from the peer it pulls
//! from, piece by piece (never whole in memory), inside the apply transaction; the copy is
//! recorded in `trompe.large_objects`.

use std::cell::Cell;
use std::time::Duration;

use pgrx::pg_sys;
use trompe_core::large_object::GlobalLo;

use crate::error::TrompeError;
use crate::libpq::{query_wait, Conn};
use crate::run_as::as_extension_owner;
use crate::sql;

/// Bytes copied per round trip to the peer.
const PIECE: usize = 1 << 20;
/// How long one piece may take to arrive.
const PIECE_TIMEOUT: Duration = Duration::from_secs(120);

/// Whether a column of type `typid` can refer to large objects: `oid` or a domain over it.
pub fn holds_large_objects(typid: pg_sys::Oid) -> bool {
    // SAFETY: a catalog lookup of a type that exists (it is a column's type).
    unsafe { pg_sys::getBaseType(typid) == pg_sys::OIDOID }
}

/// Whether this database's trompe schema can replicate large objects (it cannot before
/// `ALTER EXTENSION trompe UPDATE` from 0.1.0).
pub fn available() -> bool {
    // SAFETY: syscache lookups by name, inside a transaction.
    unsafe {
        let nsp = pg_sys::get_namespace_oid(c"trompe".as_ptr(), true);
        nsp != pg_sys::InvalidOid && pg_sys::get_relname_relid(c"large_objects".as_ptr(), nsp) != pg_sys::InvalidOid
    }
}

/// Capture: what to send for the value `oid` (as text) of such a column: the global id of the
/// large object with that oid, or `None` if there is none (the value is sent as it is). An
/// object of this node is recorded as sent: only such objects can peers refer to and read.
pub fn reference_for(oid: &str) -> Result<Option<String>, String> {
    if !available() {
        return Ok(None);
    }
    let sent = as_extension_owner(|| sql::value("SELECT trompe._lo_export($1::oid)", &[Some(oid)]))?;
    Ok(sent.filter(|s| GlobalLo::parse(s).is_some()))
}

/// A connection to the peer that large objects are copied from.
pub trait LoSource {
    /// The connection, once nothing else is in flight on it (a pull's answer still arriving
    /// is received first).
    fn idle_conn(&mut self) -> Result<&mut Conn, String>;
}

impl LoSource for Conn {
    fn idle_conn(&mut self) -> Result<&mut Conn, String> {
        Ok(self)
    }
}

thread_local! {
    static SOURCE: Cell<Option<*mut dyn LoSource>> = const { Cell::new(None) };
}

/// Runs `f` with `source` as the peer that large objects are copied from: the connection of
/// the peer whose changes `f` applies. The caller keeps `source` alive, and uses it for nothing
/// else, until `f` returns.
pub fn with_source<R>(source: Option<*mut dyn LoSource>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<*mut dyn LoSource>);
    impl Drop for Restore {
        fn drop(&mut self) {
            SOURCE.set(self.0);
        }
    }
    let _restore = Restore(SOURCE.replace(source));
    f()
}

/// The oid of this node's copy of `lo`, copied from the peer first if there is none (inside
/// `with_source`).
pub fn local_copy(lo: &GlobalLo) -> Result<u32, String> {
    let oid = lo.oid.to_string();
    let args = [Some(lo.origin.as_str()), Some(oid.as_str())];
    let parse = |v: Option<String>| v.and_then(|v| v.parse::<u32>().ok());
    if let Some(local) = parse(sql::value("SELECT trompe._lo_local($1::uuid, $2::oid)", &args)?) {
        return Ok(local);
    }
    let local =
        parse(sql::value("SELECT lo_create(0)", &[])?).ok_or_else(|| "lo_create returned no oid".to_string())?;
    let local_text = local.to_string();
    let mut offset = 0usize;
    loop {
        let Some(piece) = fetch_piece(lo, offset)? else {
            if offset == 0 {
                pgrx::warning!(
                    "trompe: the peer no longer has large object {}: its copy here is empty",
                    lo.reference()
                );
            }
            break;
        };
        let length = piece.len() / 2;
        let offset_text = offset.to_string();
        sql::execute(
            "SELECT lo_put($1::oid, $2::bigint, decode($3, 'hex'))",
            &[Some(&local_text), Some(&offset_text), Some(&piece)],
        )?;
        offset += length;
        if length < PIECE {
            break;
        }
    }
    sql::execute("DELETE FROM trompe.large_objects WHERE local_oid = $1::oid", &[Some(&local_text)])?;
    sql::execute(
        "INSERT INTO trompe.large_objects (origin, origin_oid, local_oid) VALUES ($1::uuid, $2::oid, $3::oid)
         ON CONFLICT (origin, origin_oid) DO UPDATE SET local_oid = EXCLUDED.local_oid, copied_at = now()",
        &[args[0], args[1], Some(&local_text)],
    )?;
    Ok(local)
}

/// One piece of `lo` from the peer, in hex (whatever the peer's `bytea_output`), or `None` if
/// the peer does not have the object (any more).
fn fetch_piece(lo: &GlobalLo, offset: usize) -> Result<Option<String>, String> {
    let Some(source) = SOURCE.get() else {
        return Err("no peer connection to copy large objects from".into());
    };
    // SAFETY: with_source's caller keeps the source alive and does not use it while the
    // changes are applied.
    let conn =
        unsafe { &mut *source }.idle_conn().map_err(|e| format!("copying large object {}: {e}", lo.reference()))?;
    let (offset, piece) = (offset.to_string(), PIECE.to_string());
    let result = query_wait(
        conn,
        "SELECT encode(trompe.lo_chunk($1::uuid, $2::oid, $3::bigint, $4::int), 'hex')",
        &[Some(&lo.origin), Some(&lo.oid.to_string()), Some(&offset), Some(&piece)],
        PIECE_TIMEOUT,
    )
    .map_err(|e| format!("copying large object {}: {}", lo.reference(), e.message))?;
    Ok(result.get(0, 0).map(str::to_string))
}

/// Rows of `sql` read as the extension owner.
fn owned_rows(sql: &str, args: &[Option<&str>]) -> Result<Vec<sql::Row>, TrompeError> {
    as_extension_owner(|| sql::rows(sql, args)).map_err(TrompeError::Internal)
}

/// Copies here, over `conn` to peer `peer`, the large objects that `incoming_json` (a jsonb
/// array of rows of `table` in canonical form) refers to and this node has no copy of.
pub fn copy_referenced_large_objects(
    conn: &mut Conn,
    peer: &str,
    table: &str,
    incoming_json: &str,
) -> Result<(), TrompeError> {
    let missing = owned_rows(
        "SELECT DISTINCT e.value
           FROM trompe._table_sql($1::regclass) s, jsonb_array_elements($2::jsonb) r, jsonb_each_text(r) e
          WHERE e.key = ANY (s.lo_columns) AND e.value LIKE 'lo:%' AND trompe._lo_from_reference(e.value) IS NULL",
        &[Some(table), Some(incoming_json)],
    )?;
    let source = Some(conn as *mut Conn as *mut dyn LoSource);
    for reference in missing.into_iter().filter_map(|r| r.into_iter().next().flatten()) {
        let Some(Ok(lo)) = GlobalLo::parse(&reference) else {
            return Err(TrompeError::BadRequest(format!("peer sent a malformed large object reference {reference:?}")));
        };
        as_extension_owner(|| with_source(source, || local_copy(&lo)))
            .map_err(|e| TrompeError::PeerFailed { name: peer.to_string(), message: e.to_string() })?;
    }
    Ok(())
}

/// True if `table` has columns that may refer to large objects.
pub fn refers_to_large_objects(table: &str) -> Result<bool, TrompeError> {
    Ok(owned_rows(
        "SELECT coalesce(cardinality(lo_columns), 0) > 0 FROM trompe._table_sql($1::regclass)",
        &[Some(table)],
    )?
    .first()
    .is_some_and(|r| r.first().cloned().flatten().as_deref() == Some("t")))
}
