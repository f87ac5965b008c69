//! One peer as the worker sees it: a connection driven without ever blocking (connect,
//! handshake, pull, apply, pull again), its position, and its retry backoff.

use std::sync::atomic::Ordering;
use std::time::Duration;

use pgrx::pg_sys;
use trompe_core::backoff::Backoff;
use trompe_core::conninfo::ConnInfo;
use trompe_core::nodeid::NodeId;
use trompe_core::position::{Position, Step};
use trompe_core::snapshot::Snapshot;

mod ahead;
mod apply_txn;
mod batch;
mod conn_state;
mod origin_session;

pub use conn_state::ConnState;
pub(crate) use origin_session::OriginSession;

use crate::libpq::{Conn, PqError, RowStep, Want};
use crate::shmem::{now_ms, PeerSlot};
use crate::worker::apply::ApplyCache;
use crate::worker::progress;
use crate::worker::spool::{Spool, SpooledTxn};
use crate::worker::txn::{in_transaction, TxnError};
use batch::{Batch, BatchBuilder};

/// How long a peer that owes an answer may send nothing (`trompe.peer_timeout`).
fn peer_timeout_ms() -> i64 {
    crate::guc::PEER_TIMEOUT_MS.get() as i64
}
/// When a pull sent at `now` must have been heard from: the peer may wait for news for up to
/// `trompe.pull_interval` before it sends anything.
fn pull_deadline_ms(now: i64) -> i64 {
    now + crate::guc::PULL_INTERVAL_MS.get() as i64 + peer_timeout_ms()
}
/// An idle consumer still confirms its position this often, so the peer can prune its log.
const CONFIRM_EVERY_MS: i64 = 10_000;
/// How often, at most, the peer is asked how much of its log it retains for this node; and
/// never more than a twentieth of the time (the answer reads the retained log).
const RETAINED_EVERY_MS: i64 = 10_000;
const RETAINED_TIME_SHARE: i64 = 20;
/// While the link catches up a backlog (pulls sent ahead), the question, which reads the whole
/// backlog at the peer, waits until it is this late.
const RETAINED_DEFER_MS: i64 = 60_000;
/// The changes the first pull of a connection asks for; each pull after it asks for
/// `PULL_GROWTH` times more, up to `trompe.batch_size`. A node back from an outage applies its
/// first change without waiting for a whole batch to arrive.
const FIRST_PULL_ROWS: i64 = 32;
const PULL_GROWTH: i64 = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Down,
    Connecting,
    Handshake,
    Ready,
    Pulling,
    /// Asking the peer how much of its log it retains for this node.
    AskingRetained,
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
    /// The transaction (its closing log id) an admin asked to set aside (`trompe.skip`).
    skip_txn: Option<i64>,
    /// The transaction that failed to apply last, with the error shown for it.
    failure: Option<(i64, String)>,
    /// Whether a transaction with DDL was applied since the engine last asked.
    applied_ddl: bool,
    /// The answer of the pull in progress, as far as it arrived.
    incoming: BatchBuilder,
    /// The answer in flight is for a position that is no longer where this link stands
    /// (applying the answer before it stopped short): it is received and dropped.
    discard_answer: bool,
    /// The changes the next pull asks for (see `FIRST_PULL_ROWS`).
    pull_rows: i64,
    /// The peer refused the last pull because it marked this node lost.
    lost: bool,
    /// When to ask the peer next how much of its log it retains for this node, and when the
    /// question was sent; None if it cannot answer (older than 0.5.0).
    retained_next_ms: Option<i64>,
    retained_asked_ms: i64,
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
            skip_txn: None,
            failure: None,
            applied_ddl: false,
            incoming: BatchBuilder::default(),
            discard_answer: false,
            pull_rows: FIRST_PULL_ROWS,
            lost: false,
            retained_next_ms: Some(0),
            retained_asked_ms: 0,
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
        // Marked lost by the peer: shown until a pull goes through again (or it is paused).
        let s = if self.lost && s != ConnState::Paused { ConnState::Lost } else { s };
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

    /// The transaction an admin asked to set aside, as `trompe.skip_requests` holds it.
    pub fn set_skip(&mut self, txn: Option<i64>) {
        if txn.is_some() && txn != self.skip_txn {
            self.not_before_ms = 0;
        }
        self.skip_txn = txn;
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
        // What arrived of a pull in progress (maybe a temporary file) is given up.
        self.incoming = BatchBuilder::default();
        self.discard_answer = false;
        self.pull_rows = FIRST_PULL_ROWS;
        self.state = State::Down;
        self.flushing = false;
        self.publish(if self.paused { ConnState::Paused } else { ConnState::Disconnected });
    }

    /// This database is a copy of database `original`, which is the node: the link stays
    /// paused (the caller pauses it), and `trompe.status` says why and what to do.
    pub fn refuse_as_copy(&self, original: &str) {
        if let Some(slot) = self.slot {
            let refused = crate::error::TrompeError::CopyOfNode(original.to_string());
            slot.set_error(&format!("{refused}. {}", crate::error::COPY_HINT));
        }
    }

    /// Makes the next pull happen now, skipping the delay before retrying a connection (a
    /// peer may be back). A transaction that fails to apply keeps its backoff: it is retried
    /// sooner only when something may have fixed it ([`Link::retry_failed`]).
    pub fn hurry(&mut self) {
        if self.failure.is_none() {
            self.not_before_ms = 0;
        }
    }

    /// Retries a transaction that failed to apply now: DDL was applied, which may be what it
    /// waited for.
    pub fn retry_failed(&mut self) {
        if self.failure.is_some() {
            self.not_before_ms = 0;
        }
    }

    /// Whether the last pull applied DDL (then another link's failed transaction may go
    /// through now); reading it resets it.
    pub fn take_applied_ddl(&mut self) -> bool {
        std::mem::take(&mut self.applied_ddl)
    }

    fn fail(&mut self, message: &str) {
        let message = trompe_core::sqlstate::one_line(&crate::peer_calls::scrub(message, &self.info), 400);
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
                self.conn = Some(Conn::start(&self.info).map_err(|e| e.describe())?);
                self.state = State::Connecting;
                self.deadline_ms = now + crate::guc::CONNECT_TIMEOUT_S.get() as i64 * 1000 + 1000;
                self.publish(ConnState::Connecting);
                Ok(None)
            }
            State::Connecting => {
                let conn = self.conn.as_mut().ok_or("no connection")?;
                match conn.poll_connect().map_err(|e: PqError| e.describe())? {
                    Want::Done => {
                        self.send(
                            "SELECT trompe.node_id()::text, set_config('statement_timeout', '0', false),
                                    set_config('synchronous_commit', 'off', false),
                                    set_config('idle_in_transaction_session_timeout', '0', false),
                                    set_config('default_transaction_isolation', 'read committed', false),
                                    set_config('default_transaction_read_only', 'off', false)",
                            &[],
                        )?;
                        self.state = State::Handshake;
                        self.deadline_ms = now + peer_timeout_ms();
                        Ok(None)
                    }
                    want => self.wait_for(want, now),
                }
            }
            State::Pulling => {
                if self.send_rest_and_note_input(now)? {
                    return self.wait_for(Want::Write, now);
                }
                let conn = self.conn.as_mut().ok_or("no connection")?;
                conn.consume().map_err(|e| e.describe())?;
                loop {
                    let conn = self.conn.as_mut().ok_or("no connection")?;
                    match conn.next_row() {
                        Ok(RowStep::Busy) => return self.wait_for(Want::Read, now),
                        Ok(RowStep::Row(row)) => self.incoming.row(&row, 0)?,
                        Ok(RowStep::End) => break,
                        Err(e) => return Err(self.peer_error(&e)),
                    }
                }
                let batch = std::mem::take(&mut self.incoming).finish()?;
                self.state = State::Ready;
                if std::mem::take(&mut self.discard_answer) {
                    return Ok(None);
                }
                // With more waiting at the peer, the next pull is sent before this answer is
                // applied: the peer reads its log while this node applies.
                let ahead = self.pull_ahead(&batch, now)?;
                self.handle_batch(cache, batch)?;
                if let Some(expected) = ahead {
                    self.answer_ahead_applied(&expected);
                }
                Ok(None)
            }
            State::Handshake => {
                if self.send_rest_and_note_input(now)? {
                    return self.wait_for(Want::Write, now);
                }
                let conn = self.conn.as_mut().ok_or("no connection")?;
                if conn.consume().map_err(|e| e.describe())? == Want::Read {
                    return self.wait_for(Want::Read, now);
                }
                let result = match conn.take_result() {
                    Ok(result) => result,
                    Err(e) => return Err(self.peer_error(&e)),
                };
                let id = result.get(0, 0).unwrap_or_default();
                if id != self.node.to_string() {
                    return Err(format!(
                        "the peer answers as node {id}, not {} (is the connection string pointing to another database?)",
                        self.node
                    ));
                }
                self.publish(ConnState::Connected);
                self.state = State::Ready;
                // Asked after the first pull (a peer upgraded since may answer now).
                self.retained_next_ms = Some(now + 1000);
                Ok(None)
            }
            State::Ready => {
                if now < self.not_before_ms {
                    return Ok(Some(WaitSpec { socket: None, wake_at_ms: Some(self.not_before_ms) }));
                }
                if self.retained_due(now) {
                    let me = self.me.clone();
                    self.send("SELECT transactions, bytes FROM trompe.retained_log($1::uuid)", &[Some(&me)])?;
                    self.state = State::AskingRetained;
                    self.retained_asked_ms = now;
                    self.deadline_ms = now + peer_timeout_ms();
                    return Ok(None);
                }
                self.send_pull(now)?;
                Ok(None)
            }
            State::AskingRetained => {
                if self.send_rest_and_note_input(now)? {
                    return self.wait_for(Want::Write, now);
                }
                let conn = self.conn.as_mut().ok_or("no connection")?;
                if conn.consume().map_err(|e| e.describe())? == Want::Read {
                    return self.wait_for(Want::Read, now);
                }
                match conn.take_result() {
                    Ok(result) => {
                        let took = now - self.retained_asked_ms;
                        self.retained_next_ms = Some(now + RETAINED_EVERY_MS.max(took * RETAINED_TIME_SHARE));
                        if let Some(slot) = self.slot {
                            let number = |c: usize| result.get(0, c).and_then(|v| v.parse().ok()).unwrap_or(-1);
                            slot.peer_log_txns.store(number(0), Ordering::Release);
                            slot.peer_log_bytes.store(number(1), Ordering::Release);
                        }
                    }
                    // The peer cannot tell (older than 0.5.0): not asked again on this connection.
                    Err(e) if e.sqlstate.is_some() => self.retained_next_ms = None,
                    Err(e) => return Err(e.describe()),
                }
                self.state = State::Ready;
                Ok(None)
            }
        }
    }

    /// Whether it is time to ask the peer how much of its log it retains for this node.
    fn retained_due(&self, now: i64) -> bool {
        self.retained_next_ms.is_some_and(|t| now >= t)
    }

    /// Whether the question is so late that a link catching up stops pulling ahead to ask it.
    fn retained_overdue(&self, now: i64) -> bool {
        self.retained_next_ms.is_some_and(|t| now >= t + RETAINED_DEFER_MS)
    }

    /// Sends what is left of the request (true: the socket must become writable first) and
    /// moves the deadline if bytes arrived: only silence times a peer out.
    fn send_rest_and_note_input(&mut self, now: i64) -> Result<bool, String> {
        let conn = self.conn.as_mut().ok_or("no connection")?;
        if self.flushing {
            if conn.flush().map_err(|e| e.describe())? == Want::Write {
                return Ok(true);
            }
            self.flushing = false;
        }
        if conn.input_waiting() {
            self.deadline_ms = self.deadline_ms.max(now + peer_timeout_ms());
        }
        Ok(false)
    }

    /// The message of an error the peer raised, noting whether it said this node is lost.
    fn peer_error(&mut self, e: &PqError) -> String {
        self.lost = e.sqlstate.as_deref() == Some(crate::consumers::LOST_SQLSTATE);
        e.describe()
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
        conn.send_query(sql, params).map_err(|e| e.describe())?;
        self.flushing = true;
        Ok(())
    }

    fn send_binary(&mut self, sql: &str, params: &[Option<&str>]) -> Result<(), String> {
        let conn = self.conn.as_mut().ok_or("no connection")?;
        conn.send_query_binary(sql, params).map_err(|e| e.describe())?;
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
        self.send_pull_from(&self.pos.clone(), self.seen_commits, now)
    }

    /// Asks the peer for what follows the position `pos`, `seen` being the commit counter the
    /// peer answered last.
    fn send_pull_from(&mut self, pos: &Position, seen: i64, now: i64) -> Result<(), String> {
        let wait_ms = crate::guc::PULL_INTERVAL_MS.get();
        let confirmed = self.durable_position();
        let done = pos.done.to_string();
        let (cur, after) = match &pos.step {
            Some(s) => (Some(s.cur.to_string()), s.after),
            None => (None, 0),
        };
        let after = after.to_string();
        let batch_size = i64::from(crate::guc::BATCH_SIZE.get());
        let batch = self.pull_rows.min(batch_size).to_string();
        self.pull_rows = self.pull_rows.saturating_mul(PULL_GROWTH).min(batch_size);
        let wait = wait_ms.to_string();
        let seen = seen.to_string();
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
        let conn = self.conn.as_mut().ok_or("no connection")?;
        conn.single_row_mode().map_err(|e| e.describe())?;
        self.incoming = BatchBuilder::default();
        self.state = State::Pulling;
        self.deadline_ms = pull_deadline_ms(now);
        Ok(())
    }

    fn handle_batch(&mut self, cache: &mut ApplyCache, batch: Batch) -> Result<(), String> {
        self.seen_commits = batch.commits;
        let Some(cur) = batch.cur.clone() else {
            self.pulled();
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
            let txn_last = txn.txn_last;
            let next = self.pos.after_transaction(&cur, txn_last, last && batch.complete);
            let set_aside = (self.skip_txn == Some(txn_last)).then(|| self.failure_text(txn_last));
            let had_ddl = match self.apply_transaction(cache, &batch.spool, txn, &next, set_aside.as_deref()) {
                Ok(had_ddl) => had_ddl,
                Err(e) => {
                    self.stall(&batch.spool, txn, &e, (batch.pending - applied_changes).max(0));
                    return Ok(());
                }
            };
            if set_aside.is_some() {
                pgrx::log!("trompe: peer \"{}\": transaction {txn_last} set aside in trompe.exceptions", self.name);
                self.skip_txn = None;
            }
            self.note_committed(&next.done);
            self.pos = next;
            self.last_persist_ms = now_ms();
            applied_changes += txn.changes as i64;
            self.applied_ddl |= had_ddl;
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
        self.pulled();
        if let Some(slot) = self.slot {
            let left = (batch.pending - applied_changes).max(0);
            slot.pending_changes.store(left, Ordering::Release);
            let oldest = if left > 0 { batch.oldest_us.map(pg_timestamp_to_ms).unwrap_or(0) } else { 0 };
            slot.oldest_pending_ms.store(oldest, Ordering::Release);
            let last_commit = batch.txns.last().map(|t| pg_timestamp_to_ms(t.commit_us));
            match last_commit {
                Some(ms) => slot.apply_delay_ms.store((now_ms() - ms).max(0), Ordering::Release),
                None if batch.complete => slot.apply_delay_ms.store(0, Ordering::Release),
                None => {}
            }
        }
        Ok(())
    }

    /// A pull went through and everything it brought is applied: the stream flows.
    fn pulled(&mut self) {
        if std::mem::take(&mut self.lost) {
            self.publish(ConnState::Connected);
        }
        if let Some(slot) = self.slot {
            slot.last_pull_ms.store(now_ms(), Ordering::Release);
            slot.failing_txn.store(0, Ordering::Release);
            slot.clear_error();
        }
        if self.failure.take().is_some() {
            self.publish(ConnState::Connected);
        }
    }

    /// Transaction `txn` (its rows in `spool`) cannot be applied: the stream stops before it,
    /// visibly (state `error`, the transaction and what waits behind it), and it is retried
    /// after a delay.
    fn stall(&mut self, spool: &Spool, txn: &SpooledTxn, e: &TxnError, behind: i64) {
        let txn_last = txn.txn_last;
        let at = crate::worker::apply::current_change().min((txn.changes as usize).saturating_sub(1));
        let commit_us = txn.commit_us;
        let what = match txn.change_at(spool, at) {
            Some(c) if c.op == trompe_core::logformat::Op::Ddl => format!("change {} (DDL on {})", at + 1, c.rel),
            Some(c) => format!("change {} ({} {}.{})", at + 1, op_name(c.op), c.nsp, c.rel),
            None if txn.changes == 0 => "an empty transaction".to_string(),
            None => format!("change {}", at + 1),
        };
        let code = e.code.map_or_else(|| "XX000".to_string(), |c| trompe_core::sqlstate::text(c as i64));
        let message = format!(
            "{} (SQLSTATE {code}; transaction {txn_last} of the peer, committed {}, {what})",
            trompe_core::sqlstate::one_line(&e.message, 300),
            trompe_core::timestamp::utc_text(commit_us),
        );
        // Not asked while the next pull's answer is in flight on the connection.
        let asked = if self.state == State::Pulling { None } else { self.pending_at_peer() };
        let behind = asked.unwrap_or(behind).max(behind);
        let delay = self.backoff.fail();
        self.not_before_ms = now_ms() + delay.as_millis() as i64;
        if let Some(slot) = self.slot {
            slot.set_error(&message);
            slot.failing_txn.store(txn_last, Ordering::Release);
            slot.pending_changes.store(behind, Ordering::Release);
            slot.oldest_pending_ms.store(pg_timestamp_to_ms(commit_us), Ordering::Release);
        }
        self.publish(ConnState::Error);
        // Retried after the delay, or at once when DDL from any peer is applied here (it may be
        // what the change waits for: see `retry_failed`); the message says both.
        pgrx::log!(
            "trompe: peer \"{}\": cannot apply: {message}; retrying in {} ms, or as soon as DDL from a peer is applied here",
            self.name,
            delay.as_millis()
        );
        self.failure = Some((txn_last, message));
    }

    /// How many changes the peer has committed that are not applied here (the current step's
    /// and those after it), asked over the idle connection; None if the peer does not answer
    /// quickly.
    fn pending_at_peer(&mut self) -> Option<i64> {
        let done = self.pos.done.to_string();
        let (cur, after) = match &self.pos.step {
            Some(s) => (Some(s.cur.to_string()), s.after.to_string()),
            None => (None, "0".to_string()),
        };
        let conn = self.conn.as_mut()?;
        let result = crate::libpq::query_wait(
            conn,
            "SELECT trompe.pending_changes($1, $2, $3::bigint, trompe.current_snapshot())",
            &[Some(&done), cur.as_deref(), Some(&after)],
            Duration::from_secs(2),
        )
        .ok()?;
        result.get(0, 0).and_then(|v| v.parse().ok())
    }

    /// What the exception log keeps as the error of transaction `txn_last` set aside.
    fn failure_text(&self, txn_last: i64) -> String {
        match &self.failure {
            Some((t, message)) if *t == txn_last => message.clone(),
            _ => self.slot.and_then(|s| s.error()).unwrap_or_else(|| "set aside on request".to_string()),
        }
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
}

/// How a change's kind reads in messages.
fn op_name(op: trompe_core::logformat::Op) -> &'static str {
    use trompe_core::logformat::Op;
    match op {
        Op::Insert => "INSERT into",
        Op::Update => "UPDATE of",
        Op::Delete => "DELETE from",
        Op::Truncate => "TRUNCATE of",
        Op::Ddl => "DDL in",
    }
}

/// PostgreSQL TimestampTz (µs since 2000-01-01) to ms since the Unix epoch.
pub fn pg_timestamp_to_ms(us: i64) -> i64 {
    us / 1000 + 946_684_800_000
}
