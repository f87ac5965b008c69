//! A pull's answer as it arrives: its header, then each transaction's log rows, kept in a spool.

use trompe_core::snapshot::Snapshot;

use crate::libpq::PgResult;
use crate::worker::spool::{Spool, SpoolBuilder, SpooledTxn};

/// A pull's answer: the step it read and its transactions, their log rows kept in `spool`.
pub(super) struct Batch {
    pub(super) cur: Option<Snapshot>,
    pub(super) complete: bool,
    pub(super) commits: i64,
    pub(super) pending: i64,
    pub(super) oldest_us: Option<i64>,
    pub(super) spool: Spool,
    pub(super) txns: Vec<SpooledTxn>,
}

/// A pull's answer as its rows arrive (one at a time, each kept undecoded in a spool): the
/// header row first, then the log rows of each transaction.
#[derive(Default)]
pub(super) struct BatchBuilder {
    pub(super) batch: Option<Batch>,
    pub(super) rows: SpoolBuilder,
}

impl BatchBuilder {
    /// Takes row `r` of `result`.
    pub(super) fn row(&mut self, result: &PgResult, r: usize) -> Result<(), String> {
        if self.batch.is_none() {
            if result.bytes(r, 0) != Some(b"H") {
                return Err("the peer's answer has no header".into());
            }
            let cur = match result.bytes(r, 1) {
                Some(t) => Some(
                    std::str::from_utf8(t)
                        .map_err(|e| e.to_string())?
                        .parse::<Snapshot>()
                        .map_err(|e| e.to_string())?,
                ),
                None => None,
            };
            self.batch = Some(Batch {
                cur,
                complete: result.bytes(r, 2) == Some(&[1]),
                commits: result.int8(r, 3).unwrap_or(-1),
                pending: result.int8(r, 4).unwrap_or(0),
                oldest_us: result.int8(r, 5),
                spool: Spool::default(),
                txns: Vec::new(),
            });
            return Ok(());
        }
        let txn_last = result.int8(r, 6).ok_or("a log row without transaction")?;
        let commit_us = result.int8(r, 7).ok_or_else(|| {
            format!("transaction {txn_last} has no commit time (is track_commit_timestamp on at the peer?)")
        })?;
        let bytes = result.bytes(r, 9).ok_or("a log row without changes")?;
        self.rows.row(txn_last, commit_us, bytes)
    }

    /// The whole answer, once every row arrived.
    pub(super) fn finish(self) -> Result<Batch, String> {
        let mut batch = self.batch.ok_or("the peer's answer has no header")?;
        (batch.spool, batch.txns) = self.rows.finish()?;
        Ok(batch)
    }
}
