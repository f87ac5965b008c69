//! Transactions that write tombstones or truncation markers announce it before they commit and
//! bump the tombstone generation when they end (committed or not), so that sessions which cached
//! which tables have tombstones look again (see `capture::local_writes`). Capture's transactions are
//! tracked here for the capture callbacks (`capture::xact`), apply's for the worker, and `COMMIT
//! PREPARED` for the utility hook.

use std::cell::Cell;

thread_local! {
    /// This (captured) transaction wrote tombstones or truncation markers.
    static CAPTURE_WROTE: Cell<bool> = const { Cell::new(false) };
    /// The current apply transaction wrote tombstones or truncation markers.
    static APPLY_WROTE: Cell<bool> = const { Cell::new(false) };
}

/// Records that this transaction wrote tombstones or truncation markers.
pub fn note_markers_written() {
    if !CAPTURE_WROTE.get() {
        crate::shmem::announce_tombstone_writer();
    }
    CAPTURE_WROTE.set(true);
}

/// A transaction ended (committed, aborted or prepared): balances the announcement of its
/// marker writes.
pub fn capture_transaction_ended() {
    if CAPTURE_WROTE.replace(false) {
        crate::shmem::bump_tombstone_generation();
    }
}

/// Notes that the current apply transaction wrote tombstones or truncation markers, and
/// announces it before it commits.
pub fn note_tombstones_written() {
    if !APPLY_WROTE.replace(true) {
        crate::shmem::announce_tombstone_writer();
    }
}

/// After an apply transaction ended (committed or not): balances the announcement of its
/// tombstone writes.
pub fn after_apply_transaction() {
    if APPLY_WROTE.replace(false) {
        crate::shmem::bump_tombstone_generation();
    }
}

/// A `COMMIT PREPARED` running: it may commit markers that the prepared transaction wrote (its
/// session balanced its own announcement when it prepared). Announced as a writer until the
/// returned guard is dropped, which balances it, also when the statement fails.
pub fn prepared_commit_starts() -> PreparedCommit {
    crate::shmem::announce_tombstone_writer();
    PreparedCommit
}

/// See [`prepared_commit_starts`].
pub struct PreparedCommit;

impl Drop for PreparedCommit {
    fn drop(&mut self) {
        crate::shmem::bump_tombstone_generation();
    }
}
