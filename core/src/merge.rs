//! Column-level merge: the `column_last_update_wins` rule and `delta` counters (issue 24).
//!
//! Under the row rules of [`crate::conflict`] a row has one version and the highest-ranked
//! version of the whole row wins. Under the column rules every column is a register of its own:
//!
//! - a **register column** holds the value of the write of the highest version that changed it
//!   (an `INSERT` writes every column, an `UPDATE` the columns whose value it changes);
//! - a **counter column** (`delta`) holds a **base**, set by `INSERT`, plus one **contribution**
//!   per node: the sum of the changes (new − old) that node's updates made to the column since
//!   it saw that base. Each contribution is a register of its own, written only by its node.
//!
//! A node's state for one primary key ([`RowState`]) is those registers plus, for a deleted
//! row, the version of the delete. Every write sends the writer's whole state of the row, and a
//! node receiving a state keeps, register by register, the higher version ([`RowState::join`]).
//! That join is commutative, associative and idempotent, so every node that has received the
//! same writes, in whatever order and however often, holds the same state, and the row, its
//! values and its existence are a function of that state ([`RowState::visible`]).
//!
//! **Deletes.** A delete of version `t` removes every register written at or before `t`; the row
//! exists again only once every register column and every counter's base has been written after
//! `t` (in practice: an `INSERT`, or for a table without counters an `UPDATE` that changed every
//! column). So a delete wins over the concurrent update of some columns, and over concurrent
//! increments. What a deleted row keeps is only what was written after its delete (usually
//! nothing): registers written before `t` can never win again. A `TRUNCATE` of version `t` is a
//! delete of version `t` of every key.
//!
//! A node's own write must rank above every register of the row it replaces (the capture side's
//! commit wait, [`crate::conflict::commit_wait_needed`], compares with [`RowState::newest`]), so
//! a node's successive writes of a row have increasing versions and its own contribution
//! register only grows in version.

use std::collections::BTreeMap;

use crate::conflict::Version;
use crate::nodeid::NodeId;

/// A value and the version of the write that set it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cell<V> {
    /// The write's version.
    pub version: Version,
    /// The value written.
    pub value: V,
}

impl<V: Clone> Cell<V> {
    /// Keeps the higher version of the two. Equal versions are taken to be one write (nothing
    /// changes): the changes one transaction makes to a row must reach the join as one state.
    fn join(&mut self, other: &Cell<V>) {
        if other.version > self.version {
            *self = other.clone();
        }
    }
}

/// Keeps the higher version of two optional registers.
fn join_optional<V: Clone>(mine: &mut Option<Cell<V>>, theirs: &Option<Cell<V>>) {
    match (mine.as_mut(), theirs) {
        (Some(m), Some(t)) => m.join(t),
        (None, Some(t)) => *mine = Some(t.clone()),
        (_, None) => {}
    }
}

/// The numbers a counter column holds (integers or numeric, summed exactly).
pub trait CounterValue: Clone + PartialEq {
    /// The additive identity.
    fn zero() -> Self;
    /// `self + other`.
    fn plus(&self, other: &Self) -> Self;
}

impl CounterValue for i128 {
    fn zero() -> Self {
        0
    }
    fn plus(&self, other: &Self) -> Self {
        self + other
    }
}

/// One node's contribution to a counter: the sum of its changes since it saw base `against`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Contribution<N> {
    /// The version of the node's last write of the contribution.
    pub version: Version,
    /// The version of the base the sum is counted against.
    pub against: Version,
    /// The sum.
    pub sum: N,
}

/// A counter column: a base and the nodes' contributions against it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counter<N> {
    /// The value an `INSERT` set; None in a deleted row once the delete is newer than it.
    pub base: Option<Cell<N>>,
    /// Each node's contribution (only those counted against `base` are kept).
    pub contributions: BTreeMap<NodeId, Contribution<N>>,
}

impl<N: CounterValue> Counter<N> {
    /// A counter set to `value` by a write of version `version`.
    pub fn new(version: Version, value: N) -> Self {
        Counter { base: Some(Cell { version, value }), contributions: BTreeMap::new() }
    }

    /// The base plus every contribution counted against it (None without a base).
    pub fn value(&self) -> Option<N> {
        let base = self.base.as_ref()?;
        Some(self.contributions.values().fold(base.value.clone(), |sum, c| sum.plus(&c.sum)))
    }

    /// Adds `delta`, made by `node` in a write of version `version`, to its contribution
    /// against the current base (a counter without a base, in a deleted row, takes none).
    pub fn add(&mut self, node: NodeId, version: Version, delta: &N) {
        let Some(base) = &self.base else { return };
        let against = base.version;
        let earlier =
            self.contributions.get(&node).filter(|c| c.against == against).map_or_else(N::zero, |c| c.sum.clone());
        self.contributions.insert(node, Contribution { version, against, sum: earlier.plus(delta) });
    }

    fn newest(&self) -> Option<Version> {
        let base = self.base.as_ref().map(|b| b.version);
        self.contributions.values().map(|c| c.version).chain(base).max()
    }

