//! What local writes do for conflict resolution:
//!
//! - a deleted row leaves a tombstone, a truncated table a truncation marker (written at
//!   commit, in bulk), so that an older change arriving later from a peer does not bring rows
//!   back;
//! - a transaction waits before committing until its version ranks above every version it
//!   replaces under the table's rule: past a version committed "in the future" by its clock (a
//!   row last written by a peer whose clock runs ahead, or a key deleted there), and under
//!   `first_update_wins` or `node_priority` past the window of a higher-ranked version (a
//!   truncation, past the window of every row it removes). Without this, a node could keep a
//!   local write that every other node rejects.

use std::cell::RefCell;
use std::collections::HashMap;

use pgrx::pg_sys;
use trompe_core::changeset::OldVersion;
use trompe_core::conflict::{commit_wait_needed, Ranking, Version};
use trompe_core::pgarray::format_text_array;

use crate::capture::buffer::nest_level;
use crate::capture::version::version_of;
use crate::error::TrompeError;
use crate::run_as::as_extension_owner;

#[derive(Default)]
struct Pending {
    /// The newest commit time this transaction replaces.
    max_replaced: i64,
    /// The earliest commit time at which this transaction's version ranks above every version
    /// it replaces (under each table's rule).
    commit_after: i64,
    /// Keys deleted, by table (text[] literals), with the (sub)transaction nesting level that
    /// deleted them.
    deleted: HashMap<pg_sys::Oid, Vec<(usize, String)>>,
    /// Tables truncated, with the nesting level.
    truncated: Vec<(usize, pg_sys::Oid)>,
    /// The tombstone generation when this transaction first inserted a row of a replicated
    /// table: tombstones committed (or announced) by peers' transactions since then may be of
    /// its keys.
    inserted_at_generation: Option<u64>,
}

/// What capture knows about a table's tombstones: (tombstone generation it was read at,
/// whether the table has tombstones, the version of its last truncation).
type CachedGuards = (u64, bool, Option<Version>);

thread_local! {
    static PENDING: RefCell<Pending> = RefCell::new(Pending::default());
    /// Per table: what was read about its tombstones and truncation.
    static GUARDS: RefCell<HashMap<pg_sys::Oid, CachedGuards>> = RefCell::new(HashMap::new());
}

fn note_replaced(ranking: &Ranking, old: OldVersion) {
    if let OldVersion::Committed { ts, node } = old {
        let writer = crate::capture::version::local_node().unwrap_or_default();
        let after = ranking.earliest_commit_above(writer, Version { ts, node });
        PENDING.with(|p| {
            let mut p = p.borrow_mut();
            p.max_replaced = p.max_replaced.max(ts);
            p.commit_after = p.commit_after.max(after);
        });
    }
}

/// An update or delete replaced the row version `old` of a table whose versions rank by
/// `ranking`.
pub fn replaced(ranking: &Ranking, old: OldVersion) {
    note_replaced(ranking, old);
}

/// What table `relid` has of tombstones and truncation, read again whenever a transaction may
/// have committed some since (writers announce themselves before they commit): a missed
/// tombstone would skip the commit wait, which `first_update_wins` and `node_priority` need.
fn guards_of(relid: pg_sys::Oid) -> Result<(bool, Option<Version>), TrompeError> {
    let generation = crate::shmem::tombstone_generation();
    if let Some((g, tombstones, truncated)) = GUARDS.with(|c| c.borrow().get(&relid).copied()) {
        if g == crate::shmem::tombstone_writers() {
            return Ok((tombstones, truncated));
        }
    }
    let (truncation, tombstones) = crate::conflicts::table_markers(relid).map_err(TrompeError::Internal)?;
    let truncated = truncation.and_then(|xmin| match version_of(xmin) {
        OldVersion::Committed { ts, node } => Some(Version { ts, node }),
        _ => None,
    });
    GUARDS.with(|c| c.borrow_mut().insert(relid, (generation, tombstones, truncated)));
    Ok((tombstones, truncated))
}

