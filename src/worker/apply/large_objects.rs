//! Large-object references in incoming changes, replaced by this node's copies (see
//! `crate::large_objects`).

use trompe_core::large_object::GlobalLo;

use super::change::Change;
use super::error::ApplyError;
use super::table::ApplyCache;

/// Apply: `changes` (inserts or updates of one table) with every large-object reference
/// replaced by the oid of this node's copy, copying objects it does not have yet; `None` if
/// the table has no such column or no change refers to a large object.
pub fn localized(cache: &mut ApplyCache, changes: &[Change]) -> Result<Option<Vec<Change>>, ApplyError> {
    let Some(first) = changes.first() else { return Ok(None) };
    let table = cache.table(&first.nsp, &first.rel)?;
    if !table.has_large_objects {
        return Ok(None);
    }
    let mut out: Option<Vec<Change>> = None;
    for (i, change) in changes.iter().enumerate() {
        let Some(vals) = &change.vals else { continue };
        for (c, col) in change.cols.iter().enumerate() {
            if !table.attrs.get(col).is_some_and(|a| a.large_object) {
                continue;
            }
            let Some(Some(text)) = vals.get(c) else { continue };
            let Some(parsed) = GlobalLo::parse(text) else { continue };
            let lo = parsed.map_err(|e| ApplyError::Malformed { id: change.id(), reason: e.to_string() })?;
            if !crate::large_objects::available() {
                return Err(ApplyError::Postgres(
                    "a change refers to a large object: run ALTER EXTENSION trompe UPDATE on this node".into(),
                ));
            }
            let local = crate::large_objects::local_copy(&lo).map_err(ApplyError::Postgres)?;
            let copies = out.get_or_insert_with(|| changes.to_vec());
            if let Some(slot) = copies[i].record.vals.as_mut().and_then(|v| v.get_mut(c)) {
                *slot = Some(local.to_string());
            }
        }
    }
    Ok(out)
}
