//! Serial keys without coordination: `trompe.set_sequence_slot(slot, slots)` gives this node
//! its own residue class of every sequence that feeds a replicated table (`serial`, `bigserial`
//! and identity columns), so rows inserted on different nodes never get the same key. The
//! choice is kept in `trompe.node` and applied again to sequences of tables that become
//! replicated later (`add_table`, tables created in a replicated schema, DDL from peers).

use pgrx::prelude::*;
use trompe_core::seqslot::SequenceSlot;

use crate::capture::InternalOperation;
use crate::error::{OrRaise, TrompeError};
use crate::log::writer::as_extension_owner;
use crate::sql;

/// Gives this node slot `slot` of `slots` (1 ≤ slot ≤ slots, 2 ≤ slots ≤ 1000) in every
/// sequence of a replicated table: each gets increment `slots` and continues at its next
/// value in the slot, above the largest key already in the table. Every node needs its own
/// slot and the same number of slots. Returns how many sequences were changed.
#[pg_extern(volatile, parallel_unsafe)]
fn set_sequence_slot(slot: i32, slots: default!(i32, 16)) -> i64 {
    let wanted = SequenceSlot::new(slot.into(), slots.into())
        .map_err(|e| TrompeError::BadSequenceSlot(e.to_string()))
        .or_raise();
    as_extension_owner(|| {
        sql::execute(
            "UPDATE trompe.node SET sequence_slot = $1::int, sequence_slots = $2::int",
            &[Some(&wanted.slot.to_string()), Some(&wanted.slots.to_string())],
        )
    })
    .map_err(TrompeError::Internal)
    .or_raise();
    adjust().or_raise()
}

/// This node's slot, if one was chosen.
fn configured() -> Result<Option<SequenceSlot>, TrompeError> {
    let row = as_extension_owner(|| sql::row("SELECT sequence_slot, sequence_slots FROM trompe.node", &[]))
        .map_err(TrompeError::Internal)?
        .unwrap_or_default();
    let num = |i: usize| row.get(i).cloned().flatten().and_then(|v| v.parse::<i64>().ok());
    Ok(match (num(0), num(1)) {
        (Some(slot), Some(slots)) => SequenceSlot::new(slot, slots).ok(),
        _ => None,
    })
}

/// Puts every sequence of a replicated table into this node's slot, if one was chosen.
/// Sequences already there are left alone. Returns how many were changed.
pub fn adjust() -> Result<i64, TrompeError> {
    let Some(wanted) = configured()? else { return Ok(0) };
    let _internal = InternalOperation::begin();
    as_extension_owner(|| -> Result<i64, TrompeError> {
        let sequences = sql::rows(
            "SELECT format('%I.%I', sn.nspname, sc.relname), s.seqincrement, s.seqmax,
                    format('%I.%I', tn.nspname, tc.relname), quote_ident(a.attname)
               FROM pg_depend d
               JOIN trompe.tables t ON t.relid::oid = d.refobjid
               JOIN pg_sequence s ON s.seqrelid = d.objid
               JOIN pg_class sc ON sc.oid = s.seqrelid JOIN pg_namespace sn ON sn.oid = sc.relnamespace
               JOIN pg_class tc ON tc.oid = d.refobjid JOIN pg_namespace tn ON tn.oid = tc.relnamespace
               JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
              WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
                AND d.deptype IN ('a', 'i') AND s.seqincrement > 0
              ORDER BY 1",
            &[],
        )
        .map_err(TrompeError::Internal)?;
        let mut changed = 0;
        for r in sequences {
            let text = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
            let int = |i: usize| r.get(i).cloned().flatten().and_then(|v| v.parse::<i64>().ok());
            let (seq, table, column) = (text(0), text(3), text(4));
            // The value nextval() returns next is last_value if the sequence was not called
            // since it was set, else last_value + increment.
            let state = sql::row(&format!("SELECT last_value, is_called FROM {seq}"), &[])
                .map_err(TrompeError::Internal)?
                .unwrap_or_default();
            let last = state.first().cloned().flatten().and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
            let called = state.get(1).cloned().flatten().as_deref() == Some("t");
            if int(1) == Some(wanted.slots) && wanted.owns(last) {
                continue;
            }
            let largest = sql::int(&format!("SELECT coalesce(max({column})::bigint, 0) FROM {table}"), &[])
                .map_err(TrompeError::Internal)?;
            let after = largest.max(if called { last } else { last - 1 });
            let next = wanted
                .next_after(after, int(2).unwrap_or(i64::MAX))
                .ok_or(TrompeError::SequenceExhausted(seq.clone()))?;
            sql::execute(&format!("ALTER SEQUENCE {seq} INCREMENT BY {}", wanted.slots), &[])
                .map_err(TrompeError::Internal)?;
            sql::execute("SELECT setval($1::regclass, $2::bigint, false)", &[Some(&seq), Some(&next.to_string())])
                .map_err(TrompeError::Internal)?;
            changed += 1;
        }
        Ok(changed)
    })
}
