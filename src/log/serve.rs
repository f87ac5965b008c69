//! Serving the log: the SQL functions a peer calls over libpq to register itself as a
//! consumer of this node's log and to pull it.
//!
//! A pull reads one "step" of the log: the transactions that a snapshot `cur` of this node sees
//! and the consumer's position `done` does not. Transactions are returned whole, ordered by the
//! id of their last change (a transaction that depends on another always ends after it), so a
//! consumer can apply them one by one with the origin's transaction boundaries. A transaction
//! that commits late is in a later step, never skipped. When nothing is new, the pull waits
//! (up to `wait_ms`) for a commit that wrote to the log, so changes arrive without polling.

use std::cell::RefCell;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgrx::prelude::*;
use trompe_core::snapshot::Snapshot;

use crate::error::{OrRaise, TrompeError};
use crate::run_as::as_extension_owner;
use crate::shmem;

/// One transaction of a step in 16 bytes (a step after a long outage holds millions): the id of
/// its last log row (written at its commit), its id as an offset from the step's base, and how
/// many changes it has (saturating at u32::MAX: only counts and batch sizes read it).
#[derive(Clone, Copy, Debug)]
struct StepTxn {
    last_id: i64,
    txid_offset: u32,
    changes: u32,
}

/// The transactions of a step, ordered by their last change.
#[derive(Default)]
struct StepTxns {
    /// No transaction of the step has a lower id: the position's oldest in-progress one, or
    /// its xmax (a snapshot's ids span less than 2^31).
    base: u64,
    txns: Vec<StepTxn>,
}

impl StepTxns {
    fn txid(&self, t: &StepTxn) -> u64 {
        self.base + t.txid_offset as u64
    }
}

/// The transactions of the step being read by this session's consumer, computed once per step.
struct StepCache {
    done: String,
    cur: String,
    txns: StepTxns,
}

thread_local! {
    static STEP: RefCell<Option<StepCache>> = const { RefCell::new(None) };
    /// When this session last wrote the consumer's confirmed position, and what it wrote.
    static CONFIRMED: RefCell<Option<(Instant, String)>> = const { RefCell::new(None) };
    /// The position (done, step) this session checked last against this node's snapshot.
    static SERVED: RefCell<Option<(String, Option<String>)>> = const { RefCell::new(None) };
}

fn parse_snapshot(text: &str, what: &str) -> Snapshot {
    text.parse::<Snapshot>().map_err(|e| TrompeError::BadRequest(format!("{what}: {e}"))).or_raise()
}

/// The current snapshot of this node, taken now (a fresh snapshot, not the statement's), for a
/// peer to keep as a position: every transaction that ended before it is on disk first (see
/// `flush_ended_transactions`).
fn snapshot_now() -> String {
    let snapshot =
        crate::sql::snapshot_now().map(|s| s.to_string()).unwrap_or_else(|e| TrompeError::Internal(e).raise());
    flush_ended_transactions();
    snapshot
}

/// Flushes this node's WAL up to where it is now, so that every transaction a snapshot taken
/// before counts as ended has its commit (or abort) record on disk.
///
/// A peer keeps such a snapshot as its position and from then on treats every transaction id
/// below its `xmax` (and not in its `xip`) as seen. The records of asynchronous commits
/// (trompe's own apply and pull sessions commit so) and of aborts reach the disk only later;
/// a crash (kill -9) before that loses them, PostgreSQL then gives their transaction ids out
/// again, and a peer would skip for good the new transactions that got them. PostgreSQL's own
/// logical replication sends only flushed WAL for the same reason. A no-op when the WAL is
/// flushed already, which it mostly is: any synchronous commit flushes everything before it.
fn flush_ended_transactions() {
    // SAFETY: plain calls in a backend: reading the WAL insert position and the segment size,
    // then flushing up to the end of what was inserted (XLogFlush waits for insertions in
    // progress before that position).
    unsafe {
        let end = trompe_core::walpos::end_of_inserted(
            pg_sys::GetXLogInsertRecPtr(),
            u64::from(pg_sys::XLOG_BLCKSZ),
            u64::try_from(pg_sys::wal_segment_size).unwrap_or(0),
        );
        pg_sys::XLogFlush(end)
    };
}

