//! One peer as the worker sees it: a connection driven without ever blocking (connect,
//! handshake, pull, apply, pull again), its position, and its retry backoff.

use std::sync::atomic::Ordering;
use std::time::Duration;

use pgrx::{pg_sys, PgSqlErrorCode};
use trompe_core::backoff::Backoff;
use trompe_core::changeset::decode;
use trompe_core::conninfo::ConnInfo;
use trompe_core::nodeid::NodeId;
use trompe_core::position::{in_origin, Position, Step};
use trompe_core::snapshot::Snapshot;

use crate::libpq::{Conn, PgResult, PqError, Want};
use crate::shmem::{now_ms, PeerSlot};
use crate::worker::apply::{apply_transaction, ApplyCache, Change};
use crate::worker::progress;
use crate::worker::txn::{in_transaction, in_transaction_coded, TxnError};

/// Extra time allowed beyond the pull's own wait before a silent peer is given up on.
const ANSWER_GRACE_MS: i64 = 60_000;
/// An idle consumer still confirms its position this often, so the peer can prune its log.
const CONFIRM_EVERY_MS: i64 = 10_000;

/// Connection state shown in `trompe.status`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Not connected (waiting to retry, or never tried).
    Disconnected = 0,
    /// Connecting or checking the peer's identity.
    Connecting = 1,
    /// Connected and replicating.
    Connected = 2,
    /// Paused by `trompe.pause_peer`.
    Paused = 3,
}

