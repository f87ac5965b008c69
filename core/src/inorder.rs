//! A transaction's changes in the order they were made, read one log chunk at a time.
//!
//! Each chunk holds changes in order, but chunks of one transaction can interleave: a
//! subtransaction that filled a chunk wrote it while its parent still buffered earlier changes
//! (see the capture buffer). The chunks are merged by the changes' positions, and a chunk is
//! loaded only when the merge reaches its first change and dropped once read: only the chunks
//! spanning the current position are held (one, unless subtransactions interleave).

use std::collections::VecDeque;

use crate::changeset::ChangeRecord;

/// One chunk of a transaction: its first change's position and where to load it from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRef {
    /// Position of its first change in the transaction.
    pub first_seq: u64,
    /// How many changes it holds.
    pub count: u64,
    /// Where its bytes are (opaque to the merge).
    pub offset: u64,
    /// How many bytes it takes.
    pub len: usize,
}

/// The changes of a transaction's chunks, in order; `load` decodes a chunk.
pub struct InOrder<'c, L> {
    /// The chunks not loaded yet, by first position.
    waiting: Vec<&'c ChunkRef>,
    next: usize,
    /// The loaded chunks' changes not yet returned.
    loaded: Vec<VecDeque<ChangeRecord>>,
    load: L,
}

impl<'c, E, L: FnMut(&ChunkRef) -> Result<Vec<ChangeRecord>, E>> InOrder<'c, L> {
    /// The changes of `chunks` (in any order), loaded with `load`.
    pub fn new(chunks: &'c [ChunkRef], load: L) -> Self {
        let mut waiting: Vec<&ChunkRef> = chunks.iter().filter(|c| c.count > 0).collect();
        waiting.sort_by_key(|c| c.first_seq);
        InOrder { waiting, next: 0, loaded: Vec::new(), load }
    }

    /// The loaded chunk holding the lowest next position, and that position.
    fn lowest_loaded(&self) -> Option<(usize, u64)> {
        self.loaded.iter().enumerate().filter_map(|(i, q)| q.front().map(|c| (i, c.seq))).min_by_key(|&(_, s)| s)
    }
}

impl<E, L: FnMut(&ChunkRef) -> Result<Vec<ChangeRecord>, E>> Iterator for InOrder<'_, L> {
    type Item = Result<ChangeRecord, E>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let lowest = self.lowest_loaded();
            let waiting = self.waiting.get(self.next).copied();
            let load_next = match (lowest, waiting) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some((_, seq)), Some(chunk)) => chunk.first_seq < seq,
            };
            if !load_next {
                let (i, _) = lowest?;
                let change = self.loaded[i].pop_front();
                if self.loaded[i].is_empty() {
                    self.loaded.swap_remove(i);
                }
                return change.map(Ok);
            }
            // The next chunk starts before anything loaded: load it.
            let chunk = waiting?;
            self.next += 1;
            match (self.load)(chunk) {
                Ok(changes) => {
                    if !changes.is_empty() {
                        self.loaded.push(changes.into());
                    }
                }
                Err(e) => {
                    // Nothing more after an error.
                    self.next = self.waiting.len();
                    self.loaded.clear();
                    return Some(Err(e));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changeset::OldVersion;
    use crate::logformat::Op;

    fn change(seq: u64) -> ChangeRecord {
        ChangeRecord {
            seq,
            op: Op::Insert,
            nsp: "public".into(),
            rel: "t".into(),
            cols: vec![],
            vals: None,
            oldkey: None,
            old: OldVersion::Unknown,
        }
    }

    /// Chunks given as lists of positions; returns the merged positions and the most chunks
    /// held at once.
    fn merge(chunks: &[Vec<u64>]) -> (Vec<u64>, usize) {
        let refs: Vec<ChunkRef> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| ChunkRef { first_seq: c[0], count: c.len() as u64, offset: i as u64, len: 0 })
            .collect();
        let held = std::cell::Cell::new(0usize);
        let most = std::cell::Cell::new(0usize);
        let mut order = InOrder::new(&refs, |c: &ChunkRef| -> Result<Vec<ChangeRecord>, ()> {
            held.set(held.get() + 1);
            most.set(most.get().max(held.get()));
            Ok(chunks[c.offset as usize].iter().map(|&s| change(s)).collect())
        });
        let mut out = Vec::new();
        while let Some(c) = order.next() {
            out.push(c.unwrap().seq);
            held.set(order.loaded.len());
        }
        (out, most.get())
    }

    #[test]
    fn sequential_chunks_are_held_one_at_a_time() {
        let (seqs, most) = merge(&[vec![1, 2, 3], vec![4, 5], vec![6]]);
        assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(most, 1);
    }

    #[test]
    fn chunks_of_subtransactions_interleave_with_their_parents() {
        // The parent buffered 1-2, a subtransaction wrote 3-5 and 6-7 as chunks, the parent
        // went on with 8-9 and wrote 1, 2, 8, 9 at commit; written in that order.
        let (seqs, most) = merge(&[vec![3, 4, 5], vec![6, 7], vec![1, 2, 8, 9]]);
        assert_eq!(seqs, (1..=9).collect::<Vec<_>>());
        assert_eq!(most, 2);
    }

    #[test]
    fn a_load_error_ends_the_changes() {
        let refs = [ChunkRef { first_seq: 1, count: 1, offset: 0, len: 0 }];
        let mut order = InOrder::new(&refs, |_: &ChunkRef| Err::<Vec<ChangeRecord>, _>("gone"));
        assert_eq!(order.next(), Some(Err("gone")));
        assert_eq!(order.next(), None);
    }
}
