//! How far a node has applied one peer's log.
//!
//! The peer's log is read in steps from one snapshot of the peer to a later one: the step
//! `(done, cur]` holds the transactions `cur` sees and `done` does not. Inside a step,
//! transactions are applied ordered by their last log id, so a position inside a step is
//! "every transaction of the step whose last id is at most `after`".

use crate::snapshot::Snapshot;

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

    /// True if every transaction the origin had committed when it took `snapshot` is applied.
    pub fn covers(&self, snapshot: &Snapshot) -> bool {
        self.done.covers(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(s: &str) -> Snapshot {
        s.parse().unwrap()
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