impl ConnState {
    /// The name shown in `trompe.status`.
    pub fn label(v: u32) -> &'static str {
        match v {
            1 => "connecting",
            2 => "connected",
            3 => "paused",
            _ => "disconnected",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Down,
    Connecting,
    Handshake,
    Ready,
    Pulling,
}

/// What a link waits for before it can make progress.
pub struct WaitSpec {
    /// A socket and the readiness it needs.
    pub socket: Option<(pg_sys::pgsocket, Want)>,
    /// A time (ms since epoch) to act at.
    pub wake_at_ms: Option<i64>,
}

/// A peer the worker pulls from.
pub struct Link {
    /// The peer's name.
    pub name: String,
    /// The peer's node id.
    pub node: NodeId,
    /// Connection string, as stored.
    pub conninfo: String,
    info: ConnInfo,
    /// Paused by the user.
    pub paused: bool,
    origin: pg_sys::RepOriginId,
    pos: Position,
    /// The newest `done` known to be on disk here: the only position confirmed to the peer
    /// (applies commit asynchronously, so a crash may take back the last few).
    confirmed: Snapshot,
    /// Positions committed but maybe not flushed yet, with their commit's WAL end.
    unflushed: std::collections::VecDeque<(u64, Snapshot)>,
    last_persist_ms: i64,
    conn: Option<Conn>,
    state: State,
    flushing: bool,
    deadline_ms: i64,
    not_before_ms: i64,
    backoff: Backoff,
    seen_commits: i64,
    slot: Option<&'static PeerSlot>,
    me: String,
    /// How the position is stored (see `worker::progress`).
    stored: Stored,
}

/// What the progress table and the replication origin hold for a peer.
#[derive(Clone, Debug, Default)]
pub struct Stored {
    /// Whether the origin keeps `after` inside a step (schema 0.3.0 or later).
    pub origin_holds_after: bool,
    /// The step the table records, if any.
    pub step: Option<Snapshot>,
    /// The offset the table records.
    pub offset: i64,
    /// The origin's position as last committed.
    pub origin: u64,
    /// Transactions and changes applied since the table's counters were last written.
    pub unsaved_txns: i64,
    pub unsaved_changes: i64,
}

/// A pull's answer: the step it read and the changes, grouped by transaction.
struct Batch {
    cur: Option<Snapshot>,
    complete: bool,
    commits: i64,
    pending: i64,
    oldest_us: Option<i64>,
    txns: Vec<Vec<Change>>,
}

fn parse_batch(result: &PgResult) -> Result<Batch, String> {
    if result.rows() == 0 || result.bytes(0, 0) != Some(b"H") {
        return Err("the peer's answer has no header".into());
    }
    let cur = match result.bytes(0, 1) {
        Some(t) => {
            Some(std::str::from_utf8(t).map_err(|e| e.to_string())?.parse::<Snapshot>().map_err(|e| e.to_string())?)
        }
        None => None,
    };
    let mut batch = Batch {
        cur,
        complete: result.bytes(0, 2) == Some(&[1]),
        commits: result.int8(0, 3).unwrap_or(-1),
        pending: result.int8(0, 4).unwrap_or(0),
        oldest_us: result.int8(0, 5),
        txns: Vec::new(),
    };
    let mut current: Vec<Change> = Vec::new();
    let mut current_last = None;
    for r in 1..result.rows() {
        let txn_last = result.int8(r, 6).ok_or("a log row without transaction")?;
        let commit_us = result.int8(r, 7).ok_or_else(|| {
            format!("transaction {txn_last} has no commit time (is track_commit_timestamp on at the peer?)")
        })?;
        let bytes = result.bytes(r, 9).ok_or("a log row without changes")?;
        let records = decode(bytes).map_err(|e| format!("log row of transaction {txn_last}: {e}"))?;
        if current_last.is_some_and(|l| l != txn_last) {
            batch.txns.push(finish_transaction(std::mem::take(&mut current)));
        }
        current_last = Some(txn_last);
        current.extend(records.into_iter().map(|record| Change { txn_last, commit_us, record }));
    }
    if !current.is_empty() {
        batch.txns.push(finish_transaction(current));
    }
    Ok(batch)
}

/// A transaction's changes in the order they were made (chunks written from savepoints can
/// arrive out of order).
fn finish_transaction(mut changes: Vec<Change>) -> Vec<Change> {
    changes.sort_by_key(|c| c.seq);
    changes
}

impl Link {
    /// A link for a peer, at its stored position.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        node: NodeId,
        conninfo: String,
        info: ConnInfo,
        paused: bool,
        origin: pg_sys::RepOriginId,
        pos: Position,
        stored: Stored,
        me: String,
        slot: Option<&'static PeerSlot>,
    ) -> Link {
        let backoff = Backoff::new(
            Duration::from_millis(crate::guc::RETRY_MIN_MS.get() as u64),
            Duration::from_millis(crate::guc::RETRY_MAX_MS.get() as u64),
        );
        let mut link = Link {
            name,
            node,
            conninfo,
            info,
            paused,
            origin,
            confirmed: pos.done.clone(),
            unflushed: std::collections::VecDeque::new(),
            pos,
            last_persist_ms: now_ms(),
            conn: None,
            state: State::Down,
            flushing: false,
            deadline_ms: 0,
            not_before_ms: 0,
            backoff,
            seen_commits: -2,
            slot,
            me,
            stored,
        };
        // Applied by an earlier link of this peer since its counters were written (the slot
        // outlives a worker restart, not a server restart).
        if let Some(slot) = slot {
            link.stored.unsaved_txns = slot.applied_txns.load(Ordering::Acquire) as i64;
            link.stored.unsaved_changes = slot.applied_changes.load(Ordering::Acquire) as i64;
        }
        link.publish(if paused { ConnState::Paused } else { ConnState::Disconnected });
        link
    }

    fn publish(&self, s: ConnState) {
        if let Some(slot) = self.slot {
            slot.conn_state.store(s as u32, Ordering::Release);
        }
    }

    /// Updates settings from `trompe.peers`; a changed connection string reconnects.
    pub fn update(&mut self, conninfo: String, info: ConnInfo, paused: bool) {
        if conninfo != self.conninfo {
            self.conninfo = conninfo;
            self.info = info;
            self.disconnect();
        }
        if paused != self.paused {
            self.paused = paused;
            if paused {
                self.disconnect();
                self.publish(ConnState::Paused);
            } else {
                self.not_before_ms = 0;
                self.publish(ConnState::Disconnected);
            }
        }
    }

    /// Re-reads the retry bounds after a configuration reload.
    pub fn reload_settings(&mut self) {
        self.backoff.set_bounds(
            Duration::from_millis(crate::guc::RETRY_MIN_MS.get() as u64),
            Duration::from_millis(crate::guc::RETRY_MAX_MS.get() as u64),
        );
    }

    /// Closes the connection (the next step reconnects).
    pub fn disconnect(&mut self) {
        self.conn = None;
        self.state = State::Down;
        self.flushing = false;
        self.publish(if self.paused { ConnState::Paused } else { ConnState::Disconnected });
    }

