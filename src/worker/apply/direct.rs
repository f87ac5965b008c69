//! Inserting a run of rows through the executor's single-row insert, as PostgreSQL's own
//! logical replication applies them: no statement to start and end per transaction, no
//! arrays to build and unnest. It does what the `INSERT` statement would (BEFORE and AFTER row
//! triggers that fire in replica mode, stored generated columns, CHECK and NOT NULL
//! constraints, every index, a unique violation raised as an error) except fire statement
//! triggers (native logical replication fires none either), for plain tables whose every
//! writable column the change carries (nothing to fill from defaults).

use pgrx::pg_sys;

use super::change::Change;
use super::error::ApplyError;
use super::table::Table;

/// The converted values of a run are freed once they take this much memory (a transaction
/// of any size is inserted with bounded memory).
const VALUES_MEMORY: usize = 8 << 20;

/// Where each of the change's columns goes in the table's tuple descriptor, if the change
/// carries every writable column exactly once.
pub(super) fn column_positions(table: &Table, change: &Change) -> Option<Vec<usize>> {
    if change.cols.len() != table.attrs.len() {
        return None;
    }
    let mut positions = Vec::with_capacity(change.cols.len());
    for c in &change.cols {
        let index = table.attrs.get(c.as_str())?.index;
        if positions.contains(&index) {
            return None;
        }
        positions.push(index);
    }
    Some(positions)
}

/// Inserts the rows of `run` (inserts into one table, with the same columns) into `table`.
/// Returns false, having done nothing, when the table is not a plain table or the changes
/// leave a column to its default: the caller then uses an `INSERT` statement.
pub fn insert_rows(table: &Table, run: &[Change]) -> Result<bool, ApplyError> {
    super::owner::as_table_owner(table.relid, || insert_rows_as_current_user(table, run))
}

fn insert_rows_as_current_user(table: &Table, run: &[Change]) -> Result<bool, ApplyError> {
    let Some(first) = run.first() else { return Ok(true) };
    let Some(positions) = column_positions(table, first) else { return Ok(false) };
    if let Some(bad) = run.iter().find(|c| c.vals.is_none()) {
        return Err(ApplyError::Malformed { id: bad.id(), reason: "insert without values".into() });
    }
    let attrs: Vec<&super::table::Attr> = first.cols.iter().map(|c| &table.attrs[c.as_str()]).collect();
    // SAFETY: the relation is opened with RowExclusiveLock (kept to the end of the
    // transaction, as an INSERT does) and closed at the end; the executor state, result
    // relation and slot are set up as PostgreSQL's logical replication apply sets them up,
    // and freed before returning; an error raised inside aborts the transaction, which
    // releases all of them. Values are converted by each column's input function into a
    // context of our own, reset only after the row using them was inserted and the slot
    // cleared, and deleted at the end (a child of the current context: an error frees it with
    // the transaction); the slot's arrays are sized by the relation's own descriptor.
    unsafe {
        let lock = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
        let rel = pg_sys::table_open(table.relid, lock);
        let natts = (*(*rel).rd_att).natts as usize;
        let plain = (*(*rel).rd_rel).relkind as u8 == pg_sys::RELKIND_RELATION;
        if !plain || positions.iter().any(|&p| p >= natts) {
            pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
            return Ok(false);
        }
        let estate = pg_sys::CreateExecutorState();
        let rte = pg_sys::palloc0(std::mem::size_of::<pg_sys::RangeTblEntry>()) as *mut pg_sys::RangeTblEntry;
        (*rte).type_ = pg_sys::NodeTag::T_RangeTblEntry;
        (*rte).rtekind = pg_sys::RTEKind::RTE_RELATION;
        (*rte).relid = table.relid;
        (*rte).relkind = (*(*rel).rd_rel).relkind;
        (*rte).rellockmode = lock;
        crate::pg_compat::exec_init_range_table(estate, rte);
        let rri = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>()) as *mut pg_sys::ResultRelInfo;
        (*rri).type_ = pg_sys::NodeTag::T_ResultRelInfo;
        pg_sys::InitResultRelInfo(rri, rel, 1, std::ptr::null_mut(), 0);
        pg_sys::AfterTriggerBeginQuery();
        pg_sys::ExecOpenIndices(rri, false);
        let slot = pg_sys::ExecInitExtraTupleSlot(estate, (*rel).rd_att, &pg_sys::TTSOpsVirtual);
        // The values converted from text live here, freed every VALUES_MEMORY (with the
        // conversions reused from the previous row).
        let values_context = pg_sys::AllocSetContextCreateInternal(
            pg_sys::CurrentMemoryContext,
            c"trompe apply values".as_ptr(),
            pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        );
        let mut last = vec![None; attrs.len()];
        for change in run {
            let vals = change.vals.as_deref().unwrap_or_default();
            pg_sys::ExecClearTuple(slot);
            let outer = pg_sys::MemoryContextSwitchTo(values_context);
            let values = std::slice::from_raw_parts_mut((*slot).tts_values, natts);
            let nulls = std::slice::from_raw_parts_mut((*slot).tts_isnull, natts);
            nulls.fill(true);
            for (j, attr) in attrs.iter().enumerate() {
                let (d, n) = attr.datum_reusing(vals.get(j).and_then(|v| v.as_deref()), &mut last[j]);
                values[positions[j]] = d;
                nulls[positions[j]] = n;
            }
            pg_sys::MemoryContextSwitchTo(outer);
            pg_sys::ExecStoreVirtualTuple(slot);
            pg_sys::ExecSimpleRelationInsert(rri, estate, slot);
            // The row is in the table: its values may go (and with them the reused ones).
            if pg_sys::MemoryContextMemAllocated(values_context, false) >= VALUES_MEMORY {
                pg_sys::ExecClearTuple(slot);
                pg_sys::MemoryContextReset(values_context);
                last.iter_mut().for_each(|l| *l = None);
            }
            // What constraint checks allocated for this row (ResetPerTupleExprContext).
            let per_tuple = (*estate).es_per_tuple_exprcontext;
            if !per_tuple.is_null() {
                pg_sys::MemoryContextReset((*per_tuple).ecxt_per_tuple_memory);
            }
        }
        pg_sys::ExecClearTuple(slot);
        pg_sys::MemoryContextDelete(values_context);
        pg_sys::ExecCloseIndices(rri);
        pg_sys::AfterTriggerEndQuery(estate);
        pg_sys::ExecResetTupleTable((*estate).es_tupleTable, false);
        pg_sys::FreeExecutorState(estate);
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        // Later statements of this transaction see the rows.
        pg_sys::CommandCounterIncrement();
    }
    Ok(true)
}