/// An `xid8[]` literal.
fn xid_array(xids: &[u64]) -> String {
    let items: Vec<String> = xids.iter().map(u64::to_string).collect();
    format!("{{{}}}", items.join(","))
}

/// Turns parallel workers and JIT compilation off until the calling function (or transaction)
/// ends: reading the log means a few index ranges, but estimates on a freshly filled log
/// (no statistics) planned parallel workers (tens of milliseconds to start) and JIT
/// compilation (10 ms, and two thirds of the origin's CPU time during a catch-up when every
/// pull of a step compiled the statement that returns its rows). Cursors (`sql::for_each_row`)
/// read every row: planned for all of them, not for a fast start.
fn plain_reads() {
    crate::sql::execute(
        "SELECT pg_catalog.set_config('max_parallel_workers_per_gather', '0', true),
                pg_catalog.set_config('jit', 'off', true),
                pg_catalog.set_config('cursor_tuple_fraction', '1', true)",
        &[],
    )
    .map_err(|e| TrompeError::Internal(format!("reading the log: {e}")))
    .or_raise();
}

/// Lists the transactions in the step `(done, cur]`, ordered by their last change. They are
/// read through a cursor into 16 bytes each: the query's rows are never all held at once.
fn step_transactions(done: &Snapshot, cur: &Snapshot) -> StepTxns {
    // A step is one range of transaction ids plus a few ids. The planner has no statistics on
    // a freshly filled log: written as `(txid >= a OR txid = ANY(..)) AND txid < b` it expected
    // a third of a 100,000-transaction log and planned parallel workers or a sequential scan
    // of the whole log. As a closed range and a list, it expects fewer rows and reads them
    // through the index. Callers have made reads plain (`plain_reads`).
    let base = done.xip.iter().copied().chain([done.xmax]).min().unwrap_or(done.xmax);
    let mut step = StepTxns { base, txns: Vec::new() };
    let log = super::rows_sql("txid, id, nchanges");
    crate::sql::for_each_row(
        &format!(
            "SELECT txid, max(id), sum(nchanges) FROM (
                 SELECT txid, id, nchanges FROM {log} l WHERE txid >= $1::xid8 AND txid < $3::xid8
                 UNION ALL
                 SELECT txid, id, nchanges FROM {log} l WHERE txid = ANY($2::xid8[]) AND txid < $1::xid8
             ) step
              WHERE txid <> ALL($4::xid8[]) AND txid < $3::xid8
              GROUP BY txid ORDER BY max(id)"
        ),
        &[
            Some(&done.xmax.to_string()),
            Some(&xid_array(&done.xip)),
            Some(&cur.xmax.to_string()),
            Some(&xid_array(&cur.xip)),
        ],
        10_000,
        |r| {
            let num = |i: usize| r.get(i).copied().flatten().and_then(|t| t.parse::<i64>().ok()).unwrap_or(0);
            let txid: u64 = r.first().copied().flatten().and_then(|t| t.parse().ok()).unwrap_or(0);
            let txid_offset = txid
                .checked_sub(base)
                .and_then(|o| u32::try_from(o).ok())
                .ok_or_else(|| format!("transaction {txid} is outside the step from {base}"))?;
            step.txns.push(StepTxn {
                last_id: num(1),
                txid_offset,
                changes: u32::try_from(num(2).max(0)).unwrap_or(u32::MAX),
            });
            Ok(())
        },
    )
    .map_err(|e| TrompeError::Internal(format!("reading the log: {e}")))
    .or_raise();
    step.txns.shrink_to_fit();
    step
}

/// The commit time of a transaction (microseconds since 2000-01-01, PostgreSQL's
/// TimestampTz), if commit timestamps are tracked.
pub fn commit_time(txid: u64) -> Option<i64> {
    let xid = pg_sys::TransactionId::from((txid & 0xffff_ffff) as u32);
    let mut ts: pg_sys::TimestampTz = 0;
    let mut origin: pg_sys::RepOriginId = 0;
    // SAFETY: looks up the commit timestamp SLRU; returns false if unknown.
    let found = unsafe { pg_sys::TransactionIdGetCommitTsData(xid, &mut ts, &mut origin) };
    found.then_some(ts)
}