/// An insert of `key` in a table whose versions rank by `ranking`: it replaces the key's
/// tombstone and the table's truncation, if any. `key` is computed only when the table has
/// tombstones.
pub fn inserted(
    relid: pg_sys::Oid,
    ranking: &Ranking,
    key: impl FnOnce() -> Vec<Option<String>>,
) -> Result<(), TrompeError> {
    PENDING.with(|p| {
        p.borrow_mut().inserted_at_generation.get_or_insert_with(crate::shmem::tombstone_generation);
    });
    let (tombstones, truncated) = guards_of(relid)?;
    if let Some(t) = truncated {
        note_replaced(ranking, OldVersion::Committed { ts: t.ts, node: t.node });
    }
    if tombstones {
        let key = key();
        let refs: Vec<Option<&str>> = key.iter().map(|k| k.as_deref()).collect();
        if let Some(xmin) = crate::conflicts::tombstone_writer(relid, &refs, true).map_err(TrompeError::Internal)? {
            note_replaced(ranking, version_of(xmin));
        }
    }
    Ok(())
}

/// A delete of `key` (its values as text, in primary key order).
pub fn deleted(relid: pg_sys::Oid, key: Vec<Option<String>>) {
    let refs: Vec<Option<&str>> = key.iter().map(|k| k.as_deref()).collect();
    let literal = format_text_array(&refs);
    let level = nest_level();
    PENDING.with(|p| p.borrow_mut().deleted.entry(relid).or_default().push((level, literal)));
}

/// A truncation of table `relid`.
pub fn truncated(relid: pg_sys::Oid, ranking: &Ranking) {
    // It must rank above every row it removes (under a windowed rule, it commits in the next
    // window), also rows of peers whose clocks run ahead of this node's.
    // SAFETY: reads the clock as PostgreSQL timestamps it.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    let newest_applied = crate::shmem::newest_applied_commit();
    let after = ranking.earliest_commit_above_all_until(now.max(newest_applied + 1));
    let level = nest_level();
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        p.max_replaced = p.max_replaced.max(newest_applied);
        p.commit_after = p.commit_after.max(after);
        p.truncated.push((level, relid));
    });
}

/// A subtransaction ended: its deletes and truncations become its parent's, or are forgotten
/// with it (a rolled-back savepoint leaves no tombstone or truncation marker).
pub fn end_subtransaction(committed: bool) {
    let depth = nest_level();
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        if committed {
            for (level, _) in p.deleted.values_mut().flatten() {
                *level = (*level).min(depth - 1);
            }
            for (level, _) in p.truncated.iter_mut() {
                *level = (*level).min(depth - 1);
            }
        } else {
            for keys in p.deleted.values_mut() {
                keys.retain(|(level, _)| *level < depth);
            }
            p.deleted.retain(|_, keys| !keys.is_empty());
            p.truncated.retain(|(level, _)| *level < depth);
        }
    });
}

/// At commit: writes tombstones and truncation markers, then waits until this node's clock
/// has passed every version the transaction replaced. A transaction that inserted rows while
/// a peer's transaction wrote tombstones or truncation markers (which may be of its keys, and
/// which it did not see when it inserted) commits after every version applied here, so that
/// its rows rank above them as they do on the peers.
pub fn pre_commit() -> Result<(), TrompeError> {
    let mut pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    if !pending.deleted.is_empty() || !pending.truncated.is_empty() {
        write_markers(&pending)?;
    }
    let Some(mut seen) = pending.inserted_at_generation else {
        return wait_for_clock(pending.max_replaced, pending.commit_after);
    };
    // Until no tombstone writer announced itself while waiting (at most a few rounds, each
    // bounded by the clock skew): the last look is the last thing before the commit record,
    // so a peer's delete applied from then on finds this transaction's rows once they are
    // visible, or ranks below them.
    for _ in 0..COMMIT_WAIT_ROUNDS {
        let writers = crate::shmem::tombstone_writers();
        if writers != seen {
            let newest_applied = crate::shmem::newest_applied_since_start();
            pending.max_replaced = pending.max_replaced.max(newest_applied);
            pending.commit_after = pending.commit_after.max(newest_applied + 1);
        }
        wait_for_clock(pending.max_replaced, pending.commit_after)?;
        if crate::shmem::tombstone_writers() == writers {
            return Ok(());
        }
        seen = writers;
    }
    Ok(())
}