    fn join(&mut self, other: &Counter<N>) {
        join_optional(&mut self.base, &other.base);
        for (node, theirs) in &other.contributions {
            let keep_theirs = self.contributions.get(node).is_none_or(|mine| theirs.version > mine.version);
            if keep_theirs {
                self.contributions.insert(*node, theirs.clone());
            }
        }
    }

    /// Drops what a delete of version `deleted` removed, and contributions not counted against
    /// the base kept.
    fn normalize(&mut self, deleted: Option<Version>) {
        if self.base.as_ref().is_some_and(|b| Some(b.version) <= deleted) {
            self.base = None;
        }
        let base = self.base.as_ref().map(|b| b.version);
        self.contributions.retain(|_, c| Some(c.against) == base);
    }
}

/// One column's registers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Column<V, N> {
    /// A `column_last_update_wins` column; None in a deleted row once the delete is newer.
    Register(Option<Cell<V>>),
    /// A `delta` counter.
    Counter(Counter<N>),
}

impl<V: Clone, N: CounterValue> Column<V, N> {
    fn join(&mut self, other: &Column<V, N>) -> Result<(), MergeError> {
        match (self, other) {
            (Column::Register(mine), Column::Register(theirs)) => join_optional(mine, theirs),
            (Column::Counter(mine), Column::Counter(theirs)) => mine.join(theirs),
            _ => return Err(MergeError::ColumnKinds),
        }
        Ok(())
    }

    fn normalize(&mut self, deleted: Option<Version>) {
        match self {
            Column::Register(cell) => {
                if cell.as_ref().is_some_and(|c| Some(c.version) <= deleted) {
                    *cell = None;
                }
            }
            Column::Counter(counter) => counter.normalize(deleted),
        }
    }

    /// Whether a delete no longer hides this column (its register or its base is set).
    fn is_set(&self) -> bool {
        match self {
            Column::Register(cell) => cell.is_some(),
            Column::Counter(counter) => counter.base.is_some(),
        }
    }

    fn newest(&self) -> Option<Version> {
        match self {
            Column::Register(cell) => cell.as_ref().map(|c| c.version),
            Column::Counter(counter) => counter.newest(),
        }
    }
}

/// Why two states of a row cannot be joined.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MergeError {
    /// The states describe different column lists.
    #[error("the two states of the row have {0} and {1} columns")]
    ColumnCount(usize, usize),
    /// A column is a counter in one state and a register in the other.
    #[error("a column is a counter in one state of the row and not in the other")]
    ColumnKinds,
}

/// A node's state of one row (one primary key) under the column rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowState<V, N> {
    /// The newest delete the row has not come back from.
    pub deleted: Option<Version>,
    /// The columns, in one order shared by every state of the table.
    pub columns: Vec<Column<V, N>>,
}

/// What a row shows: each register's value and each counter's total.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Shown<V, N> {
    /// A register column's value.
    Value(V),
    /// A counter column's total.
    Total(N),
}

impl<V: Clone, N: CounterValue> RowState<V, N> {
    /// The state a write of version `version` that set every column leaves (an `INSERT`).
    pub fn inserted(version: Version, columns: Vec<Shown<V, N>>) -> Self {
        let columns = columns
            .into_iter()
            .map(|shown| match shown {
                Shown::Value(value) => Column::Register(Some(Cell { version, value })),
                Shown::Total(value) => Column::Counter(Counter::new(version, value)),
            })
            .collect();
        RowState { deleted: None, columns }
    }

    /// The state a delete of version `version` leaves (nothing written before it is kept).
    pub fn delete(&mut self, version: Version) {
        self.deleted = self.deleted.max(Some(version));
        self.normalize();
    }

    /// Joins `other` into this state: register by register the higher version, and the newer
    /// delete.
    pub fn join(&mut self, other: &RowState<V, N>) -> Result<(), MergeError> {
        if self.columns.len() != other.columns.len() {
            return Err(MergeError::ColumnCount(self.columns.len(), other.columns.len()));
        }
        for (mine, theirs) in self.columns.iter_mut().zip(&other.columns) {
            mine.join(theirs)?;
        }
        self.deleted = self.deleted.max(other.deleted);
        self.normalize();
        Ok(())
    }

    /// Drops what the delete removed; a row whose every column was written after its delete
    /// exists again (and forgets the delete: nothing older can win over those columns).
    fn normalize(&mut self) {
        for column in &mut self.columns {
            column.normalize(self.deleted);
        }
        if self.deleted.is_some() && self.columns.iter().all(Column::is_set) {
            self.deleted = None;
        }
    }

    /// Whether the row exists.
    pub fn exists(&self) -> bool {
        self.deleted.is_none()
    }

    /// What the row shows, if it exists.
    pub fn visible(&self) -> Option<Vec<Shown<V, N>>> {
        if !self.exists() {
            return None;
        }
        self.columns
            .iter()
            .map(|column| match column {
                Column::Register(cell) => cell.as_ref().map(|c| Shown::Value(c.value.clone())),
                Column::Counter(counter) => counter.value().map(Shown::Total),
            })
            .collect()
    }

    /// The highest version in the state (a delete's included): what a node's own next write of
    /// the row must rank above.
    pub fn newest(&self) -> Option<Version> {
        self.columns.iter().filter_map(Column::newest).chain(self.deleted).max()
    }
}
