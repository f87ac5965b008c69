//! How far a node has applied one peer's log.
//!
//! The peer's log is read in steps from one snapshot of the peer to a later one: the step
//! `(done, cur]` holds the transactions `cur` sees and `done` does not. Inside a step,
//! transactions are applied ordered by their last log id, so a position inside a step is
//! "every transaction of the step whose last id is at most `after`".

use crate::snapshot::Snapshot;

/// The commit counter a pull answers with when its step ends at a mark, before the origin's
/// current snapshot: never a counter's value, so the consumer's next pull does not wait for
/// news, and the consumer knows more is waiting.
pub const STEP_ENDS_BEFORE_NOW: i64 = -3;

/// A position in one origin's log, stored on the applying node in the same local transaction
/// as the changes it covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    /// Every transaction this snapshot of the origin sees has been applied.
    pub done: Snapshot,
    /// The step being applied, if any: `cur` and the last id of the last transaction applied.
    pub step: Option<Step>,
}

/// A step from `Position::done` to `cur` that has been applied up to the transaction whose last
/// log id is `after`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// The snapshot the step reads up to.
    pub cur: Snapshot,
    /// Transactions of the step with a last log id up to this one are applied.
    pub after: i64,
}

impl Position {
    /// The position of a node that has applied everything `done` sees and nothing else.
    pub fn at(done: Snapshot) -> Self {
        Position { done, step: None }
    }

    /// The position after applying, inside the step to `cur`, the transaction whose last id is
    /// `last_id`; if that was the step's last transaction, the step is complete.
    pub fn after_transaction(&self, cur: &Snapshot, last_id: i64, step_complete: bool) -> Self {
        if step_complete {
            Position::at(cur.clone())
        } else {
            Position { done: self.done.clone(), step: Some(Step { cur: cur.clone(), after: last_id }) }
        }
    }

    /// Whether a pull of the step to `cur` that answered `complete` and the commit counter
    /// `commits` left more transactions waiting at the origin: the rest of the step, or
    /// (a step that ended at a mark) the steps after it.
    pub fn more_waiting(complete: bool, commits: i64) -> bool {
        !complete || commits == STEP_ENDS_BEFORE_NOW
    }

    /// True if every transaction the origin had committed when it took `snapshot` is applied.
    pub fn covers(&self, snapshot: &Snapshot) -> bool {
        self.done.covers(snapshot)
    }
}

/// Inside a step, the applying node keeps `after` in the peer's replication origin instead of
/// writing its progress table with every transaction: each transaction commits with the
/// origin's remote position set to `after + offset`, atomically with its changes (as native
/// logical replication keeps the remote LSN), and the table is written only when a step starts
/// or ends, with the step, `after` and `offset`. An origin's position only moves forward, but
/// log ids can be lower in a later step than in the one before: a step that starts below the
/// origin's position gets a larger offset.
pub mod in_origin {
    /// The origin position that records `after` under `offset`.
    pub fn value(after: i64, offset: i64) -> u64 {
        (after.max(0) as u64).saturating_add(offset.max(0) as u64)
    }

    /// The offset for a step whose first transaction has id `after`, given the offset so far
    /// and the origin's current position: the same offset if that moves the origin forward.
    pub fn offset_for_step(after: i64, offset: i64, origin: u64) -> i64 {
        if value(after, offset) > origin {
            offset.max(0)
        } else {
            (origin.saturating_add(1).saturating_sub(after.max(0) as u64)).min(i64::MAX as u64) as i64
        }
    }

    /// The `after` of the recorded step: what the origin records (every commit that moved it
    /// since the table was written belongs to that step), or the table's value if the origin
    /// has not moved past it (not used yet, or recreated).
    pub fn after(table_after: i64, offset: i64, origin: u64) -> i64 {
        let from_origin = origin as i128 - offset.max(0) as i128;
        table_after.max(from_origin.clamp(i64::MIN as i128, i64::MAX as i128) as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(s: &str) -> Snapshot {
        s.parse().unwrap()
    }

    #[test]
    fn more_waits_behind_an_incomplete_step_or_a_step_that_ended_at_a_mark() {
        assert!(Position::more_waiting(false, 7));
        assert!(Position::more_waiting(true, STEP_ENDS_BEFORE_NOW));
        assert!(!Position::more_waiting(true, 7), "a complete step up to now: the next pull waits for news");
        assert!(!Position::more_waiting(true, -1));
    }

    #[test]
    fn after_kept_in_the_origin_survives_steps_that_go_back() {
        use super::in_origin::*;
        // Step 1 starts at id 100 with a fresh origin (0).
        let off = offset_for_step(100, 0, 0);
        assert_eq!(off, 0);
        let mut origin = value(100, off);
        origin = origin.max(value(150, off));
        assert_eq!(after(100, off, origin), 150, "the origin knows the last transaction of the step");
        // Step 2 starts at id 120, below the origin (150): the offset grows.
        let off2 = offset_for_step(120, off, origin);
        assert!(value(120, off2) > origin);
        let origin2 = value(130, off2);
        assert!(origin2 > origin, "the origin keeps moving forward");
        assert_eq!(after(120, off2, origin2), 130);
        // A table written at step start with the origin not moved yet, or an origin recreated.
        assert_eq!(after(120, off2, value(120, off2)), 120);
        assert_eq!(after(120, off2, 0), 120);
        // A step starting above the origin keeps the offset.
        assert_eq!(offset_for_step(10_000, off2, origin2), off2);
    }

    #[test]
    fn step_progress_and_completion() {
        let p = Position::at(snap("10:10:"));
        let cur = snap("12:20:12");
        let mid = p.after_transaction(&cur, 40, false);
        assert_eq!(mid.done, snap("10:10:"));
        assert_eq!(mid.step, Some(Step { cur: cur.clone(), after: 40 }));
        assert!(!mid.covers(&snap("11:11:")));
        let end = mid.after_transaction(&cur, 55, true);
        assert_eq!(end, Position::at(cur.clone()));
        assert!(end.covers(&snap("11:11:")));
        assert!(!end.covers(&snap("13:13:")));
    }
}