    /// Makes the next pull happen now (skipping a retry delay).
    pub fn hurry(&mut self) {
        self.not_before_ms = 0;
    }

    fn fail(&mut self, message: &str) {
        let message = crate::peers::scrub(message, &self.info);
        self.disconnect();
        let delay = self.backoff.fail();
        self.not_before_ms = now_ms() + delay.as_millis() as i64;
        if let Some(slot) = self.slot {
            slot.set_error(&message);
        }
        pgrx::log!("trompe: peer \"{}\": {message}; retrying in {} ms", self.name, delay.as_millis());
    }

    /// Advances the link as far as it can without waiting; says what to wait for next.
    pub fn drive(&mut self, cache: &mut ApplyCache, enabled: bool) -> WaitSpec {
        loop {
            let now = now_ms();
            if self.paused || !enabled {
                if self.conn.is_some() {
                    self.disconnect();
                }
                return WaitSpec { socket: None, wake_at_ms: None };
            }
            match self.step(cache, now) {
                Ok(Some(wait)) => return wait,
                Ok(None) => continue,
                Err(e) => {
                    self.fail(&e);
                    return WaitSpec { socket: None, wake_at_ms: Some(self.not_before_ms) };
                }
            }
        }
    }

    /// One transition; `Ok(None)` means "call again at once".
    fn step(&mut self, cache: &mut ApplyCache, now: i64) -> Result<Option<WaitSpec>, String> {
        match self.state {
            State::Down => {
                if now < self.not_before_ms {
                    return Ok(Some(WaitSpec { socket: None, wake_at_ms: Some(self.not_before_ms) }));
                }
                self.conn = Some(Conn::start(&self.info).map_err(|e| e.message)?);
                self.state = State::Connecting;
                self.deadline_ms = now + crate::guc::CONNECT_TIMEOUT_S.get() as i64 * 1000 + 1000;
                self.publish(ConnState::Connecting);
                Ok(None)
            }
            State::Connecting => {
                let conn = self.conn.as_mut().ok_or("no connection")?;
                match conn.poll_connect().map_err(|e: PqError| e.message)? {
                    Want::Done => {
                        self.send(
                            "SELECT trompe.node_id()::text, set_config('statement_timeout', '0', false),
                                    set_config('synchronous_commit', 'off', false),
                                    set_config('idle_in_transaction_session_timeout', '0', false),
                                    set_config('default_transaction_isolation', 'read committed', false)",
                            &[],
                        )?;
                        self.state = State::Handshake;
                        self.deadline_ms = now + ANSWER_GRACE_MS;
                        Ok(None)
                    }
                    want => self.wait_for(want, now),
                }
            }
            State::Handshake | State::Pulling => {
                let conn = self.conn.as_mut().ok_or("no connection")?;
                if self.flushing {
                    if conn.flush().map_err(|e| e.message)? == Want::Write {
                        return self.wait_for(Want::Write, now);
                    }
                    self.flushing = false;
                }
                if conn.consume().map_err(|e| e.message)? == Want::Read {
                    return self.wait_for(Want::Read, now);
                }
                let result = conn.take_result().map_err(|e| e.message)?;
                if self.state == State::Handshake {
                    let id = result.get(0, 0).unwrap_or_default();
                    if id != self.node.to_string() {
                        return Err(format!(
                            "the peer answers as node {id}, not {} (is the connection string pointing to another database?)",
                            self.node
                        ));
                    }
                    self.publish(ConnState::Connected);
                } else {
                    self.handle_batch(cache, &result)?;
                }
                self.state = State::Ready;
                Ok(None)
            }
            State::Ready => {
                if now < self.not_before_ms {
                    return Ok(Some(WaitSpec { socket: None, wake_at_ms: Some(self.not_before_ms) }));
                }
                self.send_pull(now)?;
                Ok(None)
            }
        }
    }

    fn wait_for(&mut self, want: Want, now: i64) -> Result<Option<WaitSpec>, String> {
        if now >= self.deadline_ms {
            return Err(match self.state {
                State::Connecting => "timed out connecting".to_string(),
                _ => "the peer did not answer in time".to_string(),
            });
        }
        let sock = self.conn.as_ref().map(|c| c.socket()).ok_or("no connection")?;
        Ok(Some(WaitSpec { socket: Some((sock, want)), wake_at_ms: Some(self.deadline_ms) }))
    }

