//! Transaction snapshots (`pg_snapshot`) and the visibility rules trompe reads its log with.
//!
//! A snapshot `xmin:xmax:xip` says which transactions had committed when it was taken: every
//! transaction id below `xmin`, and those below `xmax` that are not listed in `xip` (in progress).
//! Reading "what became visible between snapshot A and snapshot B" never skips a long
//! transaction that commits late, which "everything after id X" would.

use std::fmt;
use std::str::FromStr;

/// A 64-bit transaction id (`xid8`).
pub type Xid = u64;

/// A transaction snapshot as PostgreSQL's `pg_snapshot` prints it: `xmin:xmax:xip1,xip2,...`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Snapshot {
    /// Every transaction below this had finished when the snapshot was taken.
    pub xmin: Xid,
    /// No transaction at or above this had finished when the snapshot was taken.
    pub xmax: Xid,
    /// Transactions in `[xmin, xmax)` that were still running, sorted ascending.
    pub xip: Vec<Xid>,
}

/// Why a snapshot text could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    /// The text does not have the `xmin:xmax:xip` shape.
    #[error("invalid snapshot \"{0}\": expected xmin:xmax:xip1,xip2,...")]
    Malformed(String),
    /// The numbers are not ordered as a snapshot's must be.
    #[error("invalid snapshot \"{0}\": need xmin <= every in-progress id < xmax")]
    Inconsistent(String),
}

impl Snapshot {
    /// True if the transaction `xid` had committed (or aborted) when this snapshot was taken.
    pub fn sees(&self, xid: Xid) -> bool {
        xid < self.xmin || (xid < self.xmax && self.xip.binary_search(&xid).is_err())
    }

    /// True if every transaction that `other` sees, this snapshot sees too: this snapshot was
    /// taken at or after `other` as far as any transaction could tell.
    pub fn covers(&self, other: &Snapshot) -> bool {
        if other.xmax > self.xmax {
            // Every id in [self.xmax, other.xmax) must be invisible to `other`.
            let span = other.xmax - self.xmax;
            let hidden = other.xip.iter().filter(|&&x| x >= self.xmax).count() as u64;
            if hidden != span {
                return false;
            }
        }
        self.xip.iter().all(|&x| !other.sees(x))
    }

    /// True if both snapshots see exactly the same transactions.
    pub fn same_view(&self, other: &Snapshot) -> bool {
        self.covers(other) && other.covers(self)
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:", self.xmin, self.xmax)?;
        for (i, x) in self.xip.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{x}")?;
        }
        Ok(())
    }
}

impl FromStr for Snapshot {
    type Err = SnapshotError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let malformed = || SnapshotError::Malformed(text.to_string());
        let mut parts = text.trim().splitn(3, ':');
        let xmin = parts.next().and_then(|p| p.parse().ok()).ok_or_else(malformed)?;
        let xmax = parts.next().and_then(|p| p.parse().ok()).ok_or_else(malformed)?;
        let rest = parts.next().ok_or_else(malformed)?;
        let mut xip = Vec::new();
        if !rest.is_empty() {
            for item in rest.split(',') {
                xip.push(item.parse::<Xid>().map_err(|_| malformed())?);
            }
        }
        xip.sort_unstable();
        xip.dedup();
        let consistent = xmin <= xmax && xip.iter().all(|&x| x >= xmin && x < xmax);
        if !consistent {
            return Err(SnapshotError::Inconsistent(text.to_string()));
        }
        Ok(Snapshot { xmin, xmax, xip })
    }
}

