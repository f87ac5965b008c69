//! Peer changes written before DDL of this node reached the peer: they may name a table this
//! node renamed or dropped since, or columns it renamed or dropped. They are applied to what
//! remains (renamed names followed, dropped columns left out, changes for a dropped table
//! dropped), so the stream goes on and every node ends with the same rows once the DDL has
//! reached all of them (see `crate::ddl_history`). A name that neither exists nor was renamed
//! or dropped here is left as it is: DDL that creates it has not arrived yet, and applying
//! stops with an error until it has.

use std::borrow::Cow;

use trompe_core::logformat::Op;

use super::change::Change;
use super::error::ApplyError;
use super::table::ApplyCache;
use crate::ddl_history::{column_changes, table_fate, TableFate};

/// What to do with one change.
enum Verdict {
    /// Apply it as it is.
    AsIs,
    /// Nothing to apply it to.
    Drop,
    /// Apply it to table `nsp.rel`, with each of its columns renamed (`Some`) or left out.
    Map { nsp: String, rel: String, columns: Option<Vec<Option<String>>> },
}

/// The changes of `txn` mapped to this node's tables and columns, up to its first DDL change
/// (changes after it name what that DDL made).
pub fn resolve<'t>(cache: &mut ApplyCache, txn: &'t [Change]) -> Result<Cow<'t, [Change]>, ApplyError> {
    let mut out: Option<Vec<Change>> = None;
    let mut last: Option<(usize, bool)> = None;
    for (i, change) in txn.iter().enumerate() {
        if change.op == Op::Ddl {
            if let Some(out) = out.as_mut() {
                out.extend_from_slice(&txn[i..]);
            }
            break;
        }
        // A run of changes of one table with the same columns gets one verdict.
        let same_as_last = last.is_some_and(|(j, _)| {
            let prev = &txn[j];
            prev.nsp == change.nsp && prev.rel == change.rel && prev.cols == change.cols
        });
        let verdict =
            if same_as_last && last.is_some_and(|(_, as_is)| as_is) { Verdict::AsIs } else { verdict(cache, change)? };
        last = Some((i, matches!(verdict, Verdict::AsIs)));
        match verdict {
            Verdict::AsIs => {
                if let Some(out) = out.as_mut() {
                    out.push(change.clone());
                }
            }
            Verdict::Drop => {
                out.get_or_insert_with(|| txn[..i].to_vec());
            }
            Verdict::Map { nsp, rel, columns } => {
                let out = out.get_or_insert_with(|| txn[..i].to_vec());
                out.push(mapped(change, nsp, rel, columns.as_deref()));
            }
        }
    }
    Ok(match out {
        Some(v) => Cow::Owned(v),
        None => Cow::Borrowed(txn),
    })
}

fn verdict(cache: &mut ApplyCache, change: &Change) -> Result<Verdict, ApplyError> {
    // A change other than a truncation looks the table up (and locks it) as its write will: a
    // name the cache knows costs no catalog lookup. A truncation takes its stronger lock later.
    let exists = if change.op == Op::Truncate {
        cache.exists(&change.nsp, &change.rel)?
    } else {
        match cache.table(&change.nsp, &change.rel) {
            Ok(_) => true,
            Err(ApplyError::NoSuchTable(_)) => false,
            Err(e) => return Err(e),
        }
    };
    let (nsp, rel, renamed) = if exists {
        (change.nsp.clone(), change.rel.clone(), false)
    } else {
        match table_fate(&change.nsp, &change.rel).map_err(ApplyError::Postgres)? {
            None => return Ok(Verdict::AsIs),
            Some(TableFate::Dropped) => return Ok(Verdict::Drop),
            Some(TableFate::Renamed { nsp, rel }) => (nsp, rel, true),
        }
    };
    if change.op == Op::Truncate {
        return Ok(if renamed { Verdict::Map { nsp, rel, columns: None } } else { Verdict::AsIs });
    }
    let table = cache.table(&nsp, &rel)?;
    if change.cols.iter().all(|c| table.attrs.contains_key(c)) {
        return Ok(if renamed { Verdict::Map { nsp, rel, columns: None } } else { Verdict::AsIs });
    }
    let history = column_changes(table.relid).map_err(ApplyError::Postgres)?;
    let columns = change
        .cols
        .iter()
        .map(|c| {
            if table.attrs.contains_key(c) {
                return Some(c.clone());
            }
            // Follow the column through the renames and drops recorded after it got its name.
            let mut name = c.clone();
            let mut known = false;
            for (old, new) in &history {
                if *old == name {
                    known = true;
                    match new {
                        Some(new) => name = new.clone(),
                        None => return None,
                    }
                }
            }
            // Unknown here: left as it is (DDL adding it is still on its way).
            Some(if known { name } else { c.clone() })
        })
        .collect();
    Ok(Verdict::Map { nsp, rel, columns: Some(columns) })
}

/// `change` applied to table `nsp.rel`, with its columns renamed or left out as `columns` says.
fn mapped(change: &Change, nsp: String, rel: String, columns: Option<&[Option<String>]>) -> Change {
    let mut out = change.clone();
    out.record.nsp = nsp;
    out.record.rel = rel;
    let Some(columns) = columns else { return out };
    let keep = |i: usize| columns.get(i).is_some_and(Option::is_some);
    out.record.cols = columns.iter().flatten().cloned().collect();
    if let Some(vals) = out.record.vals.as_mut() {
        *vals = std::mem::take(vals).into_iter().enumerate().filter(|(i, _)| keep(*i)).map(|(_, v)| v).collect();
    }
    // The old key's values are the first columns' (key columns are never dropped).
    out
}
