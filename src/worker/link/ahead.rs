//! Pulling ahead: while this node applies one pull's answer, the peer already reads its log
//! for the next one. A backlog's pulls then cost the time of the slower side, not of both.
//!
//! The next pull asks from the position the answer in hand leads to once applied. If applying
//! stops short of it (a transaction fails, and the stream stalls before it), the next answer
//! is for the wrong position: it is received and dropped, and the link pulls again from where
//! it stands once it retries.

use std::time::{Duration, Instant};

use trompe_core::position::Position;

use super::batch::{Batch, BatchBuilder};
use super::{peer_timeout_ms, pull_deadline_ms, Link, State};
use crate::large_objects::LoSource;
use crate::libpq::{wait_socket, Conn, RowStep, Want};
use crate::shmem::now_ms;

impl Link {
    /// Sends the next pull before `batch` is applied, as if it were, when more is waiting at
    /// the peer; returns the position it asked from.
    pub(super) fn pull_ahead(&mut self, batch: &Batch, now: i64) -> Result<Option<Position>, String> {
        let (Some(cur), Some(last)) = (&batch.cur, batch.txns.last()) else {
            return Ok(None);
        };
        // The peer's retained log is asked between pulls (see `State::Ready`); while catching
        // up, only once it is overdue: reading the whole backlog at the peer slows the catch-up.
        if !Position::more_waiting(batch.complete, batch.commits)
            || self.failure.is_some()
            || self.retained_overdue(now)
        {
            return Ok(None);
        }
        // A batch past `trompe.batch_size` holds a transaction larger than a batch, and DDL or
        // a TRUNCATE may wait for a table's lock, rewrite it or build an index: long to apply.
        // An answer sent ahead that did not fit the socket buffers would keep the peer's pull
        // transaction open (holding back its xmin) all that time, and a `CREATE INDEX
        // CONCURRENTLY` applied here waits for every older snapshot of this node, such as one
        // serving the peer's own pull sent ahead: two nodes doing both would wait for each
        // other for good.
        let changes: u64 = batch.txns.iter().map(|t| t.changes).sum();
        if changes > u64::try_from(crate::guc::BATCH_SIZE.get()).unwrap_or(0)
            || batch.txns.iter().any(|t| t.ddl_or_truncate)
        {
            return Ok(None);
        }
        let next = self.pos.after_transaction(cur, last.txn_last, batch.complete);
        self.send_pull_from(&next, batch.commits, now)?;
        Ok(Some(next))
    }

    /// After applying the answer that the pull in flight was sent ahead of, from `expected`:
    /// if applying stopped short of it, that pull's answer is dropped when it arrives. The peer
    /// had all of the apply's time to answer: its silence is timed from now.
    pub(super) fn answer_ahead_applied(&mut self, expected: &Position) {
        if self.state != State::Pulling {
            return;
        }
        if &self.pos != expected {
            self.discard_answer = true;
        }
        self.deadline_ms = pull_deadline_ms(now_ms());
    }

    /// The connection as the source of large objects while changes are applied: an answer
    /// still in flight on it (a pull sent ahead) is received first.
    pub(super) fn lo_source(&mut self) -> Option<ConnBehindAnswer> {
        let conn = self.conn.as_mut()? as *mut Conn;
        Some(ConnBehindAnswer { conn, incoming: &mut self.incoming as *mut BatchBuilder })
    }
}

/// A link's connection and the answer that may be in flight on it.
pub(super) struct ConnBehindAnswer {
    conn: *mut Conn,
    incoming: *mut BatchBuilder,
}

impl LoSource for ConnBehindAnswer {
    fn idle_conn(&mut self) -> Result<&mut Conn, String> {
        // SAFETY: the link that made this keeps its connection and its answer under
        // construction alive, and leaves both alone, while its changes are applied (see
        // `large_objects::with_source`).
        let (conn, incoming) = unsafe { (&mut *self.conn, &mut *self.incoming) };
        receive_rest(conn, incoming)?;
        Ok(conn)
    }
}

/// Receives the rest of the answer in flight on `conn` (none: returns at once) into
/// `incoming`, waiting for the peer as long as it does not stay silent.
fn receive_rest(conn: &mut Conn, incoming: &mut BatchBuilder) -> Result<(), String> {
    let silence = Duration::from_millis(peer_timeout_ms().max(1) as u64);
    let mut heard = Instant::now();
    while conn.flush().map_err(|e| e.describe())? == Want::Write {
        if heard.elapsed() >= silence {
            return Err("the peer did not take the request in time".into());
        }
        wait_socket(conn.socket(), Want::Write, silence);
    }
    loop {
        if conn.input_waiting() {
            heard = Instant::now();
        }
        conn.consume().map_err(|e| e.describe())?;
        match conn.next_row().map_err(|e| e.describe())? {
            RowStep::Row(row) => incoming.row(&row, 0)?,
            RowStep::End => return Ok(()),
            RowStep::Busy => {
                let left = silence.saturating_sub(heard.elapsed());
                if left.is_zero() {
                    return Err("the peer did not answer in time".into());
                }
                wait_socket(conn.socket(), Want::Read, left);
            }
        }
    }
}
