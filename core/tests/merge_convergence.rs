//! The column rules' merge, checked against their specification on random histories: three
//! nodes write a few keys of a table with two register columns, with and without a counter
//! (inserts, updates of one or every column, increments, deletes), each write sends the
//! writer's state of the row,
//! and states are delivered late, out of order and more than once. At the end every node holds
//! the same state of every key, and that state shows what the rules promise: each register the
//! newest write of its column, each counter its newest base plus the increments made on it,
//! and the row only if every column was written after the newest delete.

use std::collections::BTreeMap;

use trompe_core::conflict::Version;
use trompe_core::merge::{Column, RowState, Shown};
use trompe_core::nodeid::NodeId;

type State = RowState<u32, i128>;

const NODES: usize = 3;
const KEYS: u32 = 3;
const REGISTERS: usize = 2;
/// The counter's position among the columns.
const COUNTER: usize = REGISTERS;

/// A small deterministic generator (xorshift64*), so that a failing seed can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One write, as the specification needs it.
#[derive(Clone, Debug)]
enum Write {
    Insert { registers: [u32; REGISTERS], total: i128 },
    Update { column: usize, value: u32 },
    Increment { delta: i128, against: Version },
    Delete,
}

/// Every write made, by key, in the order made.
type History = BTreeMap<u32, Vec<(Version, Write)>>;

struct Node {
    id: NodeId,
    clock: i64,
    rows: BTreeMap<u32, State>,
}

impl Node {
    /// The version of this node's next write of `key`: above its clock and above everything
    /// the row holds (the capture side's commit wait).
    fn next_version(&mut self, key: u32) -> Version {
        let newest = self.rows.get(&key).and_then(State::newest).map_or(0, |v| v.ts);
        self.clock = self.clock.max(newest) + 1 + (self.id.0[0] as i64 % 2);
        Version { ts: self.clock, node: self.id }
    }

    fn receive(&mut self, key: u32, state: &State) {
        match self.rows.get_mut(&key) {
            Some(mine) => mine.join(state).expect("states of one table join"),
            None => {
                self.rows.insert(key, state.clone());
            }
        }
    }
}

/// Runs one random history; returns every write made, by key.
/// The table has the two register columns, and the counter if `counter`.
fn run(seed: u64, steps: usize, counter: bool) -> (Vec<Node>, History) {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut nodes: Vec<Node> =
        (0..NODES).map(|i| Node { id: NodeId([i as u8 + 1; 16]), clock: 0, rows: BTreeMap::new() }).collect();
    let mut inboxes: Vec<Vec<(u32, State)>> = vec![Vec::new(); NODES];
    let mut writes = History::new();
    for _ in 0..steps {
        if rng.below(3) == 0 {
            // Deliver a pending state, in any order; sometimes keep a copy to deliver again.
            let n = rng.below(NODES as u64) as usize;
            if !inboxes[n].is_empty() {
                let i = rng.below(inboxes[n].len() as u64) as usize;
                let (key, state) = if rng.below(8) == 0 { inboxes[n][i].clone() } else { inboxes[n].swap_remove(i) };
                nodes[n].receive(key, &state);
            }
            continue;
        }
        let n = rng.below(NODES as u64) as usize;
        let key = rng.below(KEYS as u64) as u32;
        let version = nodes[n].next_version(key);
        let node = &mut nodes[n];
        let exists = node.rows.get(&key).is_some_and(State::exists);
        let write = if !exists {
            let registers = [rng.below(1000) as u32, rng.below(1000) as u32];
            let total = rng.below(100) as i128;
            let mut shown: Vec<Shown<u32, i128>> = registers.iter().map(|v| Shown::Value(*v)).collect();
            if counter {
                shown.push(Shown::Total(total));
            }
            node.receive(key, &State::inserted(version, shown));
            vec![Write::Insert { registers, total }]
        } else {
            let row = node.rows.get_mut(&key).expect("the row exists");
            match rng.below(10) {
                0 => {
                    row.delete(version);
                    vec![Write::Delete]
                }
                // An update of every register column (for a table without counters, the row
                // comes back where a delete it had not seen removed it).
                1 => (0..REGISTERS)
                    .map(|column| {
                        let value = rng.below(1000) as u32;
                        row.columns[column] = Column::Register(Some(trompe_core::merge::Cell { version, value }));
                        Write::Update { column, value }
                    })
                    .collect(),
                n if n <= 5 || !counter => {
                    let column = rng.below(REGISTERS as u64) as usize;
                    let value = rng.below(1000) as u32;
                    row.columns[column] = Column::Register(Some(trompe_core::merge::Cell { version, value }));
                    vec![Write::Update { column, value }]
                }
                _ => {
                    let delta = rng.below(21) as i128 - 10;
                    let Column::Counter(counter) = &mut row.columns[COUNTER] else { panic!("a counter") };
                    let against = counter.base.as_ref().expect("an existing row's counter has a base").version;
                    counter.add(node.id, version, &delta);
                    vec![Write::Increment { delta, against }]
                }
            }
        };
        writes.entry(key).or_default().extend(write.into_iter().map(|w| (version, w)));
        let state = nodes[n].rows[&key].clone();
        for (m, inbox) in inboxes.iter_mut().enumerate() {
            if m != n {
                inbox.push((key, state.clone()));
            }
        }
    }
    for (n, inbox) in inboxes.into_iter().enumerate() {
        for (key, state) in inbox {
            nodes[n].receive(key, &state);
        }
    }
    (nodes, writes)
}

