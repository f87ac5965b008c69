//! Transactions set aside: `trompe.skip(peer)` takes the peer transaction that keeps failing
//! out of the stream and keeps it, whole, in `trompe.exceptions`, so that nothing is discarded
//! unseen and the stream goes on.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use pgrx::prelude::*;
use trompe_core::nodeid::NodeId;

use crate::error::{OrRaise, TrompeError};
use crate::run_as::as_extension_owner;
use crate::worker::apply::Change;

/// Inside the apply transaction of peer `peer` (node `node`) that would have applied
/// transaction `txn_last` (committed at `commit_us`), whose changes `changes` reads in order:
/// records the transaction, with the `error` it failed with, in `trompe.exceptions`, and
/// forgets the request to skip it. The caller stores the position past it in the same
/// transaction. Only its text is built whole, not the decoded changes. A transaction whose log
/// rows do not decode is kept as those rows (`raw_rows`), in hex, with the reason.
pub fn set_aside(
    node: &NodeId,
    peer: &str,
    txn_last: i64,
    commit_us: i64,
    changes: impl Iterator<Item = Result<Change, String>>,
    raw_rows: impl Iterator<Item = Result<Vec<u8>, String>>,
    error: &str,
) -> Result<(), String> {
    let text = match changes_text(changes) {
        Ok(text) => text,
        Err(undecodable) => undecodable_text(&undecodable, raw_rows)?,
    };
    let txn_last = txn_last.to_string();
    let committed = format!("{}", 946_684_800.0 + commit_us as f64 / 1_000_000.0);
    let node = node.to_string();
    crate::sql::execute(
        "INSERT INTO trompe.exceptions (node_id, peer, origin_txn, committed_at, error, changes)
         VALUES ($1::uuid, $2, $3::bigint, to_timestamp($4::float8), $5, $6::jsonb)",
        &[Some(&node), Some(peer), Some(&txn_last), Some(&committed), Some(error), Some(&text)],
    )?;
    crate::sql::execute("DELETE FROM trompe.skip_requests WHERE node_id = $1::uuid", &[Some(&node)])?;
    Ok(())
}

/// The changes as a JSON array, or why one of them does not decode.
fn changes_text(changes: impl Iterator<Item = Result<Change, String>>) -> Result<String, String> {
    let mut text = String::from("[");
    for (i, change) in changes.enumerate() {
        if i > 0 {
            text.push(',');
        }
        trompe_core::json::push_change(&mut text, &change?.record);
    }
    text.push(']');
    Ok(text)
}

/// A transaction whose log rows do not decode, as a JSON array of one element: why, and each
/// row's bytes in hex.
fn undecodable_text(why: &str, raw_rows: impl Iterator<Item = Result<Vec<u8>, String>>) -> Result<String, String> {
    let mut text = String::from("[{\"undecodable\":");
    trompe_core::json::push_string(&mut text, why);
    text.push_str(",\"log_rows\":[");
    for (i, row) in raw_rows.enumerate() {
        if i > 0 {
            text.push(',');
        }
        text.push('"');
        for byte in row? {
            // Writing to a String cannot fail.
            let _ = write!(text, "{byte:02x}");
        }
        text.push('"');
    }
    text.push_str("]}]");
    Ok(text)
}

/// The transaction of each peer an admin asked to set aside, by node id (none on a schema
/// older than 0.5.0).
pub fn skip_requests() -> Result<Vec<(NodeId, i64)>, String> {
    if !crate::sql::relation_exists("trompe.skip_requests")? {
        return Ok(Vec::new());
    }
    let rows = crate::sql::rows("SELECT node_id::text, txn::text FROM trompe.skip_requests", &[])?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let node = r.first().cloned().flatten()?.parse::<NodeId>().ok()?;
            let txn = r.get(1).cloned().flatten()?.parse::<i64>().ok()?;
            Some((node, txn))
        })
        .collect())
}

/// Sets aside the transaction of peer `peer` that keeps failing to apply (the one named in
/// `trompe.status.last_error`): the worker keeps it in `trompe.exceptions` with its error and
/// every change, and goes on with the next. `txn`, if given, must be that transaction. Returns
/// the transaction to be set aside.
#[pg_extern(volatile, parallel_unsafe)]
fn skip(peer: &str, txn: default!(Option<i64>, "NULL")) -> i64 {
    request_skip(peer, txn).or_raise()
}

fn request_skip(peer: &str, txn: Option<i64>) -> Result<i64, TrompeError> {
    let node = as_extension_owner(|| {
        crate::sql::value("SELECT node_id::text FROM trompe.peers WHERE name = $1", &[Some(peer)])
    })
    .map_err(TrompeError::Internal)?
    .and_then(|n| n.parse::<NodeId>().ok())
    .ok_or_else(|| TrompeError::NoSuchPeer(peer.to_string()))?;
    let shared = crate::shmem::shared().ok_or(TrompeError::NotPreloaded)?;
    // SAFETY: MyDatabaseId is a backend-local global.
    let dboid = unsafe { pg_sys::MyDatabaseId };
    let failing = shared.find_peer_slot(dboid, &node.0).map_or(0, |s| s.failing_txn.load(Ordering::Acquire));
    if failing == 0 {
        return Err(TrompeError::NothingToSkip(peer.to_string()));
    }
    if let Some(txn) = txn.filter(|t| *t != failing) {
        return Err(TrompeError::NotTheFailingTransaction { peer: peer.to_string(), txn, failing });
    }
    as_extension_owner(|| {
        crate::sql::execute(
            "INSERT INTO trompe.skip_requests (node_id, txn) VALUES ($1::uuid, $2::bigint)
             ON CONFLICT (node_id) DO UPDATE SET txn = EXCLUDED.txn, requested_at = now()",
            &[Some(&node.to_string()), Some(&failing.to_string())],
        )
    })
    .map_err(TrompeError::Internal)?;
    crate::worker::control::wake_worker_on_commit();
    Ok(failing)
}
