//! Rows retired by a unique collision, removed everywhere with a version of their own.
//!
//! When an incoming row loses a collision on a secondary unique constraint against a newer
//! local row (`rows::retire_incoming`), this node treats it as written and at once removed,
//! and every node must remove it too, also those where the two rows never meet (the winner
//! moved on there). The removal cannot be logged by the apply transaction itself: that
//! transaction commits with the retired row's own commit time (it carries the peer's version),
//! so peers would see a delete exactly as old as the row, which loses to it wherever the
//! retiring node's id sorts lower than the row's origin. So the apply transaction only queues
//! the key (`trompe.retirements`, written with the key's tombstone, same xmin), and the worker
//! then logs the delete in a transaction of this node, after the apply, whose commit time is
//! later than the row's: that delete wins on every node, and the tombstone here moves to its
//! version so this node decides later changes as its peers do. The queue is durable, so a
//! crash between the two transactions loses nothing: the worker drains it when it starts.

use std::cell::Cell;

use pgrx::pg_sys;
use trompe_core::pgarray::{format_text_array, parse_text_array};

use super::rows::row_exists;
use super::table::{ApplyCache, Table};
use super::ApplyError;
use crate::capture::version::version_of;

thread_local! {
    /// Whether the queue may hold keys: true at start, so keys left by a crash are logged.
    static QUEUED: Cell<bool> = const { Cell::new(true) };
}

/// Whether this database's schema has the queue (0.4.0 and later).
fn queue_exists() -> Result<bool, String> {
    crate::sql::flag("SELECT to_regclass('trompe.retirements') IS NOT NULL", &[])
}

/// Inside the apply transaction that retired the row with `keys` of `table` (and wrote its
/// tombstone): queues its removal. Returns false if the schema predates the queue; the caller
/// then logs the removal in the apply transaction, as 0.3.0 did.
pub(super) fn queue(table: &Table, keys: &[Option<&str>]) -> Result<bool, ApplyError> {
    if !queue_exists().map_err(ApplyError::Postgres)? {
        return Ok(false);
    }
    crate::sql::execute(
        "INSERT INTO trompe.retirements (relid, key) VALUES ($1::oid, $2::text[])
         ON CONFLICT (relid, key) DO UPDATE SET key = EXCLUDED.key",
        &[Some(&table.relid.to_u32().to_string()), Some(&format_text_array(keys))],
    )
    .map_err(ApplyError::Postgres)?;
    QUEUED.set(true);
    Ok(true)
}

/// Logs the removals queued by committed apply transactions, in a transaction of this node
/// (called by the worker outside any batch, with no replication origin set up). A failure is
/// reported and retried at the next call.
pub fn log_queued(cache: &mut ApplyCache) {
    if !QUEUED.replace(false) {
        return;
    }
    let result = crate::worker::txn::in_transaction(|| {
        crate::worker::progress::take_apply_lock();
        cache.purge_stale();
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
            QUEUED.set(true);
            pgrx::log!("trompe: logging rows retired by a unique collision failed (will retry): {e}");
        }
    }
}

/// Empties the queue; returns how many removals it logged.
fn drain(cache: &mut ApplyCache) -> Result<usize, ApplyError> {
    if !queue_exists().map_err(ApplyError::Postgres)? {
        return Ok(0);
    }
    // Taken off the queue at once. A key whose tombstone another transaction has rewritten
    // since (a newer delete) or whose table is gone needs nothing: only keys still holding the
    // retirement's own tombstone (same xmin) are logged.
    let queued = crate::sql::rows(
        "WITH taken AS (DELETE FROM trompe.retirements RETURNING relid, key, xmin)
         SELECT n.nspname, c.relname, taken.key::text, t.xmin::text
           FROM taken
           JOIN trompe.tombstones t ON t.relid = taken.relid AND t.key = taken.key AND t.xmin = taken.xmin
           JOIN pg_catalog.pg_class c ON c.oid = taken.relid
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
            FOR UPDATE OF t",
        &[],
    )
    .map_err(ApplyError::Postgres)?;
    let mut logged = 0;
    for q in &queued {
        let [Some(nsp), Some(rel), Some(key), Some(xmin)] = &q[..] else { continue };
        let table = cache.table(nsp, rel)?;
        let keys = parse_text_array(key).map_err(|e| ApplyError::Postgres(e.to_string()))?;
        let keys: Vec<Option<&str>> = keys.iter().map(|k| k.as_deref()).collect();
        // A row with the key now is newer than the retired one and replaces it everywhere.
        if !table.replicated || row_exists(cache, &table, &keys)? {
            continue;
        }
        let Ok(xmin) = xmin.parse::<u32>() else { continue };
        let retired = version_of(pg_sys::TransactionId::from(xmin));
        // This transaction's version must be newer than the retired row's (a peer whose clock
        // runs ahead may have written it "in the future"): commit waits for it if needed.
        crate::capture::guard::replaced(retired);
        crate::capture::row::log_delete(nsp, rel, &table.key, &keys, retired)
            .map_err(|e| ApplyError::Postgres(e.to_string()))?;
        crate::sql::execute(
            "UPDATE trompe.tombstones SET key = key WHERE relid = $1::oid AND key = $2::text[]",
            &[Some(&table.relid.to_u32().to_string()), Some(key)],
        )
        .map_err(ApplyError::Postgres)?;
        logged += 1;
    }
    Ok(logged)
}