/// What the specification says key's row shows, from every write made to it.
fn expected(writes: &[(Version, Write)], counter: bool) -> Option<Vec<Shown<u32, i128>>> {
    let deleted = writes.iter().filter(|(_, w)| matches!(w, Write::Delete)).map(|(v, _)| *v).max();
    let (base_version, total) = writes
        .iter()
        .filter_map(|(v, w)| match w {
            Write::Insert { total, .. } => Some((*v, *total)),
            _ => None,
        })
        .max_by_key(|(v, _)| *v)?;
    let mut shown = Vec::new();
    for column in 0..REGISTERS {
        let (version, value) = writes
            .iter()
            .filter_map(|(v, w)| match w {
                Write::Insert { registers, .. } => Some((*v, registers[column])),
                Write::Update { column: c, value } if *c == column => Some((*v, *value)),
                _ => None,
            })
            .max_by_key(|(v, _)| *v)?;
        if Some(version) <= deleted {
            return None;
        }
        shown.push(Shown::Value(value));
    }
    if !counter {
        return Some(shown);
    }
    if Some(base_version) <= deleted {
        return None;
    }
    let increments: i128 = writes
        .iter()
        .filter_map(|(_, w)| match w {
            Write::Increment { delta, against } if *against == base_version => Some(*delta),
            _ => None,
        })
        .sum();
    shown.push(Shown::Total(total + increments));
    Some(shown)
}

#[test]
fn every_node_converges_to_what_the_rules_promise() {
    for counter in [true, false] {
        for seed in 0..3000 {
            let (nodes, writes) = run(seed, 120, counter);
            for (key, made) in &writes {
                let first = &nodes[0].rows[key];
                for node in &nodes[1..] {
                    assert_eq!(&node.rows[key], first, "seed {seed}: key {key} differs between nodes");
                }
                let want = expected(made, counter);
                assert_eq!(first.visible(), want, "seed {seed}, counter {counter}: key {key} after {made:?}");
            }
        }
    }
}

fn version(ts: i64, node: u8) -> Version {
    Version { ts, node: NodeId([node; 16]) }
}

#[test]
fn concurrent_edits_of_different_columns_both_survive() {
    // email, phone; a changes the email while b changes the phone.
    let start: State = RowState::inserted(version(1, 1), vec![Shown::Value(10), Shown::Value(20)]);
    let mut a = start.clone();
    a.columns[0] = Column::Register(Some(trompe_core::merge::Cell { version: version(5, 1), value: 11 }));
    let mut b = start;
    b.columns[1] = Column::Register(Some(trompe_core::merge::Cell { version: version(5, 2), value: 21 }));
    let (a_then_b, b_then_a) = (a.clone(), b.clone());
    a.join(&b_then_a).unwrap();
    b.join(&a_then_b).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.visible(), Some(vec![Shown::Value(11), Shown::Value(21)]));
}

#[test]
fn concurrent_increments_add_up() {
    // Stock 100; two nodes each add 10 at the same time.
    let start: State = RowState::inserted(version(1, 1), vec![Shown::Total(100)]);
    let mut a = start.clone();
    let mut b = start;
    for (state, node) in [(&mut a, 1u8), (&mut b, 2u8)] {
        let Column::Counter(counter) = &mut state.columns[0] else { unreachable!() };
        counter.add(NodeId([node; 16]), version(5, node), &10);
    }
    let a_copy = a.clone();
    a.join(&b).unwrap();
    b.join(&a_copy).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.visible(), Some(vec![Shown::Total(120)]));
}

#[test]
fn a_delete_wins_over_a_concurrent_update_of_some_columns() {
    let start: State = RowState::inserted(version(1, 1), vec![Shown::Value(10), Shown::Value(20)]);
    let mut updated = start.clone();
    updated.columns[0] = Column::Register(Some(trompe_core::merge::Cell { version: version(5, 2), value: 11 }));
    let mut deleted = start;
    deleted.delete(version(3, 1));
    let mut here = deleted.clone();
    here.join(&updated).unwrap();
    assert!(!here.exists());
    // What was written after the delete is kept, so that later states join the same way.
    assert_eq!(here.newest(), Some(version(5, 2)));
    updated.join(&deleted).unwrap();
    assert_eq!(updated, here);
}

#[test]
fn states_of_different_tables_are_refused() {
    let mut two: State = RowState::inserted(version(1, 1), vec![Shown::Value(1), Shown::Value(2)]);
    let one: State = RowState::inserted(version(1, 1), vec![Shown::Value(1)]);
    assert!(two.join(&one).is_err());
    let counter: State = RowState::inserted(version(1, 1), vec![Shown::Total(1), Shown::Value(2)]);
    assert!(two.join(&counter).is_err());
}
