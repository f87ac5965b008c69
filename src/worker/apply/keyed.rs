//! Updating and deleting one row found by its primary key through the executor, as
//! PostgreSQL's own logical replication applies them (`RelationFindReplTupleByIndex`, then
//! `ExecSimpleRelationUpdate` / `ExecSimpleRelationDelete`): no statement to plan and run, and
//! the row's version is checked here, once, on the row as it is after locking it.
//!
//! The lookup waits for a transaction writing the row and locks the newest committed version
//! before its version is read, so a local change committed meanwhile is the one decided
//! against (nothing newer is overwritten). Tables where a statement does something this path
//! does not (row-level security, inheritance children, statement or BEFORE row triggers that
//! fire in replica mode, transition tables, a change that lacks some column) are left to the
//! SQL statements of `rows`: the functions here then return `None` having done nothing.

use pgrx::pg_sys;

use super::change::Change;
use super::error::ApplyError;
use super::table::Table;
use crate::conflicts::{decide, slot_json, Incoming};

/// What the executor met for a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Met {
    /// No row has the key (none committed, none being written).
    Missing,
    /// The local row ranks above the incoming change: it stays.
    LocalWon,
    /// The incoming change won and was applied to the row.
    Written,
}

/// The write to do on the row found.
enum Write<'c> {
    /// Replace it with the change's row (its columns at these positions of the descriptor).
    Update(&'c Change, Vec<usize>),
    /// Delete it.
    Delete,
}

/// Updates the row with primary key `keys` to the change's row if `incoming` wins over it;
/// `remote_row` gives the change's row as JSON for a conflict record (when `incoming` has none).
pub fn update_row(
    table: &Table,
    change: &Change,
    incoming: &Incoming,
    keys: &[Option<&str>],
    remote_row: impl FnOnce() -> Option<String>,
) -> Result<Option<Met>, ApplyError> {
    let Some(positions) = super::direct::column_positions(table, change) else { return Ok(None) };
    if change.vals.is_none() {
        return Err(ApplyError::Malformed { id: change.id(), reason: "update without values".into() });
    }
    super::owner::as_table_owner(table.relid, || {
        write(table, incoming, keys, Write::Update(change, positions), remote_row)
    })
}

/// Deletes the row with primary key `keys` if `incoming` wins over it.
pub fn delete_row(table: &Table, incoming: &Incoming, keys: &[Option<&str>]) -> Result<Option<Met>, ApplyError> {
    super::owner::as_table_owner(table.relid, || write(table, incoming, keys, Write::Delete, || None))
}

/// Whether a trigger of `rel` for `event` (a `TRIGGER_TYPE_*` bit) fires in this session and
/// does what the single-row executor functions would not do as a statement does: a
/// statement-level trigger, a BEFORE row trigger (it may skip or change the row), or one with
/// transition tables.
///
/// # Safety
/// `rel` must be an open relation.
unsafe fn special_triggers(rel: pg_sys::Relation, event: u32) -> bool {
    // SAFETY: the relation is open; its trigger descriptor (if any) has `numtriggers` entries.
    unsafe {
        let desc = (*rel).trigdesc;
        if desc.is_null() {
            return false;
        }
        let replica = pg_sys::SessionReplicationRole == pg_sys::SESSION_REPLICATION_ROLE_REPLICA as i32;
        let triggers = std::slice::from_raw_parts((*desc).triggers, (*desc).numtriggers as usize);
        triggers.iter().any(|t| {
            let fires = match t.tgenabled as u8 {
                pg_sys::TRIGGER_FIRES_ALWAYS => true,
                pg_sys::TRIGGER_FIRES_ON_REPLICA => replica,
                pg_sys::TRIGGER_FIRES_ON_ORIGIN => !replica,
                _ => false,
            };
            let kind = t.tgtype as u32;
            let after_row = kind & pg_sys::TRIGGER_TYPE_ROW != 0
                && kind & (pg_sys::TRIGGER_TYPE_BEFORE | pg_sys::TRIGGER_TYPE_INSTEAD) == 0;
            let transition = !t.tgoldtable.is_null() || !t.tgnewtable.is_null();
            fires && kind & event != 0 && (!after_row || transition)
        })
    }
}