/// How many times a transaction that inserted rows looks again for peers' tombstone writers
/// that announced themselves while it waited for its commit time.
const COMMIT_WAIT_ROUNDS: usize = 3;

fn write_markers(pending: &Pending) -> Result<(), TrompeError> {
    struct Snapshot;
    impl Drop for Snapshot {
        fn drop(&mut self) {
            // SAFETY: pops the snapshot pushed below.
            unsafe { pg_sys::PopActiveSnapshot() };
        }
    }
    // SAFETY: commit-time work still runs inside the transaction; SQL needs an active
    // snapshot, which is popped again by the guard.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    let _snapshot = Snapshot;
    let result = as_extension_owner(|| -> Result<(), String> {
        for (_, relid) in &pending.truncated {
            let relid = relid.to_u32().to_string();
            crate::sql::execute(
                "INSERT INTO trompe.truncations (relid) VALUES ($1::oid)
                 ON CONFLICT (relid) DO UPDATE SET relid = EXCLUDED.relid",
                &[Some(&relid)],
            )?;
            crate::sql::execute("DELETE FROM trompe.tombstones WHERE relid = $1::oid", &[Some(&relid)])?;
        }
        // A key deleted twice in one transaction (deleted, inserted again, deleted) is listed
        // twice; one statement may not upsert the same tombstone twice.
        for (relid, keys) in &pending.deleted {
            let literals: Vec<Option<&str>> = keys.iter().map(|(_, k)| Some(k.as_str())).collect();
            let list = format_text_array(&literals);
            crate::sql::execute(
                "INSERT INTO trompe.tombstones (relid, key)
                 SELECT DISTINCT $1::oid, k::text[] FROM unnest($2::text[]) AS k
                 ON CONFLICT (relid, key) DO UPDATE SET key = EXCLUDED.key",
                &[Some(&relid.to_u32().to_string()), Some(&list)],
            )?;
        }
        Ok(())
    });
    result.map_err(TrompeError::Internal)?;
    crate::marker_writes::note_markers_written();
    Ok(())
}

fn wait_for_clock(max_replaced: i64, commit_after: i64) -> Result<(), TrompeError> {
    if commit_after == 0 {
        return Ok(());
    }
    // SAFETY: reads the clock as PostgreSQL timestamps it.
    let now = || unsafe { pg_sys::GetCurrentTimestamp() };
    if commit_after <= now() {
        return Ok(());
    }
    // A replaced version "in the future" by more than the allowed skew is a clock problem;
    // waiting for a rule's next window is not.
    let limit_us = crate::guc::MAX_CLOCK_SKEW_MS.get() as i64 * 1000;
    let ahead = commit_wait_needed(max_replaced, now());
    if ahead > limit_us {
        return Err(TrompeError::ClockSkew { ahead_ms: ahead / 1000 });
    }
    while commit_after > now() {
        // SAFETY: sleeping in small steps, answering cancel and termination in between.
        unsafe { pg_sys::pg_usleep((commit_after - now()).clamp(1, 10_000) as std::ffi::c_long) };
        pgrx::check_for_interrupts!();
    }
    Ok(())
}

/// Forgets everything (the transaction ended).
pub fn end_of_transaction() {
    PENDING.with(|p| *p.borrow_mut() = Pending::default());
}
