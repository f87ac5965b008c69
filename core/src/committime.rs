//! A fixed-size, lock-free cache of transactions' commit times and replication origins, meant to
//! live in shared memory in front of PostgreSQL's `pg_commit_ts`.
//!
//! Capture and apply look up the version (commit time, origin) of every row they replace.
//! PostgreSQL 15 keeps only a few pages of commit timestamps in memory, so on a large table most
//! lookups read `pg_commit_ts` from disk, holding the lock that every commit needs. Transactions
//! that write replicated rows record their commit here; a lookup finds an entry only if it was
//! recorded for exactly that transaction (its 64-bit id), and falls back to PostgreSQL otherwise.
//!
//! An entry is a tag (48 bits of the full transaction id, 16 bits of origin) and a commit time.
//! A writer claims an entry by swapping its tag for [`BUSY`] (two transactions that map to the
//! same entry at the same moment: one of them is simply not recorded), writes the time, then
//! publishes the tag. A reader reads the tag, the time, and the tag again: the time is the
//! tagged transaction's only if the tag did not change in between (a seqlock whose sequence is
//! the tag itself, which no transaction publishes twice).

use std::sync::atomic::{fence, AtomicI64, AtomicU64, Ordering};

/// One cached commit. Its layout is what the shared memory holds (16 bytes).
#[repr(C)]
#[derive(Default)]
pub struct Entry {
    tag: AtomicU64,
    time: AtomicI64,
}

/// Tag of an entry being written.
const BUSY: u64 = u64::MAX;
/// Tag of an entry never written (no normal transaction id is 0).
const EMPTY: u64 = 0;
const XID_BITS: u32 = 48;
const XID_MASK: u64 = (1 << XID_BITS) - 1;

fn tag(full_xid: u64, origin: u16) -> u64 {
    (u64::from(origin) << XID_BITS) | (full_xid & XID_MASK)
}

/// The 64-bit transaction id of a 32-bit one, taken as the one nearest to `reference` (a
/// current full transaction id). Exact for every transaction id that can still appear in a
/// row: PostgreSQL freezes rows long before their writer is 2^31 transactions old.
pub fn widen(xid: u32, reference: u64) -> u64 {
    let distance = i64::from(xid.wrapping_sub(reference as u32) as i32);
    reference.wrapping_add(distance as u64)
}

/// A cache over a slice of entries (in shared memory, or anywhere for tests).
pub struct CommitTimes<'a> {
    entries: &'a [Entry],
}

impl<'a> CommitTimes<'a> {
    /// A cache over `entries` (all-zero memory is an empty cache).
    pub fn new(entries: &'a [Entry]) -> Self {
        CommitTimes { entries }
    }

    fn entry(&self, full_xid: u64) -> Option<&Entry> {
        if self.entries.is_empty() {
            return None;
        }
        self.entries.get((full_xid % self.entries.len() as u64) as usize)
    }

    /// Records that transaction `full_xid` committed at `time` with replication origin `origin`.
    /// Best effort: skipped while another writer holds the same entry.
    pub fn record(&self, full_xid: u64, time: i64, origin: u16) {
        let Some(entry) = self.entry(full_xid) else { return };
        let current = entry.tag.load(Ordering::Relaxed);
        if current == BUSY || entry.tag.compare_exchange(current, BUSY, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            return;
        }
        // Readers that see the new time must also see BUSY (or later) when they read the tag
        // again.
        fence(Ordering::Release);
        entry.time.store(time, Ordering::Relaxed);
        entry.tag.store(tag(full_xid, origin), Ordering::Release);
    }

    /// The commit time and origin recorded for transaction `full_xid`, if it is cached.
    pub fn lookup(&self, full_xid: u64) -> Option<(i64, u16)> {
        let entry = self.entry(full_xid)?;
        let before = entry.tag.load(Ordering::Acquire);
        if before == BUSY || before == EMPTY || before & XID_MASK != full_xid & XID_MASK {
            return None;
        }
        let time = entry.time.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        let after = entry.tag.load(Ordering::Relaxed);
        (after == before).then_some((time, (before >> XID_BITS) as u16))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(n: usize) -> Vec<Entry> {
        (0..n).map(|_| Entry::default()).collect()
    }

    #[test]
    fn an_entry_is_found_only_for_the_transaction_that_recorded_it() {
        let e = entries(8);
        let cache = CommitTimes::new(&e);
        assert_eq!(cache.lookup(1000), None, "empty");
        cache.record(1000, 42, 7);
        assert_eq!(cache.lookup(1000), Some((42, 7)));
        assert_eq!(cache.lookup(1008), None, "same entry, other transaction");
        assert_eq!(cache.lookup(1000 + (1 << 32)), None, "same 32-bit id, other epoch");
        cache.record(1008, 43, 0);
        assert_eq!(cache.lookup(1000), None, "evicted");
        assert_eq!(cache.lookup(1008), Some((43, 0)));
    }

    #[test]
    fn an_empty_cache_finds_nothing() {
        let cache = CommitTimes::new(&[]);
        cache.record(5, 1, 1);
        assert_eq!(cache.lookup(5), None);
    }

    #[test]
    fn a_32_bit_id_widens_to_the_nearest_full_id() {
        let epoch = 3u64 << 32;
        assert_eq!(widen(100, epoch + 200), epoch + 100, "older, same epoch");
        assert_eq!(widen(300, epoch + 200), epoch + 300, "newer, same epoch");
        assert_eq!(widen(u32::MAX - 5, epoch + 10), epoch - 6, "older, previous epoch");
        assert_eq!(widen(10, epoch + u64::from(u32::MAX) - 5), epoch + (1 << 32) + 10, "newer, next epoch");
    }

    #[test]
    fn concurrent_writers_never_let_a_reader_see_another_transactions_time() {
        // Transaction x commits at time 10 * x with origin x % 3; four entries for three
        // writers, so entries are claimed and overwritten all the time. A torn or mixed entry
        // would show a time or origin that does not belong to the id looked up.
        use std::sync::atomic::AtomicU64;
        let e = entries(4);
        let cache = CommitTimes::new(&e);
        let latest = AtomicU64::new(0);
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let writers: Vec<_> = (0..3u64)
                .map(|w| {
                    let (cache, latest) = (&cache, &latest);
                    s.spawn(move || {
                        for x in (1..300_000u64).filter(|x| x % 3 == w) {
                            cache.record(x, 10 * x as i64, (x % 3) as u16);
                            latest.store(x, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            let reader = s.spawn(|| {
                let (mut looked, mut found) = (0u64, 0u64);
                while !done.load(Ordering::Relaxed) || looked == 0 {
                    let x = latest.load(Ordering::Relaxed);
                    for x in x.saturating_sub(2)..=x + 2 {
                        looked += 1;
                        if let Some((time, origin)) = cache.lookup(x) {
                            assert_eq!((time, origin), (10 * x as i64, (x % 3) as u16), "transaction {x}");
                            found += 1;
                        }
                    }
                }
                (looked, found)
            });
            for w in writers {
                w.join().expect("writer");
            }
            done.store(true, Ordering::Relaxed);
            let (looked, found) = reader.join().expect("reader");
            assert!(found > 0, "{looked} lookups, none found: the test did not exercise the cache");
        });
    }
}
