//! Sequences without coordination: every node draws from its own residue class. With `slots`
//! nodes at most, node `slot` (1-based) gets the values `v` with `v mod slots == slot mod
//! slots`, so serial keys generated on different nodes never collide.

/// A node's share of every replicated sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceSlot {
    /// This node's slot, 1..=slots.
    pub slot: i64,
    /// How many slots there are (the common increment).
    pub slots: i64,
}

/// Why a slot was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SlotError {
    /// Too few or too many slots.
    #[error("the number of sequence slots must be between 2 and {max}, not {0}", max = MAX_SLOTS)]
    BadSlots(i64),
    /// The slot is outside 1..=slots.
    #[error("sequence slot {slot} is outside 1..{slots}")]
    BadSlot {
        /// The slot given.
        slot: i64,
        /// The number of slots.
        slots: i64,
    },
}

/// The largest number of slots (a larger increment wastes the key space for nothing).
pub const MAX_SLOTS: i64 = 1000;

impl SequenceSlot {
    /// Checks a slot and the number of slots.
    pub fn new(slot: i64, slots: i64) -> Result<SequenceSlot, SlotError> {
        if !(2..=MAX_SLOTS).contains(&slots) {
            return Err(SlotError::BadSlots(slots));
        }
        if !(1..=slots).contains(&slot) {
            return Err(SlotError::BadSlot { slot, slots });
        }
        Ok(SequenceSlot { slot, slots })
    }

    /// Whether `v` belongs to this slot.
    pub fn owns(&self, v: i64) -> bool {
        v.rem_euclid(self.slots) == self.slot.rem_euclid(self.slots)
    }

    /// The smallest value of this slot greater than `after`, if it fits in `max`.
    pub fn next_after(&self, after: i64, max: i64) -> Option<i64> {
        let base = after.checked_add(1)?;
        let offset = (self.slot - base).rem_euclid(self.slots);
        base.checked_add(offset).filter(|v| *v <= max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_checked() {
        assert_eq!(SequenceSlot::new(1, 1), Err(SlotError::BadSlots(1)));
        assert_eq!(SequenceSlot::new(1, 1001), Err(SlotError::BadSlots(1001)));
        assert_eq!(SequenceSlot::new(0, 16), Err(SlotError::BadSlot { slot: 0, slots: 16 }));
        assert_eq!(SequenceSlot::new(17, 16), Err(SlotError::BadSlot { slot: 17, slots: 16 }));
        assert!(SequenceSlot::new(16, 16).is_ok());
    }

    #[test]
    fn next_values_stay_in_their_slot_and_never_collide() {
        let a = SequenceSlot::new(1, 16).unwrap();
        let b = SequenceSlot::new(16, 16).unwrap();
        assert_eq!(a.next_after(0, i64::MAX), Some(1));
        assert_eq!(a.next_after(1, i64::MAX), Some(17));
        assert_eq!(b.next_after(0, i64::MAX), Some(16));
        assert_eq!(b.next_after(16, i64::MAX), Some(32));
        assert_eq!(a.next_after(-5, i64::MAX), Some(1));
        for after in [-40, -1, 0, 5, 1000, 123_457] {
            let (x, y) = (a.next_after(after, i64::MAX).unwrap(), b.next_after(after, i64::MAX).unwrap());
            assert!(x > after && y > after && x - after <= 16 && y - after <= 16);
            assert!(a.owns(x) && b.owns(y) && !a.owns(y) && !b.owns(x));
        }
        assert_eq!(a.next_after(i64::MAX, i64::MAX), None);
        assert_eq!(a.next_after(2_147_483_640, 2_147_483_647), None);
    }
}