    fn send(&mut self, sql: &str, params: &[Option<&str>]) -> Result<(), String> {
        let conn = self.conn.as_mut().ok_or("no connection")?;
        conn.send_query(sql, params).map_err(|e| e.message)?;
        self.flushing = true;
        Ok(())
    }

    fn send_binary(&mut self, sql: &str, params: &[Option<&str>]) -> Result<(), String> {
        let conn = self.conn.as_mut().ok_or("no connection")?;
        conn.send_query_binary(sql, params).map_err(|e| e.message)?;
        self.flushing = true;
        Ok(())
    }

    /// Records that `done` was committed by the last transaction; it is confirmed to the peer
    /// once that commit is flushed.
    fn note_committed(&mut self, done: &Snapshot) {
        let known = self.unflushed.back().map_or(&self.confirmed, |(_, d)| d);
        if known != done {
            // SAFETY: reading the end of this process's last commit record.
            let lsn = unsafe { pg_sys::XactLastCommitEnd };
            self.unflushed.push_back((lsn, done.clone()));
        }
    }

    /// The newest position whose commit is on disk. When caught up (about to wait for news),
    /// flushes the last commit first, so the peer learns the position at once.
    fn durable_position(&mut self) -> String {
        if self.pos.step.is_none() {
            if let Some((lsn, _)) = self.unflushed.back() {
                // SAFETY: flushes WAL up to a commit record this process wrote.
                unsafe { pg_sys::XLogFlush(*lsn) };
            }
        }
        // SAFETY: reads the WAL flush position; no lock needed.
        let flushed = unsafe { pg_sys::GetFlushRecPtr(std::ptr::null_mut()) };
        while self.unflushed.front().is_some_and(|(lsn, _)| *lsn <= flushed) {
            if let Some((_, done)) = self.unflushed.pop_front() {
                self.confirmed = done;
            }
        }
        self.confirmed.to_string()
    }

    fn send_pull(&mut self, now: i64) -> Result<(), String> {
        let wait_ms = crate::guc::PULL_INTERVAL_MS.get();
        let confirmed = self.durable_position();
        let done = self.pos.done.to_string();
        let (cur, after) = match &self.pos.step {
            Some(s) => (Some(s.cur.to_string()), s.after),
            None => (None, 0),
        };
        let after = after.to_string();
        let batch = crate::guc::BATCH_SIZE.get().to_string();
        let wait = wait_ms.to_string();
        let seen = self.seen_commits.to_string();
        let me = self.me.clone();
        self.send_binary(
            "SELECT kind, step_cur, complete, commits, pending, oldest_us, txn_last, commit_us, id, changes
               FROM trompe.pull($1::uuid, $2, $3, $4::bigint, $5::int, $6::int, $7::bigint, $8)",
            &[
                Some(&me),
                Some(&done),
                cur.as_deref(),
                Some(&after),
                Some(&batch),
                Some(&wait),
                Some(&seen),
                Some(&confirmed),
            ],
        )?;
        self.state = State::Pulling;
        self.deadline_ms = now + wait_ms as i64 + ANSWER_GRACE_MS;
        Ok(())
    }

