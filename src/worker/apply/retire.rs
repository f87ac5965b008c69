//! Rows removed by a unique collision, removed everywhere with a version of their own.
//!
//! When an incoming row loses a collision on a secondary unique constraint against a
//! higher-ranked local row (`rows::unique::retire_incoming`), this node treats it as written and at
//! once removed; when it wins, the local row it collides with is removed (`rows::unique::resolve_unique`).
//! Every node must remove that row too, also those where the two rows never meet (one of them
//! moved on there). The removal cannot be logged by the apply transaction itself: that
//! transaction commits with the incoming row's commit time (it carries the peer's version),
//! so peers would see a delete exactly as old as the incoming row, with this node's id, which
//! need not rank above the removed row (a retired row wins against it wherever the retiring
//! node's id sorts lower than the row's origin). So the apply transaction only queues
//! the key (`trompe.retirements`, written with the key's tombstone, same xmin), and the worker
//! then logs the delete in a transaction of this node, after the apply, that commits once its
//! version ranks above the tombstone's (capture's commit wait): that delete wins on every node,
//! and the tombstone here moves to its version so this node decides later changes as its peers
//! do. The queue is durable, so a
//! crash between the two transactions loses nothing: the worker drains it when it starts.
//!
//! A local insert of the same key must not commit between the worker's check that the key has
//! no row and the commit of its delete: peers would get the insert, then the newer delete,
//! while this node keeps the row. Local inserts of a key that has a tombstone read it FOR KEY
//! SHARE (capture's commit wait needs its version anyway), and the worker locks the tombstone
//! FOR UPDATE SKIP LOCKED: a key an open insert holds stays queued for the next round (it then
//! has a row and needs nothing), and an insert that comes while the worker holds the key waits
//! and commits after the delete, newer than it.

use pgrx::pg_sys;
use trompe_core::pgarray::{format_text_array, parse_text_array};

use super::error::ApplyError;
use super::retire_queue::{mark_queued, queue_exists, take_queued};
use super::rows::row_exists;
use super::table::ApplyCache;
use crate::capture::version::version_of;

/// Logs the removals queued by committed apply transactions, in a transaction of this node
/// (called by the worker outside any batch, with no replication origin set up). A failure is
/// reported and retried at the next call.
pub fn log_queued(cache: &mut ApplyCache) {
    if !take_queued() {
        return;
    }
    let result = crate::worker::txn::in_transaction(|| {
        crate::worker::progress::take_apply_lock();
        cache.begin_transaction();
        // SAFETY: SPI is connected for the statements below (the apply path's kept plans
        // need it) and finished before the commit; an error aborts, which cleans SPI up.
        unsafe { pg_sys::SPI_connect() };
        let logged = drain(cache).map_err(|e| e.to_string())?;
        // SAFETY: pairs with SPI_connect above.
        unsafe { pg_sys::SPI_finish() };
        Ok(logged)
    });
    match result {
        Ok(0) => {}
        Ok(_) => crate::shmem::tombstones_changed(),
        Err(e) => {
            mark_queued();
            pgrx::log!("trompe: logging rows retired by a unique collision failed (will retry): {e}");
        }
    }
}

/// Works through the queue; returns how many removals it logged. Keys a local insert holds
/// (its transaction has the tombstone locked) stay queued and are looked at again later.
fn drain(cache: &mut ApplyCache) -> Result<usize, ApplyError> {
    if !queue_exists().map_err(ApplyError::Postgres)? {
        return Ok(0);
    }
    // Only keys still holding the retirement's own tombstone (same xmin) need logging: a newer
    // delete has rewritten the others, or their table is gone (cleared below).
    let queued = crate::sql::rows(
        "SELECT n.nspname, c.relname, r.key::text, t.xmin::text
           FROM trompe.retirements r
           JOIN trompe.tombstones t ON t.relid = r.relid AND t.key = r.key AND t.xmin = r.xmin
           JOIN pg_catalog.pg_class c ON c.oid = r.relid
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
            FOR UPDATE OF t SKIP LOCKED",
        &[],
    )
    .map_err(ApplyError::Postgres)?;
    let mut logged = 0;
    let mut done: Vec<(String, String)> = Vec::with_capacity(queued.len());
    for q in &queued {
        let [Some(nsp), Some(rel), Some(key), Some(xmin)] = &q[..] else { continue };
        let table = cache.table(nsp, rel)?;
        done.push((table.relid.to_u32().to_string(), key.clone()));
        let keys = parse_text_array(key).map_err(|e| ApplyError::Postgres(e.to_string()))?;
        let keys: Vec<Option<&str>> = keys.iter().map(|k| k.as_deref()).collect();
        // A row with the key now is newer than the retired one and replaces it everywhere.
        if !table.replicated || row_exists(cache, &table, &keys)? {
            continue;
        }
        let Ok(xmin) = xmin.parse::<u32>() else { continue };
        let retired = version_of(pg_sys::TransactionId::from(xmin));
        // This transaction's version must rank above the tombstone's (a peer whose clock runs
        // ahead may have written it "in the future", or the rule may need the next window):
        // commit waits for it if needed.
        crate::capture::local_writes::replaced(&table.ranking, retired);
        crate::capture::row::log_delete(nsp, rel, &table.key, &keys, retired)
            .map_err(|e| ApplyError::Postgres(e.to_string()))?;
        crate::sql::execute(
            "UPDATE trompe.tombstones SET key = key WHERE relid = $1::oid AND key = $2::text[]",
            &[Some(&table.relid.to_u32().to_string()), Some(key)],
        )
        .map_err(ApplyError::Postgres)?;
        logged += 1;
    }
    let relids: Vec<Option<&str>> = done.iter().map(|(r, _)| Some(r.as_str())).collect();
    let keys: Vec<Option<&str>> = done.iter().map(|(_, k)| Some(k.as_str())).collect();
    crate::sql::execute(
        "WITH done AS (SELECT d.relid::oid AS relid, d.key::text[] AS key
                         FROM unnest($1::text[], $2::text[]) AS d(relid, key))
         DELETE FROM trompe.retirements r
          WHERE (r.relid, r.key) IN (SELECT relid, key FROM done)
             OR NOT EXISTS (SELECT 1 FROM trompe.tombstones t
                             WHERE t.relid = r.relid AND t.key = r.key AND t.xmin = r.xmin)
             OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = r.relid)",
        &[Some(&format_text_array(&relids)), Some(&format_text_array(&keys))],
    )
    .map_err(ApplyError::Postgres)?;
    if crate::sql::flag("SELECT EXISTS (SELECT 1 FROM trompe.retirements)", &[]).map_err(ApplyError::Postgres)? {
        mark_queued();
    }
    Ok(logged)
}
