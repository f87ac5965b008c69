//! Serial keys without coordination: `trompe.set_sequence_slot(slot, slots)` gives this node
//! its own residue class of every sequence that feeds a replicated table (`serial`, `bigserial`,
//! identity columns, and any sequence a column default calls `nextval` on), so rows inserted on
//! different nodes never get the same key. The
//! choice is kept in `trompe.node` and applied again to sequences of tables that become
//! replicated later (`add_table`, tables created in a replicated schema, DDL from peers).

use pgrx::prelude::*;
use trompe_core::seqslot::SequenceSlot;

use crate::error::{OrRaise, TrompeError};
use crate::run_as::as_extension_owner;
use crate::session::InternalOperation;
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
    adjust_above_keys(true).or_raise()
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

/// What a sequence feeds: the columns of replicated tables whose default or identity draws from
/// it.
struct Fed {
    /// The sequence, schema-qualified and quoted.
    seq: String,
    increment: i64,
    max: i64,
    cycle: bool,
    /// Integer columns it feeds (`table`, `column`, quoted), whose largest value it continues
    /// above; columns of other types (a text key built from it) are left out.
    columns: Vec<(String, String)>,
}

/// Every sequence a replicated table draws from: owned ones (`serial`, identity) and those a
/// column default calls `nextval` on, owned or not (`CREATE SEQUENCE` + `DEFAULT nextval(...)`,
/// shared by several tables).
fn fed_sequences() -> Result<Vec<Fed>, TrompeError> {
    let rows = sql::rows(
        "WITH feeds AS (
             SELECT d.objid AS seq, d.refobjid AS rel, d.refobjsubid AS att
               FROM pg_depend d JOIN trompe.tables t ON t.relid::oid = d.refobjid
              WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
                AND d.deptype IN ('a', 'i') AND d.refobjsubid > 0
             UNION
             SELECT d.refobjid, ad.adrelid, ad.adnum
               FROM pg_attrdef ad JOIN trompe.tables t ON t.relid::oid = ad.adrelid
               JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
                    AND d.refclassid = 'pg_class'::regclass)
         SELECT format('%I.%I', sn.nspname, sc.relname), s.seqincrement, s.seqmax, s.seqcycle,
                format('%I.%I', tn.nspname, tc.relname), quote_ident(a.attname),
                a.atttypid IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype)
           FROM feeds f
           JOIN pg_sequence s ON s.seqrelid = f.seq
           JOIN pg_class sc ON sc.oid = s.seqrelid JOIN pg_namespace sn ON sn.oid = sc.relnamespace
           JOIN pg_class tc ON tc.oid = f.rel JOIN pg_namespace tn ON tn.oid = tc.relnamespace
           JOIN pg_attribute a ON a.attrelid = f.rel AND a.attnum = f.att AND NOT a.attisdropped
          ORDER BY 1, 5, 6",
        &[],
    )
    .map_err(TrompeError::Internal)?;
    let mut out: Vec<Fed> = Vec::new();
    for r in rows {
        let text = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
        let int = |i: usize| r.get(i).cloned().flatten().and_then(|v| v.parse::<i64>().ok());
        let seq = text(0);
        if out.last().is_none_or(|f| f.seq != seq) {
            out.push(Fed {
                seq,
                increment: int(1).unwrap_or(1),
                max: int(2).unwrap_or(i64::MAX),
                cycle: text(3) == "t",
                columns: Vec::new(),
            });
        }
        if text(6) == "t" {
            if let Some(fed) = out.last_mut() {
                fed.columns.push((text(4), text(5)));
            }
        }
    }
    Ok(out)
}

/// Warns (once per session each) about keys of replicated tables that no slot keeps apart: a
/// sequence counting down, one that cycles, an integer key computed by a default that draws
/// from no sequence of its own.
fn report_unsafe(fed: &[Fed]) -> Result<(), TrompeError> {
    for f in fed {
        if f.increment < 0 {
            crate::notices::warn_once(format!("sequence counts down {}", f.seq), || {
                format!(
                    "sequence {} counts down (INCREMENT BY {}): no sequence slot keeps the keys it gives on different \
                     nodes apart, and keys drawn on two nodes at once can collide; make it count up",
                    f.seq, f.increment
                )
            });
        } else if f.cycle {
            crate::notices::warn_once(format!("sequence cycles {}", f.seq), || {
                format!(
                    "sequence {} has CYCLE: once it wraps around, its keys leave this node's slot and can collide \
                     with other nodes' keys; use NO CYCLE",
                    f.seq
                )
            });
        }
    }
    let computed = sql::rows(
        "SELECT format('%I.%I.%I', n.nspname, c.relname, a.attname), pg_get_expr(ad.adbin, ad.adrelid)
           FROM trompe.tables t
           JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
           JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY (i.indkey)
           JOIN pg_attrdef ad ON ad.adrelid = c.oid AND ad.adnum = a.attnum
          WHERE a.atttypid IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype, 'numeric'::regtype)
            AND NOT EXISTS (SELECT 1 FROM pg_depend d JOIN pg_sequence s ON s.seqrelid = d.refobjid
                             WHERE d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid)
          ORDER BY 1",
        &[],
    )
    .map_err(TrompeError::Internal)?;
    for r in computed {
        let column = r.first().cloned().flatten().unwrap_or_default();
        let default = r.get(1).cloned().flatten().unwrap_or_default();
        crate::notices::warn_once(format!("computed key {column}"), || {
            format!(
                "key column {column} takes its values from DEFAULT {default}, which draws from no sequence of the \
                 table: no sequence slot keeps the keys it gives on different nodes apart, and keys drawn on two \
                 nodes at once can collide; use a sequence (DEFAULT nextval(...)) or an identity column"
            )
        });
    }
    Ok(())
}