/// Checks that `consumer` is registered, that the session's login may pull as it (see
/// `consumers`), and that its position is one this node served (not ahead of this node's current
/// snapshot) and not older than what it confirmed (a consumer restored from a backup: the log it
/// needs may be gone); then records the position it confirmed as applied (in shared memory; the
/// worker saves it to `trompe.consumers`). A confirmed position ahead of the consumer's own
/// position is refused; one older than what it confirmed before is ignored (positions never go
/// back). Returns true if the registration was bound to the session's login now: the pull then
/// does not wait for news, so as not to hold the row lock of that write.
fn check_consumer(consumer: pgrx::Uuid, done: &Snapshot, cur: Option<&Snapshot>, confirmed: Option<&str>) -> bool {
    crate::node::refuse_serving_in_copy().or_raise();
    let consumer_text = consumer.to_string();
    let Some(reg) = crate::consumers::authorized(&consumer_text, crate::consumers::Act::Bind).or_raise() else {
        TrompeError::NotAConsumer(consumer_text).raise();
    };
    if let Some(reason) = reg.lost {
        TrompeError::ConsumerLost { node: consumer_text, reason }.raise();
    }
    let id: [u8; 16] = *consumer.as_bytes();
    let stored = crate::consumers::effective_confirmed(&id, &reg.confirmed);
    let stored_snap = stored.parse::<Snapshot>().ok();
    if let Some(stored_snap) = &stored_snap {
        if !done.covers(stored_snap) {
            TrompeError::PositionRegressed(consumer.to_string()).raise();
        }
    }
    check_served(done, cur);
    let Some(confirmed) = confirmed.filter(|c| *c != stored) else {
        return reg.bound_now;
    };
    let confirmed_snap = parse_snapshot(confirmed, "confirmed");
    if !done.covers(&confirmed_snap) {
        TrompeError::BadRequest(format!("confirmed position {confirmed} is ahead of the position {done} pulled from"))
            .raise();
    }
    if stored_snap.as_ref().is_some_and(|s| !confirmed_snap.covers(s)) {
        return reg.bound_now;
    }
    // SAFETY: MyDatabaseId is a backend-local global.
    let dboid = unsafe { pg_sys::MyDatabaseId };
    if shmem::shared().is_some_and(|s| s.set_confirmed(dboid, &id, confirmed)) {
        return reg.bound_now;
    }
    let due = CONFIRMED.with(|c| c.borrow().as_ref().is_none_or(|(at, _)| at.elapsed() >= Duration::from_secs(1)));
    if due {
        crate::sql::execute(
            "UPDATE trompe.consumers SET confirmed = $2, confirmed_at = now() WHERE node_id = $1::uuid",
            &[Some(&consumer_text), Some(confirmed)],
        )
        .map_err(|e| TrompeError::Internal(format!("recording the confirmed position: {e}")))
        .or_raise();
        CONFIRMED.with(|c| *c.borrow_mut() = Some((Instant::now(), confirmed.to_string())));
    }
    reg.bound_now
}

/// Refuses a position (`done`, and the step `cur` in progress) that this node did not serve:
/// one its current snapshot does not cover. Positions checked once are not checked again by
/// this session (a consumer sends the same `done` for every pull of a step).
fn check_served(done: &Snapshot, cur: Option<&Snapshot>) {
    let key = (done.to_string(), cur.map(Snapshot::to_string));
    if SERVED.with(|s| s.borrow().as_ref() == Some(&key)) {
        return;
    }
    let now = crate::sql::snapshot_now().map_err(TrompeError::Internal).or_raise();
    for (what, snapshot) in [("position", Some(done)), ("step", cur)] {
        if let Some(snapshot) = snapshot {
            if !now.covers(snapshot) {
                TrompeError::BadRequest(format!("{what} {snapshot} is ahead of this node ({now})")).raise();
            }
        }
    }
    SERVED.with(|s| *s.borrow_mut() = Some(key));
}