    fn handle_batch(&mut self, cache: &mut ApplyCache, result: &PgResult) -> Result<(), String> {
        let batch = parse_batch(result)?;
        self.seen_commits = batch.commits;
        if let Some(slot) = self.slot {
            slot.last_pull_ms.store(now_ms(), Ordering::Release);
        }
        let Some(cur) = batch.cur.clone() else {
            return Ok(());
        };
        if self.pos.step.is_none() && !(batch.txns.is_empty() && batch.complete) {
            // Work on this step until it is complete, also when applying fails and is retried.
            self.pos.step = Some(Step { cur: cur.clone(), after: 0 });
        }
        let ntxns = batch.txns.len();
        let mut applied_changes = 0i64;
        let mut session = OriginSession::none();
        if ntxns > 0 {
            session.setup(self.origin, 0);
        }
        for (i, txn) in batch.txns.iter().enumerate() {
            let last = i + 1 == ntxns;
            let txn_last = txn.last().map_or(0, |c| c.txn_last);
            let next = self.pos.after_transaction(&cur, txn_last, last && batch.complete);
            if let Err(e) = self.apply_transaction(cache, txn, &next) {
                // The position stays before this transaction: retry it after a delay.
                let delay = self.backoff.fail();
                self.not_before_ms = now_ms() + delay.as_millis() as i64;
                if let Some(slot) = self.slot {
                    slot.set_error(&e);
                }
                pgrx::log!("trompe: peer \"{}\": cannot apply: {e}; retrying in {} ms", self.name, delay.as_millis());
                return Ok(());
            }
            self.note_committed(&next.done);
            self.pos = next;
            self.last_persist_ms = now_ms();
            applied_changes += txn.len() as i64;
        }
        if ntxns == 0 && batch.complete {
            // Nothing new in this step: move on to it, and now and then tell the peer.
            let next = Position::at(cur.clone());
            if now_ms() - self.last_persist_ms >= CONFIRM_EVERY_MS && next != self.pos {
                self.persist(&next)?;
            }
            self.pos = next;
        }
        self.backoff.succeed();
        if let Some(slot) = self.slot {
            slot.clear_error();
            let left = (batch.pending - applied_changes).max(0);
            slot.pending_changes.store(left, Ordering::Release);
            let oldest = if left > 0 { batch.oldest_us.map(pg_timestamp_to_ms).unwrap_or(0) } else { 0 };
            slot.oldest_pending_ms.store(oldest, Ordering::Release);
            let last_commit = batch.txns.last().and_then(|t| t.first()).map(|c| pg_timestamp_to_ms(c.commit_us));
            match last_commit {
                Some(ms) => slot.apply_delay_ms.store((now_ms() - ms).max(0), Ordering::Release),
                None if batch.complete => slot.apply_delay_ms.store(0, Ordering::Release),
                None => {}
            }
        }
        Ok(())
    }

    fn persist(&mut self, pos: &Position) -> Result<(), String> {
        let node = self.node.to_string();
        in_transaction(|| {
            // SAFETY: SPI is connected for the update and finished after it.
            unsafe { pg_sys::SPI_connect() };
            let offset = self.stored.origin_holds_after.then_some(self.stored.offset);
            progress::store(&node, pos, self.stored.unsaved_txns, self.stored.unsaved_changes, offset)?;
            // SAFETY: pairs with SPI_connect above.
            unsafe { pg_sys::SPI_finish() };
            Ok(())
        })?;
        self.note_committed(&pos.done);
        self.last_persist_ms = now_ms();
        self.stored.step = pos.step.as_ref().map(|s| s.cur.clone());
        self.saved_counters();
        Ok(())
    }

    /// Starts keeping `after` in the origin once the database was updated to 0.3.0 (until then
    /// the table was written with every transaction, and the origin was left at 0).
    pub fn schema_updated(&mut self, origin_holds_after: bool) {
        self.stored.origin_holds_after |= origin_holds_after;
    }

    /// The table's counters were written: what is applied since starts from zero.
    fn saved_counters(&mut self) {
        self.stored.unsaved_txns = 0;
        self.stored.unsaved_changes = 0;
        if let Some(slot) = self.slot {
            slot.applied_txns.store(0, Ordering::Release);
            slot.applied_changes.store(0, Ordering::Release);
        }
    }

