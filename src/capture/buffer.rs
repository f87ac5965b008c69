//! The per-transaction buffer of captured changes. Changes are encoded into memory as they
//! happen and written to the log as one row when the transaction commits (or in chunks when it
//! grows large), so a transaction costs one log insert, not one per changed row.
//!
//! Subtransactions keep their own buffer: a rolled-back savepoint drops its changes, a released
//! one hands them to its parent. A chunk written while a subtransaction is open holds only that
//! subtransaction's changes, so it disappears exactly when they must. A released subtransaction
//! whose changes would take its parent's buffer past the chunk size writes both as a chunk just
//! before it commits (their fate is the parent's from then on), so a transaction of many
//! savepoints is written in bounded chunks too. Changes carry their position in the
//! transaction; readers order a transaction's changes by it.

use std::cell::{Cell, RefCell};

use pgrx::pg_sys;

use crate::error::TrompeError;

/// A chunk is written once a buffer holds this many changes...
const CHUNK_CHANGES: u64 = 4096;
/// ...or this many bytes.
const CHUNK_BYTES: usize = 4 << 20;

#[derive(Default)]
struct Level {
    bytes: Vec<u8>,
    count: u64,
}

thread_local! {
    /// Buffers by subtransaction nesting level (index 0 is the top-level transaction).
    static LEVELS: RefCell<Vec<Level>> = const { RefCell::new(Vec::new()) };
    /// Position of the next change in this transaction.
    static SEQ: Cell<u64> = const { Cell::new(0) };
    /// The nesting level whose buffer and its parent's were written as a chunk by
    /// `release_subtransaction`: emptied when it commits, kept if it aborts after all.
    static RELEASED_INTO_LOG: Cell<Option<usize>> = const { Cell::new(None) };
    /// The log table this transaction appends to, once chosen.
    static LOG_SLOT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The log table this transaction appends to, chosen on its first change.
fn log_slot_for_transaction() -> Result<usize, TrompeError> {
    if let Some(slot) = LOG_SLOT.get() {
        return Ok(slot);
    }
    let slot = crate::log::rotation::current_slot()?;
    LOG_SLOT.set(Some(slot));
    Ok(slot)
}

/// Whether a buffer of `count` changes and `bytes` bytes is due to be written as a chunk.
fn full(count: u64, bytes: usize) -> bool {
    count >= CHUNK_CHANGES || bytes >= CHUNK_BYTES
}

pub(crate) fn nest_level() -> usize {
    // SAFETY: reads the current transaction's nesting level (1 for the top level).
    (unsafe { pg_sys::GetCurrentTransactionNestLevel() }).max(1) as usize
}

/// The most bytes one change may take once encoded: a chunk holds it with less than two chunk
/// sizes of other changes (a buffer that was not full yet, and its parent's when a released
/// subtransaction is written with it), and a chunk is one `bytea` value, which PostgreSQL
/// holds only up to 1 GB (MaxAllocSize), at the origin and on every peer.
pub const MAX_CHANGE_BYTES: usize = 0x3fff_ffff - 2 * CHUNK_BYTES - (1 << 20);

/// Records one change of the current (sub)transaction to table `nsp.rel` (or DDL on that
/// object): `encode` writes it into the buffer, given its position in the transaction. A
/// change larger than [`MAX_CHANGE_BYTES`] is refused (the statement fails here rather than
/// the log or a peer later). Called through `xact::record`, which makes sure the
/// transaction's end writes the buffer.
pub(super) fn record(nsp: &str, rel: &str, encode: impl FnOnce(&mut Vec<u8>, u64)) -> Result<(), TrompeError> {
    // Choose the log table now, while a snapshot is active (it is not at commit time).
    log_slot_for_transaction()?;
    let depth = nest_level();
    let seq = SEQ.get() + 1;
    let full = LEVELS.with(|levels| {
        let mut levels = levels.borrow_mut();
        if levels.len() < depth {
            levels.resize_with(depth, Level::default);
        }
        let level = &mut levels[depth - 1];
        let before = level.bytes.len();
        encode(&mut level.bytes, seq);
        let size = level.bytes.len() - before;
        if size > MAX_CHANGE_BYTES {
            level.bytes.truncate(before);
            level.bytes.shrink_to(CHUNK_BYTES);
            return Err(TrompeError::ChangeTooLarge {
                table: format!("{nsp}.{rel}"),
                mb: size as u64 >> 20,
                max_mb: MAX_CHANGE_BYTES as u64 >> 20,
            });
        }
        level.count += 1;
        Ok(full(level.count, level.bytes.len()))
    })?;
    SEQ.set(seq);
    if full {
        flush_level(depth)?;
    }
    Ok(())
}

/// A buffer up to this size is kept for the next transaction instead of being freed.
const KEEP_BYTES: usize = 64 << 10;

/// Writes the buffer of nesting level `depth` as a log row (in the current subtransaction).
fn flush_level(depth: usize) -> Result<(), TrompeError> {
    let taken = LEVELS.with(|levels| {
        let mut levels = levels.borrow_mut();
        levels.get_mut(depth - 1).map(std::mem::take)
    });
    let Some(mut level) = taken.filter(|l| l.count > 0) else { return Ok(()) };
    let slot = log_slot_for_transaction()?;
    crate::log::writer::append_chunk(slot, level.count, &level.bytes)?;
    if level.bytes.capacity() <= KEEP_BYTES {
        // Hand the emptied buffer back, so the next changes reuse its memory.
        level.bytes.clear();
        level.count = 0;
        LEVELS.with(|levels| {
            if let Some(l) = levels.borrow_mut().get_mut(depth - 1).filter(|l| l.count == 0) {
                *l = level;
            }
        });
    }
    Ok(())
}

/// Writes everything still buffered, at commit or prepare of the top-level transaction.
pub fn flush_all() -> Result<(), TrompeError> {
    // Released subtransactions were merged into level 1 already; anything deeper is empty.
    flush_level(1)
}

/// A subtransaction is about to commit (still in progress): if its changes would take its
/// parent's buffer to the chunk size, writes the parent's and its changes as one chunk now,
/// inside the subtransaction, whose rows become the parent's when it commits. The buffers are
/// emptied only when it does commit (`end_subtransaction`): if it aborts after all, the chunk
/// is rolled back and the parent still holds its changes.
pub fn release_subtransaction() -> Result<(), TrompeError> {
    let depth = nest_level();
    if depth < 2 {
        return Ok(());
    }
    let merged = LEVELS.with(|levels| {
        let levels = levels.borrow();
        let (Some(parent), Some(child)) = (levels.get(depth - 2), levels.get(depth - 1)) else {
            return None;
        };
        if child.count == 0 || !full(parent.count + child.count, parent.bytes.len() + child.bytes.len()) {
            return None;
        }
        let mut bytes = Vec::with_capacity(parent.bytes.len() + child.bytes.len());
        bytes.extend_from_slice(&parent.bytes);
        bytes.extend_from_slice(&child.bytes);
        Some((parent.count + child.count, bytes))
    });
    let Some((count, bytes)) = merged else { return Ok(()) };
    let slot = log_slot_for_transaction()?;
    crate::log::writer::append_chunk(slot, count, &bytes)?;
    RELEASED_INTO_LOG.set(Some(depth));
    Ok(())
}

/// A subtransaction ended: hand its changes to the parent, or drop them.
pub fn end_subtransaction(committed: bool) {
    let depth = nest_level();
    let written = RELEASED_INTO_LOG.take() == Some(depth);
    LEVELS.with(|levels| {
        let mut levels = levels.borrow_mut();
        if levels.len() < depth {
            return;
        }
        if committed && written {
            // Its changes and its parent's are in the log (see `release_subtransaction`).
            levels.truncate(depth - 1);
            if let Some(parent) = levels.get_mut(depth - 2) {
                *parent = Level::default();
            }
            return;
        }
        let child = levels.split_off(depth - 1).into_iter().next().unwrap_or_default();
        if committed && child.count > 0 && depth >= 2 {
            if levels.len() < depth - 1 {
                levels.resize_with(depth - 1, Level::default);
            }
            let parent = &mut levels[depth - 2];
            parent.bytes.extend_from_slice(&child.bytes);
            parent.count += child.count;
        }
    });
}

/// Forgets everything (the top-level transaction ended), keeping a small top-level buffer's
/// memory for the next transaction.
pub fn reset() {
    LEVELS.with(|levels| {
        let mut levels = levels.borrow_mut();
        levels.truncate(1);
        if let Some(top) = levels.first_mut() {
            if top.bytes.capacity() > KEEP_BYTES {
                top.bytes = Vec::new();
            }
            top.bytes.clear();
            top.count = 0;
        }
    });
    SEQ.set(0);
    LOG_SLOT.set(None);
    RELEASED_INTO_LOG.set(None);
}

/// This transaction's changes not written to the log yet, as one chunk (for inspection).
pub fn pending() -> Option<Vec<u8>> {
    LEVELS.with(|levels| {
        let levels = levels.borrow();
        let count: u64 = levels.iter().map(|l| l.count).sum();
        if count == 0 {
            return None;
        }
        let bytes: Vec<u8> = levels.iter().flat_map(|l| l.bytes.iter().copied()).collect();
        Some(trompe_core::changeset::chunk(count, &bytes))
    })
}