/// Where a step from position `done` should end among `marks` (earlier snapshots of the same
/// node, oldest first) so that it spans about `target` transaction ids: the newest mark at
/// most `target` ids past `done`, or else the first mark past it. Only a mark that covers
/// `done`, sees more than it, and that `now` (the node's current snapshot) covers qualifies;
/// `None` if none does.
pub fn bounded_step_end(
    done: &Snapshot,
    now: &Snapshot,
    marks: impl IntoIterator<Item = Snapshot>,
    target: Xid,
) -> Option<Snapshot> {
    let mut chosen = None;
    for mark in marks {
        if !mark.covers(done) || mark.same_view(done) || !now.covers(&mark) {
            continue;
        }
        let within = mark.xmax.saturating_sub(done.xmax) <= target;
        if within || chosen.is_none() {
            chosen = Some(mark);
        }
        if !within {
            break;
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(s: &str) -> Snapshot {
        s.parse().unwrap()
    }

    #[test]
    fn a_step_ends_at_the_newest_mark_within_its_target() {
        let done = snap("100:100:");
        let now = snap("50000:50000:");
        let marks = ["90:95:", "100:100:", "3000:3000:", "9000:9010:9005", "20000:20000:", "40000:40000:"];
        let end = bounded_step_end(&done, &now, marks.iter().map(|m| snap(m)), 10_000);
        assert_eq!(end, Some(snap("9000:9010:9005")), "the newest within 10,000 ids");
        let end = bounded_step_end(&done, &now, ["20000:20000:", "40000:40000:"].iter().map(|m| snap(m)), 10_000);
        assert_eq!(end, Some(snap("20000:20000:")), "else the first past the position");
        let end = bounded_step_end(&done, &now, ["100:100:", "60000:60000:"].iter().map(|m| snap(m)), 10_000);
        assert_eq!(end, None, "no mark between the position and now");
    }

    #[test]
    fn a_step_never_ends_at_a_mark_that_misses_what_the_position_saw() {
        // The position saw 105 (committed after the mark was taken, while 105 ran).
        let done = snap("104:106:104");
        let now = snap("50000:50000:");
        let marks = ["100:200:105", "150:300:"];
        let end = bounded_step_end(&done, &now, marks.iter().map(|m| snap(m)), 10_000);
        assert_eq!(end, Some(snap("150:300:")));
    }

    #[test]
    fn parses_and_prints() {
        assert_eq!(snap("10:20:12,15").to_string(), "10:20:12,15");
        assert_eq!(snap("10:10:").to_string(), "10:10:");
        assert_eq!(snap("5:9:7,6").xip, vec![6, 7]);
    }

    #[test]
    fn rejects_bad_text() {
        assert!(matches!("".parse::<Snapshot>(), Err(SnapshotError::Malformed(_))));
        assert!(matches!("1:2".parse::<Snapshot>(), Err(SnapshotError::Malformed(_))));
        assert!(matches!("a:2:".parse::<Snapshot>(), Err(SnapshotError::Malformed(_))));
        assert!(matches!("1:2:x".parse::<Snapshot>(), Err(SnapshotError::Malformed(_))));
        assert!(matches!("5:2:".parse::<Snapshot>(), Err(SnapshotError::Inconsistent(_))));
        assert!(matches!("5:9:9".parse::<Snapshot>(), Err(SnapshotError::Inconsistent(_))));
        assert!(matches!("5:9:4".parse::<Snapshot>(), Err(SnapshotError::Inconsistent(_))));
    }

    #[test]
    fn visibility() {
        let s = snap("10:20:12,15");
        assert!(s.sees(3));
        assert!(s.sees(10));
        assert!(!s.sees(12));
        assert!(s.sees(13));
        assert!(!s.sees(20));
        assert!(!s.sees(25));
    }

    #[test]
    fn later_snapshot_covers_earlier() {
        let early = snap("10:20:12,15");
        let later = snap("15:30:15,22");
        assert!(later.covers(&early));
        assert!(!early.covers(&later));
        assert!(early.covers(&early));
    }

    #[test]
    fn long_transaction_keeps_later_snapshot_from_covering() {
        // 12 was running in `early` and still runs in `later`: fine, it is invisible to both.
        let early = snap("10:20:12");
        let later = snap("12:25:12");
        assert!(later.covers(&early));
        // 14 committed before `other` was taken but is still listed as running in `stale`.
        let other = snap("10:20:");
        let stale = snap("10:20:14");
        assert!(!stale.covers(&other));
        assert!(other.covers(&stale));
    }

    #[test]
    fn higher_xmax_hidden_only_if_all_in_progress() {
        let a = snap("10:20:");
        assert!(a.covers(&snap("10:22:20,21")));
        assert!(!a.covers(&snap("10:22:21")));
        assert!(a.same_view(&snap("10:22:20,21")));
    }
}
