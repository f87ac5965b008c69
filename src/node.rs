//! This node's identity.

use pgrx::prelude::*;

/// This node's identity: a random UUID made when the extension was created, unique across
/// every cluster the node will ever join.
#[pg_extern(stable, parallel_safe)]
fn node_id() -> pgrx::Uuid {
    Spi::get_one::<pgrx::Uuid>("SELECT node_id FROM trompe.node")
        .ok()
        .flatten()
        .unwrap_or_else(|| {
            crate::error::TrompeError::Internal("trompe.node is empty".into()).raise()
        })
}