/// Waits up to `wait_ms` for a commit that wrote to this database's log, unless the commit
/// counter already differs from `seen`. Returns the counter value (read before any snapshot is
/// taken, so a commit after it is noticed by the next pull).
fn wait_for_commit(seen: i64, wait_ms: i32) -> i64 {
    let Some(shared) = shmem::shared() else {
        return -1;
    };
    // SAFETY: MyDatabaseId is a backend-local global.
    let Some(slot) = shared.db_slot_or_new(unsafe { pg_sys::MyDatabaseId }) else {
        return -1;
    };
    let counter = || slot.log_commits.load(Ordering::Acquire) as i64;
    if counter() != seen || wait_ms <= 0 {
        return counter();
    }
    let deadline = Instant::now() + Duration::from_millis(wait_ms as u64);
    let cv = &shared.log_commit_cv as *const pg_sys::ConditionVariable as *mut pg_sys::ConditionVariable;
    // SAFETY: the condition variable lives in shared memory; prepare/sleep/cancel are paired.
    unsafe {
        pg_sys::ConditionVariablePrepareToSleep(cv);
        while counter() == seen {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if pg_sys::ConditionVariableTimedSleep(
                cv,
                left.as_millis().max(1) as std::ffi::c_long,
                pg_sys::PG_WAIT_EXTENSION,
            ) {
                break;
            }
        }
        pg_sys::ConditionVariableCancelSleep();
    }
    counter()
}

/// Plans one pull (called by `trompe.pull`): waits for news if there is none, fixes the step,
/// and picks the next whole transactions of it, about `max_rows` changes.
// pgrx needs the row type spelled out here (no type alias), hence the complex type.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
#[pg_extern(volatile, parallel_unsafe)]
fn _pull_plan(
    consumer: pgrx::Uuid,
    done: &str,
    cur: Option<&str>,
    after: i64,
    max_rows: i32,
    wait_ms: i32,
    seen: i64,
    confirmed: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(cur, Option<String>),
        name!(complete, bool),
        name!(commits, i64),
        name!(pending, i64),
        name!(oldest_commit_us, Option<i64>),
        name!(txids, Vec<String>),
        name!(last_ids, Vec<i64>),
        name!(commit_us, Vec<Option<i64>>),
    ),
> {
    // For the rest of trompe.pull too, which returns the rows this plan chooses.
    plain_reads();
    let done_snap = parse_snapshot(done, "done");
    let given_cur = cur.map(|c| parse_snapshot(c, "cur"));
    let bound_now = as_extension_owner(|| check_consumer(consumer, &done_snap, given_cur.as_ref(), confirmed));
    let (cur_text, commits) = match cur {
        Some(c) => (c.to_string(), seen),
        None => {
            let commits = wait_for_commit(seen, if bound_now { 0 } else { wait_ms });
            let now = snapshot_now();
            let now_snap = parse_snapshot(&now, "now");
            match as_extension_owner(|| crate::log::marks::step_end(&done_snap, &now_snap)) {
                // A step that ends before now: the next pull must not wait for news.
                Ok(Some(mark)) => (mark.to_string(), trompe_core::position::STEP_ENDS_BEFORE_NOW),
                Ok(None) => (now, commits),
                Err(e) => TrompeError::Internal(format!("choosing where a step ends: {e}")).raise(),
            }
        }
    };
    let cur_snap = parse_snapshot(&cur_text, "cur");
    if !cur_snap.covers(&done_snap) {
        TrompeError::BadRequest(format!("snapshot {cur_text} is older than position {done}")).raise();
    }
    let cached = STEP.with(|s| s.borrow().as_ref().is_some_and(|c| c.done == done && c.cur == cur_text));
    if !cached {
        let txns = as_extension_owner(|| step_transactions(&done_snap, &cur_snap));
        STEP.with(|s| *s.borrow_mut() = Some(StepCache { done: done.to_string(), cur: cur_text.clone(), txns }));
    }
    // The step's transactions stay in the cache (a step can hold hundreds of thousands, read a
    // batch at a time): only the chosen ones are copied out.
    let (chosen, pending, complete, oldest_txid) = STEP.with(|s| {
        let cache = s.borrow();
        let empty = StepTxns::default();
        let step = cache.as_ref().map_or(&empty, |c| &c.txns);
        let start = step.txns.partition_point(|t| t.last_id <= after);
        let remaining = &step.txns[start..];
        let pending: i64 = remaining.iter().map(|t| t.changes as i64).sum();
        // (txid, last_id) of each transaction chosen.
        let mut chosen: Vec<(u64, i64)> = Vec::new();
        let mut rows = 0i64;
        for t in remaining {
            if !chosen.is_empty() && rows >= max_rows as i64 {
                break;
            }
            rows += t.changes as i64;
            chosen.push((step.txid(t), t.last_id));
        }
        let complete = chosen.len() == remaining.len();
        (chosen, pending, complete, remaining.first().map(|t| step.txid(t)))
    });
    let oldest = oldest_txid.and_then(commit_time);
    let row = (
        Some(cur_text),
        complete,
        commits,
        pending,
        oldest,
        chosen.iter().map(|(txid, _)| txid.to_string()).collect(),
        chosen.iter().map(|(_, last_id)| *last_id).collect(),
        chosen.iter().map(|(txid, _)| commit_time(*txid)).collect(),
    );
    TableIterator::once(row)
}

