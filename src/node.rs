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

/// This node's identity: a random UUID made when the extension was created, unique across
/// every cluster the node will ever join.
#[pg_extern(stable, parallel_safe)]
fn node_id() -> pgrx::Uuid {
    local_node_id()
}
