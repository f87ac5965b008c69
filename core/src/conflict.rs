//! Conflict rules: how every node decides, the same way, which version of a row survives.
//!
//! A version is what one transaction wrote: its commit time at the node where it ran and that
//! node's id. Each rule ranks versions in a total order that every node computes the same way
//! whatever its clock says ([`Ranking`]): `last_update_wins` by (commit time, node id);
//! `first_update_wins` and `node_priority` window by window ([`CONFLICT_WINDOW_US`]), the
//! earliest, or the highest-priority node's, version of a window first. Every node keeps, for
//! each primary key, the highest-ranked version it has seen, a deleted row's version being kept
//! as a tombstone, and therefore ends with the same rows once it has seen the same versions.
//!
//! That needs one more thing: a local write must create a version that ranks above the one it
//! replaces, even if the replaced one came from a node whose clock runs ahead or that ranks
//! higher in the current window. The capture side makes the writing transaction wait at commit
//! until its version would ([`Ranking::earliest_commit_above`], [`commit_wait_needed`]).

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

/// How far apart (µs of commit time) two writes of a row may be and still be decided by
/// `first_update_wins` or `node_priority`: versions are compared window by window, a later
/// window always winning. The same on every node by construction (a constant, not a setting).
pub const CONFLICT_WINDOW_US: i64 = 1_000_000;

/// The conflict rules a table can use. Only rules under which every node converges are
/// offered: each orders all versions of a row totally, the same way on every node, and a
/// local write always waits (at commit) until its own version ranks above the one it replaced.
/// Rules that let a node keep its own write whatever the others decide (`keep_local`,
/// `apply_remote`) are refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Rule {
    /// The greatest version (latest commit time, ties broken by node id) wins.
    #[default]
    LastUpdateWins,
    /// Within one conflict window the earliest version wins; a later window wins over an
    /// earlier one. A local write replacing a version of the current window waits for the next.
    FirstUpdateWins,
    /// Within one conflict window the version of the node with the highest priority wins (then
    /// the latest); a later window wins over an earlier one. A local write replacing a version
    /// of a higher-priority node in the current window waits for the next window.
    NodePriority,
}

/// Why a rule name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    /// A rule that would let nodes disagree.
    #[error("conflict rule \"{0}\" cannot make every node converge and is not offered; use last_update_wins, first_update_wins or node_priority")]
    Divergent(String),
    /// Not a rule at all.
    #[error("unknown conflict rule \"{0}\"; the rules are last_update_wins, first_update_wins and node_priority")]
    Unknown(String),
}

impl Rule {
    /// Reads a rule name.
    pub fn parse(name: &str) -> Result<Rule, RuleError> {
        match name.trim() {
            "last_update_wins" => Ok(Rule::LastUpdateWins),
            "first_update_wins" => Ok(Rule::FirstUpdateWins),
            "node_priority" => Ok(Rule::NodePriority),
            "keep_local" | "apply_remote" => Err(RuleError::Divergent(name.trim().to_string())),
            other => Err(RuleError::Unknown(other.chars().take(40).collect())),
        }
    }

    /// The name stored in `trompe.tables`.
    pub fn name(self) -> &'static str {
        match self {
            Rule::LastUpdateWins => "last_update_wins",
            Rule::FirstUpdateWins => "first_update_wins",
            Rule::NodePriority => "node_priority",
        }
    }
}

/// How the versions of one table's rows rank: its rule and, for `node_priority`, the priority
/// of each node (0 for nodes not listed). Every node must hold the same ranking for a table.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Ranking {
    /// The table's rule.
    pub rule: Rule,
    /// Node priorities (used by `node_priority`).
    pub priorities: Vec<(NodeId, i32)>,
}

fn window(ts: i64) -> i64 {
    ts.div_euclid(CONFLICT_WINDOW_US)
}

impl Ranking {
    /// The ranking of rule `last_update_wins`.
    pub fn last_update_wins() -> Ranking {
        Ranking::default()
    }

    fn priority(&self, node: NodeId) -> i32 {
        self.priorities.iter().find(|(n, _)| *n == node).map_or(0, |(_, p)| *p)
    }

    /// A sort key: versions rank as their keys compare.
    fn key(&self, v: Version) -> (i64, i64, i64, NodeId) {
        match self.rule {
            Rule::LastUpdateWins => (v.ts, 0, 0, v.node),
            Rule::FirstUpdateWins => (window(v.ts), -v.ts, 0, v.node),
            Rule::NodePriority => (window(v.ts), i64::from(self.priority(v.node)), v.ts, v.node),
        }
    }

