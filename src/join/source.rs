//! The source side of a join: the node a new node copies from.

use pgrx::prelude::*;

use crate::error::{OrRaise, TrompeError};
use crate::node::local_node_id;
use crate::peer_calls::{connect_peer, peer_conninfo, peer_has_function, peer_query};
use crate::run_as::as_extension_owner;
use crate::sql;

/// Registers node `consumer` (named `consumer_name`) with every peer of this node, at the
/// position this node has confirmed there, before the new node's copy is taken: each peer
/// then keeps every change this node had not applied at the time of the copy until the new
/// node pulls it. Fails, naming the peer, if one cannot be reached. Returns how many peers.
/// Only a login that may act for `consumer` here may ask (see `consumers`).
#[pg_extern(volatile, parallel_unsafe)]
fn sync_register(consumer: pgrx::Uuid, consumer_name: &str) -> i32 {
    register_with_peers(consumer, consumer_name, None)
}

/// `sync_register` for a new node that gives the SHA-256 (hex) of its secret: each peer keeps
/// the registration for the login that presents the secret (see `claim_consumer`).
#[pg_extern(name = "sync_register", volatile, parallel_unsafe)]
fn sync_register_claimed(consumer: pgrx::Uuid, consumer_name: &str, claim: &str) -> i32 {
    register_with_peers(consumer, consumer_name, Some(claim))
}

fn register_with_peers(consumer: pgrx::Uuid, consumer_name: &str, claim: Option<&str>) -> i32 {
    crate::node::refuse_in_copy().or_raise();
    let consumer = consumer.to_string();
    if crate::consumers::authorized(&consumer, crate::consumers::Act::Bind).or_raise().is_none() {
        TrompeError::NotAConsumer(consumer).raise();
    }
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
            // A peer whose schema is older than 0.5.0 takes no claim (and binds no login).
            let claimed = match claim {
                Some(_) => {
                    peer_has_function(&mut conn, name, &info, "trompe.register_consumer_from(uuid,text,uuid,text)")?
                }
                None => false,
            };
            if claimed {
                peer_query(
                    &mut conn,
                    name,
                    &info,
                    "SELECT trompe.register_consumer_from($1::uuid, $2, $3::uuid, $4)",
                    &[Some(&consumer), Some(consumer_name), Some(&me), claim],
                )
            } else {
                peer_query(
                    &mut conn,
                    name,
                    &info,
                    "SELECT trompe.register_consumer_from($1::uuid, $2, $3::uuid)",
                    &[Some(&consumer), Some(consumer_name), Some(&me)],
                )
            }
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