/// Registers the calling node as a consumer of this node's log (again, if it was), starting at
/// this node's current snapshot. Returns this node's id, that snapshot, and whether commit
/// timestamps are tracked here.
#[pg_extern(volatile, parallel_unsafe)]
fn register_consumer(
    consumer: pgrx::Uuid,
    consumer_name: &str,
) -> TableIterator<'static, (name!(node_id, pgrx::Uuid), name!(snapshot, String), name!(commit_timestamps, bool))> {
    let consumer_text = consumer.to_string();
    let login = crate::consumers::session_login();
    let (node, snapshot) = as_extension_owner(|| {
        let bound = crate::consumers::logins_installed();
        if bound {
            // Under the lock, nothing registers this node meanwhile and nothing is truncated
            // between the snapshot and the registration.
            crate::consumers::lock_registrations().map_err(TrompeError::Internal).or_raise();
            crate::consumers::authorized(&consumer_text, crate::consumers::Act::Bind).or_raise();
        }
        let snapshot = snapshot_now();
        let logins = bound.then(|| trompe_core::pgarray::format_text_array(&[Some(login.as_str())]));
        crate::sql::execute(
            &format!(
                "INSERT INTO trompe.consumers (node_id, name, confirmed{}) VALUES ($1::uuid, $2, $3{})
                 ON CONFLICT (node_id) DO UPDATE SET name = EXCLUDED.name, confirmed = EXCLUDED.confirmed,
                     registered_at = now(), confirmed_at = now(){}",
                if bound { ", logins" } else { "" },
                if bound { ", $4::text[]" } else { "" },
                clear_lost()
            ),
            &[Some(&consumer_text), Some(consumer_name), Some(&snapshot), logins.as_deref()],
        )
        .map_err(|e| TrompeError::Internal(format!("registering consumer: {e}")))
        .or_raise();
        crate::consumers::forget_live_confirmation(&consumer);
        (crate::node::local_node_id(), snapshot)
    });
    let tracked = crate::sql::flag("SELECT current_setting('track_commit_timestamp') = 'on'", &[])
        .map_err(TrompeError::Internal)
        .or_raise();
    TableIterator::once((node, snapshot, tracked))
}

/// What a registration made anew sets besides its position: it is no longer lost (see
/// `log::rotation`), if this schema marks consumers lost.
fn clear_lost() -> &'static str {
    if crate::consumers::lost_installed() {
        ", lost_at = NULL, lost_reason = NULL"
    } else {
        ""
    }
}

/// The position `consumer` has confirmed here (NULL if it is not registered), if the session's
/// login may act for it (`act`).
fn confirmed_position(consumer: &pgrx::Uuid, act: crate::consumers::Act) -> Option<String> {
    let reg = crate::consumers::authorized(&consumer.to_string(), act).or_raise()?;
    Some(crate::consumers::effective_confirmed(consumer.as_bytes(), &reg.confirmed))
}

