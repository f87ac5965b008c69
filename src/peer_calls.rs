//! Calling a peer: its connection string with trompe's defaults, connecting and querying it
//! from a SQL function with clear errors, and keeping its secrets out of every message. Used by
//! the peer functions, joining, compare and the worker's links.

use std::time::Duration;

use trompe_core::conninfo::{ConnInfo, ConninfoError};

use crate::error::TrompeError;
use crate::libpq::{connect_wait, query_wait, Conn, PqError, PqErrorKind};

/// How long add_peer and remove_peer wait for a peer's answers.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A peer's connection string with trompe's defaults added (timeouts, keepalives, a name in
/// the peer's pg_stat_activity), parsed; parse errors never echo a value.
pub fn peer_conninfo(conninfo: &str) -> Result<ConnInfo, TrompeError> {
    let mut info = ConnInfo::parse(conninfo).map_err(|e| {
        let text = match e {
            ConninfoError::MissingEquals(ref key) if !trompe_core::conninfo::KNOWN_KEYWORDS.contains(&key.as_str()) => {
                "invalid connection string: an item is not of the form key=value".to_string()
            }
            other => other.to_string(),
        };
        TrompeError::BadConninfo(text)
    })?;
    info.set_default("connect_timeout", &crate::guc::CONNECT_TIMEOUT_S.get().to_string());
    info.set_default("keepalives", "1");
    info.set_default("keepalives_idle", "10");
    info.set_default("keepalives_interval", "5");
    info.set_default("keepalives_count", "3");
    info.set_default("application_name", "trompe");
    crate::libpq::check_conninfo(&info)
        .map_err(|e| TrompeError::BadConninfo(format!("invalid connection string: {e}")))?;
    Ok(info)
}

/// Removes the password from a message, in case a server or library ever echoed it.
pub fn scrub(message: &str, info: &ConnInfo) -> String {
    let mut out = message.to_string();
    for key in ["password", "sslpassword"] {
        if let Some(secret) = info.get(key) {
            if secret.len() >= 3 {
                out = out.replace(secret, "********");
            }
        }
    }
    out
}

/// Connects to a peer for a SQL function, mapping failures to clear errors. The session writes
/// (registrations, positions) also where the peer's database is read-only by default.
pub fn connect_peer(name: &str, info: &ConnInfo) -> Result<Conn, TrompeError> {
    let mut conn = connect_wait(info, CALL_TIMEOUT).map_err(|e| {
        let message = scrub(&e.message, info);
        match e.kind {
            PqErrorKind::Login => TrompeError::PeerLoginRefused { name: name.to_string(), message },
            _ => TrompeError::PeerUnreachable { name: name.to_string(), message },
        }
    })?;
    peer_query(&mut conn, name, info, "SET default_transaction_read_only = off", &[])?;
    Ok(conn)
}

pub(crate) fn peer_query(
    conn: &mut Conn,
    name: &str,
    info: &ConnInfo,
    sql: &str,
    params: &[Option<&str>],
) -> Result<crate::libpq::PgResult, TrompeError> {
    query_wait(conn, sql, params, CALL_TIMEOUT).map_err(|e: PqError| peer_failed(name, info, &e))
}

/// A query on the peer that failed, as an error of this node (the password scrubbed).
pub(crate) fn peer_failed(name: &str, info: &ConnInfo, e: &PqError) -> TrompeError {
    TrompeError::PeerFailed { name: name.to_string(), message: scrub(&e.describe(), info) }
}

/// Whether the peer has function `signature` (e.g. `trompe.claim_consumer(uuid,text)`): what a
/// node checks before calling what a later version added on a peer that may be older.
pub(crate) fn peer_has_function(
    conn: &mut Conn,
    name: &str,
    info: &ConnInfo,
    signature: &str,
) -> Result<bool, TrompeError> {
    let found = peer_query(conn, name, info, "SELECT to_regprocedure($1) IS NOT NULL", &[Some(signature)])?;
    Ok(found.get(0, 0) == Some("t"))
}