    /// Applies one origin transaction as one local transaction, with the origin's commit time
    /// recorded as this transaction's (through the peer's replication origin, set up by the
    /// caller), and the new position stored in the same transaction.
    fn apply_transaction(&mut self, cache: &mut ApplyCache, txn: &[Change], next: &Position) -> Result<(), String> {
        // SAFETY: the timestamp the next commit records for the session's replication origin.
        unsafe { pg_sys::replorigin_session_origin_timestamp = txn.first().map_or(0, |c| c.commit_us) };
        // The table is written when the step changes or ends; inside a step, the origin's
        // position records `after` (see worker::progress).
        let next_step = next.step.as_ref().map(|s| &s.cur);
        let write_table =
            !self.stored.origin_holds_after || next_step.is_none() || next_step != self.stored.step.as_ref();
        let (offset, origin_value) = match (&next.step, self.stored.origin_holds_after) {
            (Some(step), true) => {
                let offset = if write_table {
                    in_origin::offset_for_step(step.after, self.stored.offset, self.stored.origin)
                } else {
                    self.stored.offset
                };
                (offset, in_origin::value(step.after, offset))
            }
            _ => (self.stored.offset, 0),
        };
        let (txns, changes) = (self.stored.unsaved_txns + 1, self.stored.unsaved_changes + txn.len() as i64);
        let stored_offset = self.stored.origin_holds_after.then_some(offset);
        let attempt = |cache: &mut ApplyCache, careful: bool| {
            let result = in_transaction_coded(|| {
                progress::take_apply_lock();
                cache.purge_stale();
                // SAFETY: SPI is connected for the statements of this transaction and finished
                // below (an error aborts the transaction, which cleans SPI up).
                unsafe { pg_sys::SPI_connect() };
                apply_transaction(cache, txn, self.node, careful).map_err(|e| TxnError::from(e.to_string()))?;
                if write_table {
                    progress::store(&self.node.to_string(), next, txns, changes, stored_offset)?;
                }
                // SAFETY: pairs with SPI_connect above; the origin position the commit records
                // (0 leaves it where it is).
                unsafe {
                    pg_sys::SPI_finish();
                    pg_sys::replorigin_session_origin_lsn = origin_value;
                }
                Ok(())
            });
            if result.is_err() {
                crate::conflicts::discard();
            }
            crate::worker::apply::after_transaction();
            result
        };
        // Large objects the changes refer to are copied over this connection, idle meanwhile.
        let source = self.conn.as_mut().map(|c| c as *mut Conn);
        crate::large_objects::with_source(source, || match attempt(cache, false) {
            // A row collided with another on a unique constraint other than the primary key:
            // do it again, resolving such collisions before each write.
            Err(e) if e.code == Some(PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION) => attempt(cache, true),
            other => other,
        })
        .map_err(|e| e.message)?;
        self.stored.origin = self.stored.origin.max(origin_value);
        self.stored.offset = offset;
        if write_table {
            self.stored.step = next_step.cloned();
            self.saved_counters();
        } else {
            self.stored.unsaved_txns = txns;
            self.stored.unsaved_changes = changes;
            if let Some(slot) = self.slot {
                slot.applied_txns.store(txns as u64, Ordering::Release);
                slot.applied_changes.store(changes as u64, Ordering::Release);
            }
        }
        Ok(())
    }
}

/// The peer's replication origin set up while a batch is applied, so each commit records the
/// origin's commit time and identity; released when dropped (also after an error).
pub(crate) struct OriginSession {
    active: bool,
}

impl Drop for OriginSession {
    fn drop(&mut self) {
        self.reset();
    }
}

impl OriginSession {
    /// No origin set up yet.
    pub(crate) fn none() -> Self {
        OriginSession { active: false }
    }

    /// Sets up `origin` and the commit time the next commit records.
    pub(crate) fn setup(&mut self, origin: pg_sys::RepOriginId, commit_us: i64) {
        if origin == pg_sys::InvalidRepOriginId as pg_sys::RepOriginId {
            return;
        }
        // SAFETY: sets up the session's replication origin (one at a time in this process) and
        // the timestamp the next commit records.
        unsafe {
            crate::pg_compat::replorigin_session_setup(origin);
            pg_sys::replorigin_session_origin = origin;
            pg_sys::replorigin_session_origin_timestamp = commit_us;
            pg_sys::replorigin_session_origin_lsn = 0;
        }
        self.active = true;
    }

    /// Releases the origin, if one is set up.
    pub(crate) fn reset(&mut self) {
        if self.active {
            // SAFETY: releases the origin set up by `setup`.
            unsafe {
                pg_sys::replorigin_session_reset();
                pg_sys::replorigin_session_origin = pg_sys::InvalidRepOriginId as pg_sys::RepOriginId;
                pg_sys::replorigin_session_origin_timestamp = 0;
                pg_sys::replorigin_session_origin_lsn = 0;
            }
            self.active = false;
        }
    }
}

/// PostgreSQL TimestampTz (µs since 2000-01-01) to ms since the Unix epoch.
pub fn pg_timestamp_to_ms(us: i64) -> i64 {
    us / 1000 + 946_684_800_000
}
