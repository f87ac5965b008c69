//! Conflict rules: how every node decides, the same way, which version of a row survives.
//!
//! A version is what one transaction wrote: its commit time at the node where it ran and that
//! node's id. Versions are totally ordered by (commit time, node id), so two nodes comparing
//! the same two versions always agree, whatever their clocks say. Rule `last_update_wins`
//! keeps, for each primary key, the greatest version ever written, a deleted row's version
//! being kept as a tombstone. Every node therefore ends with the same rows once it has seen the
//! same versions.
//!
//! That needs one more thing: a local write must create a version greater than the one it
//! replaces, even if the replaced one came from a node whose clock runs ahead. The capture side
//! makes the writing transaction wait at commit until its clock has passed the replaced
//! version's commit time ([`commit_wait_needed`]).

use crate::changeset::OldVersion;
use crate::nodeid::NodeId;

/// One version of a row (or of its deletion).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// Commit time (PostgreSQL TimestampTz: µs since 2000-01-01) at the node that wrote it.
    pub ts: i64,
    /// The node that wrote it.
    pub node: NodeId,
}

/// What a node knows about the version of a local row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalVersion {
    /// Written by the transaction applying this change (an earlier change of the same origin
    /// transaction).
    SameTransaction,
    /// Not known: frozen by vacuum long ago, or written before commit timestamps were kept.
    Unknown,
    /// Committed.
    Known(Version),
}

impl From<OldVersion> for LocalVersion {
    fn from(v: OldVersion) -> Self {
        match v {
            OldVersion::Unknown => LocalVersion::Unknown,
            OldVersion::SameTransaction => LocalVersion::SameTransaction,
            OldVersion::Committed { ts, node } => LocalVersion::Known(Version { ts, node }),
        }
    }
}

/// The conflict rules a table can use. Only rules under which every node converges are
/// offered: with `first_update_wins` or a node priority, a node could keep a local update that
/// every other node rejects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// The greatest version (latest commit time, ties broken by node id) wins.
    LastUpdateWins,
}

/// Why a rule name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    /// A rule that would let nodes disagree.
    #[error("conflict rule \"{0}\" cannot make every node converge and is not offered; use last_update_wins")]
    Divergent(String),
    /// Not a rule at all.
    #[error("unknown conflict rule \"{0}\"; the rule is last_update_wins")]
    Unknown(String),
}

impl Rule {
    /// Reads a rule name.
    pub fn parse(name: &str) -> Result<Rule, RuleError> {
        match name.trim() {
            "last_update_wins" => Ok(Rule::LastUpdateWins),
            "first_update_wins" | "node_priority" | "keep_local" | "apply_remote" => {
                Err(RuleError::Divergent(name.trim().to_string()))
            }
            other => Err(RuleError::Unknown(other.chars().take(40).collect())),
        }
    }

    /// The name stored in `trompe.tables`.
    pub fn name(self) -> &'static str {
        match self {
            Rule::LastUpdateWins => "last_update_wins",
        }
    }
}

/// True if an incoming version replaces the local one. Equal versions are the same write seen
/// twice: applying it again changes nothing.
pub fn incoming_wins(incoming: Version, local: LocalVersion) -> bool {
    match local {
        LocalVersion::SameTransaction | LocalVersion::Unknown => true,
        LocalVersion::Known(l) => incoming >= l,
    }
}

/// True if the incoming change met a local version other than the one it replaced at its
/// origin: the two nodes wrote the row concurrently.
pub fn is_conflict(incoming: Version, replaced_at_origin: LocalVersion, local: LocalVersion) -> bool {
    match local {
        LocalVersion::SameTransaction => false,
        LocalVersion::Known(l) if l == incoming => false,
        _ => local != replaced_at_origin,
    }
}

/// How long (µs) a local transaction must wait before committing so that its version is
/// greater than `replaced` (0 when its clock is already past).
pub fn commit_wait_needed(replaced_ts: i64, now: i64) -> i64 {
    if replaced_ts >= now {
        replaced_ts - now + 1
    } else {
        0
    }
}

