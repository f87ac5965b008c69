//! The source side of a join: the node a new node copies from.

use pgrx::prelude::*;

use crate::error::{OrRaise, TrompeError};
use crate::log::writer::as_extension_owner;
use crate::node::local_node_id;
use crate::peers::{connect_peer, peer_conninfo, peer_query};
use crate::sql;

/// Registers node `consumer` (named `consumer_name`) with every peer of this node, at the
/// position this node has confirmed there, before the new node's copy is taken: each peer
/// then keeps every change this node had not applied at the time of the copy until the new
/// node pulls it. Fails, naming the peer, if one cannot be reached. Returns how many peers.
#[pg_extern(volatile, parallel_unsafe)]
fn sync_register(consumer: pgrx::Uuid, consumer_name: &str) -> i32 {
    let consumer = consumer.to_string();
    // The joining node itself may be a peer here already: it registers with this node itself.
    let peers = as_extension_owner(|| {
        sql::rows("SELECT name, conninfo FROM trompe.peers WHERE node_id <> $1::uuid ORDER BY name", &[Some(&consumer)])
    })
    .map_err(TrompeError::Internal)
    .or_raise();
    let me = local_node_id().to_string();
    for peer in &peers {
        let (Some(name), Some(conninfo)) = (&peer[0], &peer[1]) else { continue };
        let registered = peer_conninfo(conninfo).and_then(|info| {
            let mut conn = connect_peer(name, &info)?;
            peer_query(
                &mut conn,
                name,
                &info,
                "SELECT trompe.register_consumer_from($1::uuid, $2, $3::uuid)",
                &[Some(&consumer), Some(consumer_name), Some(&me)],
            )
        });
        if let Err(e) = registered {
            TrompeError::PeerFailed {
                name: name.clone(),
                message: format!("cannot register the joining node there: {e}"),
            }
            .raise();
        }
    }
    peers.len() as i32
}