/// The primary key index of `rel` if its key columns are `table.key`'s, in order.
///
/// # Safety
/// `rel` must be an open relation.
unsafe fn key_index(rel: pg_sys::Relation, table: &Table) -> Option<pg_sys::Oid> {
    // SAFETY: the relation is open; the index is opened and closed here (the lock taken stays
    // to the end of the transaction, as the lookup takes it anyway).
    unsafe {
        let oid = crate::pg_compat::primary_key_index(rel);
        if oid == pg_sys::InvalidOid {
            return None;
        }
        let index = pg_sys::index_open(oid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        let form = (*index).rd_index;
        let nkeys = (*form).indnkeyatts as usize;
        let columns = (*form).indkey.values.as_slice(nkeys);
        let same = nkeys == table.key.len()
            && table
                .key
                .iter()
                .zip(columns)
                .all(|(k, &a)| table.attrs.get(k).is_some_and(|x| x.index + 1 == a as usize));
        pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
        same.then_some(oid)
    }
}

/// Whether this path can write `rel` (see the module's documentation); `positions` are the
/// descriptor positions of the values it would write, `event` the trigger event.
///
/// # Safety
/// `rel` must be an open relation.
unsafe fn eligible(rel: pg_sys::Relation, table: &Table, positions: &[usize], event: u32, right: u32) -> bool {
    // SAFETY: the relation is open; its descriptor has `natts` attributes.
    unsafe {
        let form = (*rel).rd_rel;
        let desc = (*rel).rd_att;
        let natts = (*desc).natts as usize;
        // The columns are still the ones the table's facts were read for.
        let columns_match = table.attrs.values().all(|a| {
            a.index < natts && {
                let att = &*crate::pg_compat::tuple_desc_attr(desc, a.index);
                !att.attisdropped && att.atttypid == a.typid
            }
        });
        (*form).relkind as u8 == pg_sys::RELKIND_RELATION
            && !(*form).relhassubclass
            && !(*form).relrowsecurity
            && columns_match
            && positions.iter().all(|&p| p < natts)
            && !special_triggers(rel, event)
            // Without the right, the statement raises the error that says so.
            && pg_sys::pg_class_aclcheck(table.relid, pg_sys::GetUserId(), right as pg_sys::AclMode)
                == pg_sys::AclResult::ACLCHECK_OK
    }
}

fn write(
    table: &Table,
    incoming: &Incoming,
    keys: &[Option<&str>],
    what: Write,
    remote_row: impl FnOnce() -> Option<String>,
) -> Result<Option<Met>, ApplyError> {
    // The row lock the statement would take: the key stays, so an update leaves foreign keys
    // pointing at the row alone (unless it changes another unique column, see heap_update).
    let (event, right, positions, row_lock) = match &what {
        Write::Update(_, positions) => (
            pg_sys::TRIGGER_TYPE_UPDATE,
            pg_sys::ACL_UPDATE,
            positions.as_slice(),
            pg_sys::LockTupleMode::LockTupleNoKeyExclusive,
        ),
        Write::Delete => {
            (pg_sys::TRIGGER_TYPE_DELETE, pg_sys::ACL_DELETE, &[][..], pg_sys::LockTupleMode::LockTupleExclusive)
        }
    };
    // SAFETY: as the insert path (direct.rs) and PostgreSQL's apply worker do: the relation is
    // opened with RowExclusiveLock (kept to the end of the transaction) and closed at the end;
    // the executor state, result relation, EvalPlanQual state and slots are set up as
    // `create_edata_for_relation` sets them up and freed before returning (an error raised
    // inside aborts the transaction, which releases all of them). Values are converted inside
    // the executor state's memory, freed with it; slots are sized by the relation's descriptor.
    unsafe {
        let lock = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
        let rel = pg_sys::table_open(table.relid, lock);
        let index = if eligible(rel, table, positions, event, right) { key_index(rel, table) } else { None };
        let Some(index) = index else {
            pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
            return Ok(None);
        };
        let estate = pg_sys::CreateExecutorState();
        let outer = pg_sys::MemoryContextSwitchTo((*estate).es_query_cxt);
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
        // Found there by the AFTER triggers (no refcount taken: not closed from there).
        (*estate).es_opened_result_relations = pg_sys::lappend((*estate).es_opened_result_relations, rri.cast());
        (*estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
        let epq = pg_sys::palloc0(std::mem::size_of::<pg_sys::EPQState>()) as *mut pg_sys::EPQState;
        crate::pg_compat::eval_plan_qual_init(epq, estate);
        pg_sys::AfterTriggerBeginQuery();
        pg_sys::ExecOpenIndices(rri, false);
        let desc = (*rel).rd_att;
        let natts = (*desc).natts as usize;

        // The key, at its columns' positions.
        let search = pg_sys::ExecInitExtraTupleSlot(estate, desc, &pg_sys::TTSOpsVirtual);
        pg_sys::ExecClearTuple(search);
        std::slice::from_raw_parts_mut((*search).tts_isnull, natts).fill(true);
        for (k, text) in table.key.iter().zip(keys) {
            let attr = &table.attrs[k];
            let (d, n) = attr.datum(*text);
            *(*search).tts_values.add(attr.index) = d;
            *(*search).tts_isnull.add(attr.index) = n;
        }
        pg_sys::ExecStoreVirtualTuple(search);
        let local = pg_sys::table_slot_create(rel, &mut (*estate).es_tupleTable);
        let found = pg_sys::RelationFindReplTupleByIndex(rel, index, row_lock, search, local);
        let met = if !found {
            Met::Missing
        } else {
            let mut isnull = false;
            let xmin = pg_sys::slot_getsysattr(local, pg_sys::MinTransactionIdAttributeNumber, &mut isnull);
            let xmin = pg_sys::TransactionId::from(xmin.value() as u32);
            // The conflict record (and the row versions it reads) allocate outside the executor.
            pg_sys::MemoryContextSwitchTo(outer);
            let wins = decide(incoming, xmin, || slot_json(local), remote_row);
            pg_sys::MemoryContextSwitchTo((*estate).es_query_cxt);
            if !wins {
                Met::LocalWon
            } else {
                match &what {
                    Write::Update(change, positions) => {
                        let row = pg_sys::ExecInitExtraTupleSlot(estate, desc, &pg_sys::TTSOpsVirtual);
                        pg_sys::ExecClearTuple(row);
                        std::slice::from_raw_parts_mut((*row).tts_isnull, natts).fill(true);
                        let vals = change.vals.as_deref().unwrap_or_default();
                        for (j, c) in change.cols.iter().enumerate() {
                            let (d, n) = table.attrs[c.as_str()].datum(vals.get(j).and_then(|v| v.as_deref()));
                            *(*row).tts_values.add(positions[j]) = d;
                            *(*row).tts_isnull.add(positions[j]) = n;
                        }
                        pg_sys::ExecStoreVirtualTuple(row);
                        pg_sys::ExecSimpleRelationUpdate(rri, estate, epq, local, row);
                    }
                    Write::Delete => pg_sys::ExecSimpleRelationDelete(rri, estate, epq, local),
                }
                Met::Written
            }
        };
        pg_sys::ExecCloseIndices(rri);
        pg_sys::EvalPlanQualEnd(epq);
        pg_sys::AfterTriggerEndQuery(estate);
        pg_sys::ExecResetTupleTable((*estate).es_tupleTable, false);
        pg_sys::MemoryContextSwitchTo(outer);
        pg_sys::FreeExecutorState(estate);
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        // Later statements of this transaction see the change.
        pg_sys::CommandCounterIncrement();
        Ok(Some(met))
    }
}