/// Registers `consumer` as a consumer of this node's log at the position `template` (another
/// consumer) has confirmed: everything after it is kept for `consumer`. A node that a new node
/// copies its data from calls this on each of its peers, so that they keep, for the new node,
/// every change it had not applied yet when the copy was taken. Returns that position.
///
/// Only a login that may act for `template` may call this; the registration it makes has no
/// login (the first login that pulls as `consumer` gets it), unless the new node's claim
/// comes with it (see `register_consumer_from` with four arguments). A registration of
/// `consumer` that has a login already may be changed only by one that may act for it.
#[pg_extern(volatile, parallel_unsafe)]
fn register_consumer_from(consumer: pgrx::Uuid, consumer_name: &str, template: pgrx::Uuid) -> String {
    register_from(consumer, consumer_name, template, None)
}

/// `register_consumer_from` for a new node that gives the SHA-256 (hex) of its secret: only
/// that node (presenting the secret, see `claim_consumer`) or an administrator may act for the
/// registration.
#[pg_extern(name = "register_consumer_from", volatile, parallel_unsafe)]
fn register_consumer_from_claimed(
    consumer: pgrx::Uuid,
    consumer_name: &str,
    template: pgrx::Uuid,
    claim: &str,
) -> String {
    if claim.len() != 64 || !claim.bytes().all(|b| b.is_ascii_hexdigit()) {
        TrompeError::BadRequest("claim: expected a SHA-256 in hex".into()).raise();
    }
    register_from(consumer, consumer_name, template, Some(&claim.to_ascii_lowercase()))
}

fn register_from(consumer: pgrx::Uuid, consumer_name: &str, template: pgrx::Uuid, claim: Option<&str>) -> String {
    use crate::consumers::{authorize, logins_installed, read, Act};
    let node = consumer.to_string();
    let bound = logins_installed();
    let position = as_extension_owner(|| {
        if bound {
            crate::consumers::lock_registrations().map_err(TrompeError::Internal).or_raise();
        }
        let Some(position) = confirmed_position(&template, Act::Bind) else {
            TrompeError::NotAConsumer(template.to_string()).raise();
        };
        let existing = read(&node).or_raise();
        if let Some(reg) = existing.as_ref().filter(|r| !r.unbound) {
            authorize(&node, reg, Act::Use).or_raise();
        }
        let sql = if bound {
            "INSERT INTO trompe.consumers (node_id, name, confirmed, claim) VALUES ($1::uuid, $2, $3, $4)
             ON CONFLICT (node_id) DO UPDATE SET name = EXCLUDED.name, confirmed = EXCLUDED.confirmed,
                 registered_at = now(), confirmed_at = now(),
                 claim = CASE WHEN consumers.logins IS NULL THEN EXCLUDED.claim END"
        } else {
            "INSERT INTO trompe.consumers (node_id, name, confirmed) VALUES ($1::uuid, $2, $3)
             ON CONFLICT (node_id) DO UPDATE SET name = EXCLUDED.name, confirmed = EXCLUDED.confirmed,
                 registered_at = now(), confirmed_at = now()"
        };
        let sql = format!("{sql}{}", clear_lost());
        crate::sql::execute(&sql, &[Some(&node), Some(consumer_name), Some(&position), claim])
            .map_err(|e| TrompeError::Internal(format!("registering consumer: {e}")))
            .or_raise();
        position
    });
    crate::consumers::forget_live_confirmation(&consumer);
    position
}

/// The position `consumer` has confirmed as applied here, NULL if this node does not keep its
/// log for it.
#[pg_extern(volatile, parallel_unsafe)]
fn consumer_confirmed(consumer: pgrx::Uuid) -> Option<String> {
    confirmed_position(&consumer, crate::consumers::Act::Use)
}

/// Forgets a consumer, at its own request (it removed this node as a peer): its position no
/// longer holds back log truncation. Returns whether it was registered. Only a login that may
/// act for it may do so (an administrator uses `trompe.drop_consumer`).
#[pg_extern(volatile, parallel_unsafe)]
fn unregister_consumer(consumer: pgrx::Uuid) -> bool {
    let consumer_text = consumer.to_string();
    if crate::consumers::authorized(&consumer_text, crate::consumers::Act::Use).or_raise().is_none() {
        return false;
    }
    crate::consumers::forget_live_confirmation(&consumer);
    as_extension_owner(|| {
        crate::sql::execute("DELETE FROM trompe.consumers WHERE node_id = $1::uuid", &[Some(&consumer_text)])
    })
    .map_err(TrompeError::Internal)
    .or_raise()
        > 0
}

