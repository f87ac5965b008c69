//! This node's identity.

use pgrx::prelude::*;
use trompe_core::nodeid::NodeId;

use crate::error::{OrRaise, TrompeError};

/// This node's id (from `trompe.node`).
pub fn local_node_id() -> pgrx::Uuid {
    let text = crate::run_as::as_extension_owner(|| crate::sql::value("SELECT node_id FROM trompe.node", &[]))
        .map_err(TrompeError::Internal)
        .or_raise()
        .unwrap_or_else(|| TrompeError::Internal("trompe.node is empty".into()).raise());
    to_uuid(&text).or_raise()
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
