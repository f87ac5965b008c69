//! This node's identity.

use pgrx::prelude::*;
use trompe_core::nodeid::NodeId;

use crate::error::{OrRaise, TrompeError};

/// This node's id as `trompe.node` holds it, read as the extension's owner: the one place it
/// is read from (None while the table is empty, as in the middle of `CREATE EXTENSION`).
pub fn read_node_id() -> Result<Option<NodeId>, String> {
    let text = crate::run_as::as_extension_owner(|| crate::sql::value("SELECT node_id FROM trompe.node", &[]))?;
    text.map(|t| t.parse::<NodeId>().map_err(|e| format!("trompe.node holds a malformed node id: {e}"))).transpose()
}

/// This node's id (from `trompe.node`), as a SQL uuid; raises an error if it cannot be read.
pub fn local_node_id() -> pgrx::Uuid {
    let id = read_node_id()
        .map_err(TrompeError::Internal)
        .or_raise()
        .unwrap_or_else(|| TrompeError::Internal("trompe.node is empty".into()).raise());
    pgrx::Uuid::from_bytes(id.0)
}

/// A node id given as text, as a SQL uuid.
pub fn to_uuid(text: &str) -> Result<pgrx::Uuid, TrompeError> {
    text.parse::<NodeId>().map(|n| pgrx::Uuid::from_bytes(n.0)).map_err(|e| TrompeError::Internal(e.to_string()))
}

/// Whether this database is the node `trompe.node` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// It is (or the schema predates the check).
    Own,
    /// It is a copy (`CREATE DATABASE ... TEMPLATE`) of database `original`, which still exists
    /// on this server and is that node.
    CopyOf { original: String },
}

/// What `trompe.node` records of the database the identity belongs to.
enum Recorded {
    /// This database (or nothing recorded: the schema predates the check).
    Here,
    /// Another database of this server, named so.
    Elsewhere(String),
    /// A database that no longer exists: this one is a copy whose original is gone.
    Gone,
}

/// This database's oid, as text.
fn this_database() -> String {
    // SAFETY: MyDatabaseId is a backend-local global.
    u32::from(unsafe { pg_sys::MyDatabaseId }).to_string()
}

/// Reads what `trompe.node` records (as the extension's owner; read-only).
fn recorded() -> Result<Recorded, String> {
    let me = this_database();
    // (Read through to_jsonb: the column is missing until the 0.5.0 update has run.)
    let row = crate::run_as::as_extension_owner(|| {
        crate::sql::row(
            "SELECT (to_jsonb(n) ->> 'database_oid'), d.datname
               FROM trompe.node n
               LEFT JOIN pg_catalog.pg_database d ON d.oid = (to_jsonb(n) ->> 'database_oid')::oid",
            &[],
        )
    })?;
    Ok(match row.as_ref().map(|r| (r[0].as_deref(), r[1].clone())) {
        None | Some((None, _)) => Recorded::Here,
        Some((Some(oid), _)) if oid == me => Recorded::Here,
        Some((Some(_), Some(original))) => Recorded::Elsewhere(original),
        Some((Some(_), None)) => Recorded::Gone,
    })
}

/// Whether this database is the node `trompe.node` names: the identity belongs to the database
/// it was made in. A copy whose original is gone (`CREATE DATABASE x TEMPLATE y; DROP DATABASE
/// y`) takes the identity over, recording its own oid (two such copies would both be the node:
/// see the README's Limits). Runs SQL: call inside a transaction that may write.
pub fn identity() -> Result<Identity, String> {
    match recorded()? {
        Recorded::Here => Ok(Identity::Own),
        Recorded::Elsewhere(original) => Ok(Identity::CopyOf { original }),
        Recorded::Gone => {
            let me = this_database();
            crate::run_as::as_extension_owner(|| {
                crate::sql::execute("UPDATE trompe.node SET database_oid = $1::oid", &[Some(&me)])
            })?;
            Ok(Identity::Own)
        }
    }
}

/// Refuses what would act as this node at its peers (registering, unregistering, joining
/// through it) in a copy of the node's database.
pub fn refuse_in_copy() -> Result<(), TrompeError> {
    match identity().map_err(TrompeError::Internal)? {
        Identity::Own => Ok(()),
        Identity::CopyOf { original } => Err(TrompeError::CopyOfNode(original)),
    }
}

thread_local! {
    /// Whether this session found its database to be the node (asked once per session).
    static SERVES_AS_NODE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Refuses to serve a peer's pull from a copy of the node's database (peers pointed at it, say
/// after the databases were renamed, would take its log and positions for the node's). Read-only;
/// once the database is found to be the node, the session does not ask again.
pub fn refuse_serving_in_copy() -> Result<(), TrompeError> {
    if SERVES_AS_NODE.get() {
        return Ok(());
    }
    match recorded().map_err(TrompeError::Internal)? {
        Recorded::Elsewhere(original) => Err(TrompeError::CopyOfNode(original)),
        Recorded::Here | Recorded::Gone => {
            SERVES_AS_NODE.set(true);
            Ok(())
        }
    }
}

/// This node's identity: a random UUID made when the extension was created, unique across
/// every cluster the node will ever join.
#[pg_extern(stable, parallel_safe)]
fn node_id() -> pgrx::Uuid {
    local_node_id()
}