/// The kinds of conflict recorded in `trompe.conflicts`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConflictKind {
    /// An insert met an existing row with the same key.
    InsertExists,
    /// An update met a row another node had updated concurrently.
    UpdateUpdate,
    /// An update met a row deleted concurrently (a tombstone).
    UpdateDeleted,
    /// An update met no row and no tombstone (it is applied as an insert).
    UpdateMissing,
    /// A delete met a row another node had updated concurrently.
    DeleteUpdate,
    /// A row's value for a secondary unique constraint collided with another row's.
    UniqueViolation,
    /// A row changed on one node before a truncation of its table on another.
    Truncated,
}

impl ConflictKind {
    /// The name stored in `trompe.conflicts.kind`.
    pub fn name(self) -> &'static str {
        match self {
            ConflictKind::InsertExists => "insert_exists",
            ConflictKind::UpdateUpdate => "update_update",
            ConflictKind::UpdateDeleted => "update_deleted",
            ConflictKind::UpdateMissing => "update_missing",
            ConflictKind::DeleteUpdate => "delete_update",
            ConflictKind::UniqueViolation => "unique_violation",
            ConflictKind::Truncated => "truncated",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(ts: i64, node: u8) -> Version {
        Version { ts, node: NodeId([node; 16]) }
    }

    #[test]
    fn later_commit_wins_and_node_breaks_ties() {
        assert!(incoming_wins(v(2, 1), LocalVersion::Known(v(1, 9))));
        assert!(!incoming_wins(v(1, 9), LocalVersion::Known(v(2, 1))));
        assert!(incoming_wins(v(5, 2), LocalVersion::Known(v(5, 1))));
        assert!(!incoming_wins(v(5, 1), LocalVersion::Known(v(5, 2))));
        assert!(incoming_wins(v(5, 1), LocalVersion::Known(v(5, 1))), "the same version again is harmless");
        assert!(incoming_wins(v(0, 0), LocalVersion::Unknown));
        assert!(incoming_wins(v(0, 0), LocalVersion::SameTransaction));
    }

    #[test]
    fn every_node_picks_the_same_winner_in_any_order() {
        // Three concurrent versions of one key reach three nodes in every possible order; a
        // node keeps whichever incoming version wins against what it has.
        let versions = [v(10, 3), v(12, 1), v(12, 2)];
        let orders = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]];
        let mut finals = Vec::new();
        for order in orders {
            let mut kept: Option<Version> = None;
            for i in order {
                let local = kept.map_or(LocalVersion::Unknown, LocalVersion::Known);
                if incoming_wins(versions[i], local) {
                    kept = Some(versions[i]);
                }
            }
            finals.push(kept);
        }
        assert!(finals.iter().all(|f| *f == Some(v(12, 2))), "{finals:?}");
    }

    #[test]
    fn conflicts_are_concurrent_writes_only() {
        let origin_replaced = LocalVersion::Known(v(1, 1));
        assert!(!is_conflict(v(2, 2), origin_replaced, LocalVersion::Known(v(1, 1))), "a plain successor");
        assert!(is_conflict(v(2, 2), origin_replaced, LocalVersion::Known(v(3, 3))));
        assert!(is_conflict(v(2, 2), LocalVersion::Unknown, LocalVersion::Known(v(3, 3))), "an insert meeting a row");
        assert!(!is_conflict(v(2, 2), origin_replaced, LocalVersion::SameTransaction));
        assert!(!is_conflict(v(2, 2), origin_replaced, LocalVersion::Known(v(2, 2))), "the same write again");
    }

    #[test]
    fn commit_wait() {
        assert_eq!(commit_wait_needed(100, 200), 0);
        assert_eq!(commit_wait_needed(200, 200), 1);
        assert_eq!(commit_wait_needed(250, 200), 51);
    }

    #[test]
    fn only_convergent_rules_are_offered() {
        assert_eq!(Rule::parse("last_update_wins"), Ok(Rule::LastUpdateWins));
        assert!(matches!(Rule::parse("first_update_wins"), Err(RuleError::Divergent(_))));
        assert!(matches!(Rule::parse("node_priority"), Err(RuleError::Divergent(_))));
        assert!(matches!(Rule::parse("bogus"), Err(RuleError::Unknown(_))));
    }
}