/// Puts every sequence a replicated table draws from into this node's slot, if one was chosen,
/// continuing above its current position; with `above_keys`, also above the largest key of
/// every integer column it feeds (what `set_sequence_slot` and a join do: rows may have been
/// loaded with explicit keys). Sequences already where they should be are left alone; those
/// counting down are left alone and reported. Returns how many were changed.
pub fn adjust_above_keys(above_keys: bool) -> Result<i64, TrompeError> {
    let Some(wanted) = configured()? else { return Ok(0) };
    let _internal = InternalOperation::begin();
    as_extension_owner(|| -> Result<i64, TrompeError> {
        let fed = fed_sequences()?;
        report_unsafe(&fed)?;
        let mut changed = 0;
        for f in fed.iter().filter(|f| f.increment > 0) {
            let seq = &f.seq;
            // The value nextval() returns next is last_value if the sequence was not called
            // since it was set, else last_value + increment.
            let state = sql::row(&format!("SELECT last_value, is_called FROM {seq}"), &[])
                .map_err(TrompeError::Internal)?
                .unwrap_or_default();
            let last = state.first().cloned().flatten().and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
            let called = state.get(1).cloned().flatten().as_deref() == Some("t");
            let current_next = if called { last.saturating_add(f.increment) } else { last };
            if !above_keys && f.increment == wanted.slots && wanted.owns(current_next) {
                continue;
            }
            let mut after = if called { last } else { last - 1 };
            if above_keys || f.increment != wanted.slots || !wanted.owns(current_next) {
                for (table, column) in &f.columns {
                    let largest = sql::int(&format!("SELECT coalesce(max({column})::bigint, 0) FROM {table}"), &[])
                        .map_err(TrompeError::Internal)?;
                    after = after.max(largest);
                }
            }
            let next = wanted.next_after(after, f.max).ok_or(TrompeError::SequenceExhausted(seq.clone()))?;
            if f.increment == wanted.slots && next == current_next {
                continue;
            }
            if f.increment != wanted.slots {
                sql::execute(&format!("ALTER SEQUENCE {seq} INCREMENT BY {}", wanted.slots), &[])
                    .map_err(TrompeError::Internal)?;
            }
            sql::execute("SELECT setval($1::regclass, $2::bigint, false)", &[Some(seq), Some(&next.to_string())])
                .map_err(TrompeError::Internal)?;
            changed += 1;
        }
        Ok(changed)
    })
}

/// [`adjust_above_keys`] without looking at the keys of sequences already in this node's slot
/// (after DDL and new tables: cheap, no table scans).
pub fn adjust() -> Result<i64, TrompeError> {
    adjust_above_keys(false)
}

/// After `setval` set sequence `seq` so that it continues above `after`: if it feeds a
/// replicated table, moves it to the next value of this node's slot above `after` (if a slot
/// was chosen) and returns its qualified name (the call then replicates); None otherwise.
pub fn continue_above(seq: pg_sys::Oid, after: i64) -> Result<Option<String>, TrompeError> {
    let wanted = configured()?;
    as_extension_owner(|| -> Result<Option<String>, TrompeError> {
        let qualified = sql::value(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid = $1::oid",
            &[Some(&seq.to_u32().to_string())],
        )
        .map_err(TrompeError::Internal)?;
        let Some(qualified) = qualified else { return Ok(None) };
        let Some(fed) = fed_sequences()?.into_iter().find(|f| f.seq == qualified) else { return Ok(None) };
        if let Some(wanted) = wanted.filter(|_| fed.increment > 0) {
            let next = wanted.next_after(after, fed.max).ok_or(TrompeError::SequenceExhausted(qualified.clone()))?;
            sql::execute(
                "SELECT setval($1::regclass, $2::bigint, false)",
                &[Some(&qualified), Some(&next.to_string())],
            )
            .map_err(TrompeError::Internal)?;
        }
        Ok(Some(qualified))
    })
}