    /// True if an incoming version replaces the local one. Equal versions are the same write
    /// seen twice: applying it again changes nothing.
    pub fn wins(&self, incoming: Version, local: LocalVersion) -> bool {
        match local {
            LocalVersion::SameTransaction | LocalVersion::Unknown => true,
            LocalVersion::Known(l) => self.key(incoming) >= self.key(l),
        }
    }

    /// The earliest commit time at which a local truncation at time `now` ranks above every
    /// row it removes, committed up to `now` by any node: `now` itself under
    /// `last_update_wins`, the start of the next window under the windowed rules (a row written
    /// earlier in the current window, or by a higher-priority node, would rank above it).
    pub fn earliest_commit_above_all_until(&self, now: i64) -> i64 {
        match self.rule {
            Rule::LastUpdateWins => now,
            Rule::FirstUpdateWins | Rule::NodePriority => (window(now) + 1) * CONFLICT_WINDOW_US,
        }
    }

    /// The earliest commit time at which a write by node `writer` ranks above version
    /// `replaced` (its commit waits until then).
    pub fn earliest_commit_above(&self, writer: NodeId, replaced: Version) -> i64 {
        let next_window = (window(replaced.ts) + 1) * CONFLICT_WINDOW_US;
        match self.rule {
            Rule::LastUpdateWins => replaced.ts + 1,
            Rule::FirstUpdateWins => next_window,
            Rule::NodePriority => match self.priority(writer).cmp(&self.priority(replaced.node)) {
                std::cmp::Ordering::Greater => window(replaced.ts) * CONFLICT_WINDOW_US,
                std::cmp::Ordering::Equal => replaced.ts + 1,
                std::cmp::Ordering::Less => next_window,
            },
        }
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

    fn incoming_wins(incoming: Version, local: LocalVersion) -> bool {
        Ranking::last_update_wins().wins(incoming, local)
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
        assert_eq!(Rule::parse(" first_update_wins"), Ok(Rule::FirstUpdateWins));
        assert_eq!(Rule::parse("node_priority"), Ok(Rule::NodePriority));
        assert!(matches!(Rule::parse("keep_local"), Err(RuleError::Divergent(_))));
        assert!(matches!(Rule::parse("bogus"), Err(RuleError::Unknown(_))));
        for rule in [Rule::LastUpdateWins, Rule::FirstUpdateWins, Rule::NodePriority] {
            assert_eq!(Rule::parse(rule.name()), Ok(rule));
        }
    }

    const W: i64 = CONFLICT_WINDOW_US;

    fn ranking(rule: Rule) -> Ranking {
        // Node 2 outranks node 3, which outranks node 1 (and every unlisted node, at 0).
        Ranking { rule, priorities: vec![(NodeId([2; 16]), 10), (NodeId([3; 16]), 5)] }
    }

    fn known(v: Version) -> LocalVersion {
        LocalVersion::Known(v)
    }

    #[test]
    fn last_update_wins_ranks_as_before() {
        let r = Ranking::last_update_wins();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..10_000 {
            let (a, b) = (v((next() % 50) as i64, (next() % 4) as u8), v((next() % 50) as i64, (next() % 4) as u8));
            assert_eq!(r.wins(a, known(b)), a >= b, "{a:?} {b:?}");
        }
    }

    #[test]
    fn node_priority_decides_within_a_window_and_a_later_window_wins() {
        let r = ranking(Rule::NodePriority);
        let base = 100 * W;
        // Same window: the higher priority wins, whichever committed later.
        assert!(r.wins(v(base + 10, 2), known(v(base + 500, 1))));
        assert!(!r.wins(v(base + 500, 1), known(v(base + 10, 2))));
        assert!(r.wins(v(base + 10, 2), known(v(base + 20, 3))));
        // Same priority (unlisted nodes): the later wins.
        assert!(r.wins(v(base + 30, 4), known(v(base + 20, 1))));
        // A later window wins whatever the priorities.
        assert!(r.wins(v(base + W, 1), known(v(base + W - 1, 2))));
    }

    #[test]
    fn first_update_wins_within_a_window_and_a_later_window_wins() {
        let r = ranking(Rule::FirstUpdateWins);
        let base = 100 * W;
        assert!(r.wins(v(base + 10, 1), known(v(base + 500, 2))));
        assert!(!r.wins(v(base + 500, 2), known(v(base + 10, 1))));
        assert!(r.wins(v(base + W + 1, 2), known(v(base + 10, 1))));
        assert!(r.wins(v(base + 10, 1), known(v(base + 10, 1))), "the same version again is harmless");
    }

    #[test]
    fn a_write_committed_at_the_earliest_time_ranks_above_what_it_replaced_and_not_sooner() {
        let rules = [Rule::LastUpdateWins, Rule::FirstUpdateWins, Rule::NodePriority];
        for rule in rules {
            let r = ranking(rule);
            for replaced_ts in [0, 1, W - 1, W, 7 * W + 123, -5] {
                for (writer, replaced_node) in [(1u8, 2u8), (2, 1), (3, 3), (2, 3), (4, 1)] {
                    let replaced = v(replaced_ts, replaced_node);
                    let t = r.earliest_commit_above(NodeId([writer; 16]), replaced);
                    assert!(t > replaced_ts || rule == Rule::NodePriority, "{rule:?}: never before the replaced");
                    let w = v(t.max(replaced_ts + 1), writer);
                    assert!(r.wins(w, known(replaced)) && w != replaced, "{rule:?} {replaced:?} {w:?}");
                    assert!(!r.wins(replaced, known(w)), "{rule:?}: strictly above");
                    if rule != Rule::LastUpdateWins && t > replaced_ts + 1 {
                        assert!(!r.wins(v(t - 1, writer), known(replaced)), "{rule:?}: {t} is the earliest");
                    }
                }
            }
        }
    }

    #[test]
    fn a_truncation_committed_at_the_earliest_time_ranks_above_every_earlier_row() {
        for rule in [Rule::LastUpdateWins, Rule::FirstUpdateWins, Rule::NodePriority] {
            let r = ranking(rule);
            let now = 40 * W + 700_000;
            let t = r.earliest_commit_above_all_until(now).max(now + 1);
            for writer in 1..=4u8 {
                for row_ts in [now - 2 * W, 40 * W, now - 1, now] {
                    for row_node in 1..=4u8 {
                        let truncation = v(t, writer);
                        assert!(r.wins(truncation, known(v(row_ts, row_node))), "{rule:?}: {row_ts} by {row_node}");
                    }
                }
            }
        }
    }

    #[test]
    fn every_rule_converges_whatever_the_order_and_with_local_writes() {
        // Nodes receive the same versions in different orders, and in between write locally
        // (committing no earlier than the rule allows); all must end with the same version.
        for rule in [Rule::LastUpdateWins, Rule::FirstUpdateWins, Rule::NodePriority] {
            let r = ranking(rule);
            let mut rng = 0x9e37_79b9_7f4a_7c15u64;
            let mut next = move |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            for _ in 0..300 {
                // Versions written by 3 nodes, each replacing what that node held then.
                let mut held: [Option<Version>; 3] = [None; 3];
                let mut written = Vec::new();
                let mut clock = 50 * W;
                for _ in 0..6 {
                    let node = next(3) as usize;
                    clock += next(W as u64 / 2) as i64;
                    let mut ts = clock;
                    if let Some(h) = held[node] {
                        ts = ts.max(r.earliest_commit_above(NodeId([node as u8 + 1; 16]), h));
                    }
                    let mine = v(ts, node as u8 + 1);
                    if let Some(h) = held[node] {
                        assert!(r.wins(mine, known(h)) && !r.wins(h, known(mine)));
                    }
                    held[node] = Some(mine);
                    written.push(mine);
                    // Some nodes hear of it at once.
                    for (other, slot) in held.iter_mut().enumerate() {
                        if other != node && next(2) == 0 && r.wins(mine, slot.map_or(LocalVersion::Unknown, known)) {
                            *slot = Some(mine);
                        }
                    }
                }
                // Then every node hears of everything, in its own order.
                let mut finals = Vec::new();
                for slot in held.iter_mut() {
                    let mut order = written.clone();
                    for i in (1..order.len()).rev() {
                        order.swap(i, next(i as u64 + 1) as usize);
                    }
                    for w in order {
                        if r.wins(w, slot.map_or(LocalVersion::Unknown, known)) {
                            *slot = Some(w);
                        }
                    }
                    finals.push(*slot);
                }
                assert!(finals.iter().all(|f| *f == finals[0]), "{rule:?}: {finals:?}");
            }
        }
    }
}
