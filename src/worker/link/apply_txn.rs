//! Applying one pulled transaction as one local transaction, with its position.

use std::sync::atomic::Ordering;

use pgrx::{pg_sys, PgSqlErrorCode};
use trompe_core::position::{in_origin, Position};

use super::Link;
use crate::large_objects::LoSource;
use crate::worker::apply::{apply_segment, finish_transaction, ApplyCache, Change, TxnProgress};
use crate::worker::progress;
use crate::worker::spool::{Spool, SpooledTxn};
use crate::worker::txn::{in_transaction, in_transaction_coded, TxnError};

impl Link {
    /// Applies one origin transaction as one local transaction, segment by segment as it is
    /// read back from `spool`, with the origin's commit time recorded as this transaction's
    /// (through the peer's replication origin, set up by the caller), and the new position
    /// stored in the same transaction. With `set_aside` (the error it failed with), the
    /// transaction is kept in `trompe.exceptions` instead of applied. Returns whether it had DDL.
    pub(super) fn apply_transaction(
        &mut self,
        cache: &mut ApplyCache,
        spool: &Spool,
        txn: &SpooledTxn,
        next: &Position,
        set_aside: Option<&str>,
    ) -> Result<bool, TxnError> {
        let commit_us = txn.commit_us;
        // SAFETY: the timestamp the next commit records for the session's replication origin.
        unsafe { pg_sys::replorigin_session_origin_timestamp = commit_us };
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
        let (txns, changes) = (self.stored.unsaved_txns + 1, self.stored.unsaved_changes + txn.changes as i64);
        // DDL that cannot run in a transaction block runs on its own first; the apply
        // transaction then only moves the position past it.
        // (Not asked of a transaction set aside: its changes may not even decode.)
        let alone = if set_aside.is_some() { None } else { outside_transaction(spool, txn)? };
        let ran_alone = match alone {
            Some((kind, change)) => {
                let part =
                    |i: usize| change.vals.as_ref().and_then(|v| v.get(i).cloned().flatten()).unwrap_or_default();
                let settings = trompe_core::ddlsettings::decode(change.vals.as_deref().unwrap_or_default());
                crate::worker::toplevel::run(kind, &part(0), &part(1), &part(2), &settings, &change.rel)?;
                true
            }
            None => false,
        };
        // Large objects the changes refer to are copied over this connection (once the answer
        // of a pull sent ahead has arrived).
        let mut source = self.lo_source();
        let source = source.as_mut().map(|s| s as *mut super::ahead::ConnBehindAnswer as *mut dyn LoSource);
        let mut had_ddl = ran_alone;
        let stored_offset = self.stored.origin_holds_after.then_some(offset);
        let mut attempt = |cache: &mut ApplyCache, careful: bool| {
            let result = in_transaction_coded(|| {
                progress::take_apply_lock();
                // Before anything it writes is announced (see capture::local_writes::pre_commit).
                crate::shmem::note_applied_commit(commit_us);
                cache.begin_transaction();
                // SAFETY: SPI is connected for the statements of this transaction and finished
                // below (an error aborts the transaction, which cleans SPI up).
                unsafe { pg_sys::SPI_connect() };
                match set_aside {
                    Some(error) => crate::exceptions::set_aside(
                        &self.node,
                        &self.name,
                        txn.txn_last,
                        txn.commit_us,
                        txn.changes(spool),
                        txn.raw_rows(spool),
                        error,
                    )?,
                    None if ran_alone => {}
                    None => {
                        let mut progress = TxnProgress::start();
                        for segment in txn.segments(spool) {
                            apply_segment(cache, &segment?, self.node, careful, &mut progress)?;
                        }
                        finish_transaction()?;
                        had_ddl |= progress.had_ddl();
                    }
                }
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
            crate::marker_writes::after_apply_transaction();
            result
        };
        crate::large_objects::with_source(source, || match attempt(cache, false) {
            // A row collided with another on a unique constraint other than the primary key:
            // do it again, resolving such collisions before each write.
            Err(e) if e.code == Some(PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION) => attempt(cache, true),
            other => other,
        })?;
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
        Ok(had_ddl)
    }
}

/// The DDL change and what it does, if `txn` is one DDL statement that cannot run inside a
/// transaction block.
fn outside_transaction(
    spool: &Spool,
    txn: &SpooledTxn,
) -> Result<Option<(crate::worker::toplevel::Kind, Change)>, TxnError> {
    if txn.changes != 1 || !txn.ddl_or_truncate {
        return Ok(None);
    }
    let Some(change) = txn.changes(spool).next().transpose()? else { return Ok(None) };
    if change.op != trompe_core::logformat::Op::Ddl {
        return Ok(None);
    }
    let statement = change.vals.as_ref().and_then(|v| v.first().cloned().flatten()).unwrap_or_default();
    let kind = in_transaction(|| Ok(crate::worker::toplevel::kind_of(&statement)))?;
    Ok(kind.map(|k| (k, change)))
}