/// This node's current snapshot, for a peer that waits until it has applied everything
/// committed here up to now.
#[pg_extern(volatile, parallel_unsafe)]
fn current_snapshot() -> String {
    snapshot_now()
}

/// How many changes committed here as of snapshot `upto` a consumer at position
/// (`done`, `cur`, `after`) has not applied yet.
#[pg_extern(volatile, parallel_unsafe)]
fn pending_changes(done: &str, cur: Option<&str>, after: i64, upto: &str) -> i64 {
    crate::consumers::require_peer_login().or_raise();
    let done_snap = parse_snapshot(done, "done");
    let upto_snap = parse_snapshot(upto, "upto");
    let cur_snap = cur.map(|c| parse_snapshot(c, "cur"));
    if done_snap.covers(&upto_snap) {
        return 0;
    }
    plain_reads();
    let step = as_extension_owner(|| step_transactions(&done_snap, &upto_snap));
    step.txns
        .iter()
        .filter(|t| !cur_snap.as_ref().is_some_and(|c| c.sees(step.txid(t)) && t.last_id <= after))
        .map(|t| t.changes as i64)
        .sum()
}

/// The changes in this node's log, decoded (for inspection and tests): one row per change,
/// in log order and, within a transaction, in the order they were made; then the changes of
/// the calling transaction that are not written yet (they are written when it commits), with
/// a NULL id.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_unsafe)]
fn log_changes() -> TableIterator<
    'static,
    (
        name!(id, Option<i64>),
        name!(txid, String),
        name!(seq, i64),
        name!(op, String),
        name!(nsp, String),
        name!(rel, String),
        name!(cols, Vec<String>),
        name!(vals, Option<Vec<Option<String>>>),
        name!(oldkey, Option<Vec<Option<String>>>),
        name!(old_version, Option<String>),
    ),
> {
    let rows = as_extension_owner(|| {
        crate::sql::rows("SELECT id, txid, encode(changes, 'hex') FROM trompe.log ORDER BY id", &[])
    })
    .map_err(TrompeError::Internal)
    .or_raise();
    let mut chunks: Vec<(Option<i64>, String, Vec<u8>)> = Vec::new();
    for r in rows {
        let id = r[0].as_deref().and_then(|v| v.parse().ok());
        let txid = r[1].clone().unwrap_or_default();
        let hex = r[2].clone().unwrap_or_default();
        let bytes = hex_decode(&hex).ok_or_else(|| TrompeError::Internal("bad bytea output".into())).or_raise();
        chunks.push((id, txid, bytes));
    }
    if let Some(bytes) = crate::capture::buffer::pending() {
        // SAFETY: reads the current transaction's full id.
        let txid = unsafe { pg_sys::GetTopFullTransactionId().value }.to_string();
        chunks.push((None, txid, bytes));
    }
    let mut out = Vec::new();
    for (id, txid, bytes) in chunks {
        let mut changes =
            trompe_core::changeset::decode(&bytes).map_err(|e| TrompeError::Internal(e.to_string())).or_raise();
        changes.sort_by_key(|c| c.seq);
        for c in changes {
            let old = match c.old {
                trompe_core::changeset::OldVersion::Unknown => None,
                trompe_core::changeset::OldVersion::SameTransaction => Some("same transaction".to_string()),
                trompe_core::changeset::OldVersion::Committed { ts, node } => Some(format!("{ts}@{node}")),
            };
            out.push((
                id,
                txid.clone(),
                c.seq as i64,
                c.op.code().to_string(),
                c.nsp,
                c.rel,
                c.cols,
                c.vals,
                c.oldkey,
                old,
            ));
        }
    }
    TableIterator::new(out)
}

/// Decodes hex digits (what `encode(bytea, 'hex')` prints).
fn hex_decode(text: &str) -> Option<Vec<u8>> {
    let hex: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    hex.chunks(2).map(|pair| std::str::from_utf8(pair).ok().and_then(|p| u8::from_str_radix(p, 16).ok())).collect()
}
