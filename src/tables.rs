//! Which tables are replicated: `trompe.add_table`, `remove_table`, `add_schema`,
//! `remove_schema`, `set_conflict_rule`, and the checks that keep a replicated table replicable.

use pgrx::prelude::*;
use pgrx::spi::quote_identifier;
use pgrx::PgRelation;

use crate::catalog::primary_key_columns;
use crate::error::{OrRaise, TrompeError};
use crate::run_as::as_extension_owner;
use crate::session::InternalOperation;
use crate::sql;
use trompe_core::conflict::Rule;

/// Schemas that can never be replicated.
const RESERVED_SCHEMAS: &[&str] = &["pg_catalog", "information_schema", "pg_toast", "trompe"];

/// Facts about a relation that decide whether it can be replicated.
struct RelFacts {
    nsp: String,
    name: String,
    kind: u8,
    persistence: u8,
    has_pk: bool,
    /// An identity column GENERATED ALWAYS outside the primary key, if there is one.
    always_identity_outside_key: Option<String>,
}

fn rel_facts(relid: pg_sys::Oid) -> Result<RelFacts, TrompeError> {
    // SAFETY: the relation is opened with AccessShareLock (the caller holds a stronger lock
    // where it matters) and closed before returning; try_relation_open returns NULL if it
    // vanished.
    unsafe {
        let rel = pg_sys::try_relation_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        if rel.is_null() {
            return Err(TrompeError::Internal(format!("relation {} does not exist", relid.to_u32())));
        }
        let form = (*rel).rd_rel;
        let nsp_ptr = pg_sys::get_namespace_name((*form).relnamespace);
        let facts = RelFacts {
            nsp: if nsp_ptr.is_null() {
                String::new()
            } else {
                std::ffi::CStr::from_ptr(nsp_ptr).to_string_lossy().into_owned()
            },
            name: std::ffi::CStr::from_ptr((*form).relname.data.as_ptr()).to_string_lossy().into_owned(),
            kind: (*form).relkind as u8,
            persistence: (*form).relpersistence as u8,
            has_pk: (*form).relkind as u8 == pg_sys::RELKIND_RELATION && primary_key_columns(rel).is_some(),
            always_identity_outside_key: always_identity_outside_key(rel),
        };
        pg_sys::relation_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        Ok(facts)
    }
}

/// The first identity column GENERATED ALWAYS that is not part of the primary key: a peer
/// could not apply an update of it (only `SET col = DEFAULT` changes it, and an UPDATE cannot
/// set it to a given value).
///
/// # Safety
/// `rel` must be an open relation.
unsafe fn always_identity_outside_key(rel: pg_sys::Relation) -> Option<String> {
    // SAFETY: rel is open, so its tuple descriptor is valid; attribute names are NUL-terminated.
    unsafe {
        let key = primary_key_columns(rel).unwrap_or_default();
        let tupdesc = (*rel).rd_att;
        (0..(*tupdesc).natts as usize).find_map(|i| {
            let att = &*crate::pg_compat::tuple_desc_attr(tupdesc, i);
            let outside =
                !att.attisdropped && att.attidentity as u8 == pg_sys::ATTRIBUTE_IDENTITY_ALWAYS && !key.contains(&i);
            outside.then(|| std::ffi::CStr::from_ptr(att.attname.data.as_ptr()).to_string_lossy().into_owned())
        })
    }
}

impl RelFacts {
    fn qualified(&self) -> String {
        let nsp = if self.persistence == pg_sys::RELPERSISTENCE_TEMP { "pg_temp" } else { &self.nsp };
        format!("{}.{}", quote_identifier(nsp), quote_identifier(&self.name))
    }

    /// Why this relation cannot be replicated, if it cannot.
    fn refusal(&self) -> Option<TrompeError> {
        let kind = match self.kind {
            k if k == pg_sys::RELKIND_RELATION => None,
            k if k == pg_sys::RELKIND_PARTITIONED_TABLE => Some("a partitioned table (replicate its partitions)"),
            k if k == pg_sys::RELKIND_VIEW => Some("a view"),
            k if k == pg_sys::RELKIND_MATVIEW => Some("a materialized view"),
            k if k == pg_sys::RELKIND_FOREIGN_TABLE => Some("a foreign table"),
            k if k == pg_sys::RELKIND_SEQUENCE => Some("a sequence"),
            k if k == pg_sys::RELKIND_INDEX || k == pg_sys::RELKIND_PARTITIONED_INDEX => Some("an index"),
            _ => Some("not a table"),
        };
        if let Some(kind) = kind {
            return Some(TrompeError::NotATable { name: self.qualified(), kind });
        }
        match self.persistence {
            p if p == pg_sys::RELPERSISTENCE_TEMP => {
                return Some(TrompeError::NotPermanent { table: self.qualified(), kind: "temporary" })
            }
            p if p == pg_sys::RELPERSISTENCE_UNLOGGED => {
                return Some(TrompeError::NotPermanent { table: self.qualified(), kind: "unlogged" })
            }
            _ => {}
        }
        if RESERVED_SCHEMAS.contains(&self.nsp.as_str()) || self.nsp.starts_with("pg_") {
            return Some(TrompeError::ReservedSchema(self.nsp.clone()));
        }
        if !self.has_pk {
            return Some(TrompeError::NoPrimaryKey(self.qualified()));
        }
        if let Some(column) = &self.always_identity_outside_key {
            return Some(TrompeError::AlwaysIdentityOutsideKey { table: self.qualified(), column: column.clone() });
        }
        None
    }
}

/// Runs a query returning one oid column.
fn oids(query: &str, args: &[Option<&str>]) -> Result<Vec<pg_sys::Oid>, TrompeError> {
    let rows = sql::rows(query, args).map_err(TrompeError::Internal)?;
    Ok(rows.iter().filter_map(|r| r[0].as_deref().and_then(|v| v.parse::<u32>().ok())).map(pg_sys::Oid::from).collect())
}

fn is_replicated(relid: pg_sys::Oid) -> bool {
    as_extension_owner(|| {
        sql::flag(
            "SELECT EXISTS (SELECT 1 FROM trompe.tables WHERE relid = $1::oid)",
            &[Some(&relid.to_u32().to_string())],
        )
    })
    .unwrap_or(false)
}

/// Starts replicating one table (idempotent); returns false if it already was replicated.
pub fn add_table_by_oid(relid: pg_sys::Oid) -> Result<bool, TrompeError> {
    let facts = rel_facts(relid)?;
    if let Some(refusal) = facts.refusal() {
        return Err(refusal);
    }
    let _internal = InternalOperation::begin();
    as_extension_owner(|| {
        if is_replicated(relid) {
            return Ok(false);
        }
        let table = facts.qualified();
        let sql = format!(
            "INSERT INTO trompe.tables (relid) VALUES ({oid}::oid::regclass);
             CREATE OR REPLACE TRIGGER trompe_capture AFTER INSERT OR UPDATE OR DELETE ON {table}
                 FOR EACH ROW EXECUTE FUNCTION trompe.capture_row();
             CREATE OR REPLACE TRIGGER trompe_truncate AFTER TRUNCATE ON {table}
                 FOR EACH STATEMENT EXECUTE FUNCTION trompe.capture_truncate();",
            oid = relid.to_u32()
        );
        sql::execute(&sql, &[]).map_err(|e| TrompeError::Internal(format!("adding {table}: {e}")))?;
        Ok(true)
    })
    .and_then(|added| {
        if added {
            crate::sequences::adjust()?;
        }
        Ok(added)
    })
}

/// Stops replicating one table; returns false if it was not replicated.
pub fn remove_table_by_oid(relid: pg_sys::Oid) -> Result<bool, TrompeError> {
    let _internal = InternalOperation::begin();
    as_extension_owner(|| {
        if !is_replicated(relid) {
            return Ok(false);
        }
        let facts = rel_facts(relid)?;
        let table = facts.qualified();
        let sql = format!(
            "DROP TRIGGER IF EXISTS trompe_capture ON {table};
             DROP TRIGGER IF EXISTS trompe_truncate ON {table};
             DELETE FROM trompe.tables WHERE relid = {oid}::oid;
             DELETE FROM trompe.tombstones WHERE relid = {oid}::oid;
             DELETE FROM trompe.truncations WHERE relid = {oid}::oid;",
            oid = relid.to_u32()
        );
        sql::execute(&sql, &[]).map_err(|e| TrompeError::Internal(format!("removing {table}: {e}")))?;
        Ok(true)
    })
}

/// Starts replicating a table. A table needs a primary key and must be permanent; calling it
/// again for a replicated table does nothing. Returns whether the table was newly added.
#[pg_extern(volatile, parallel_unsafe)]
fn add_table(rel: PgRelation) -> bool {
    add_table_by_oid(rel.oid()).or_raise()
}

/// Stops replicating a table (its captured changes already in the log are still sent).
/// Returns whether it was replicated.
#[pg_extern(volatile, parallel_unsafe)]
fn remove_table(rel: PgRelation) -> bool {
    remove_table_by_oid(rel.oid()).or_raise()
}

/// Sets the conflict rule of a replicated table and returns it: `last_update_wins` (the
/// default), `first_update_wins` or `node_priority` (README, "Conflicts"). Every node must use
/// the same rule for a table. Rules under which nodes could disagree are refused.
#[pg_extern(volatile, parallel_unsafe)]
fn set_conflict_rule(rel: PgRelation, rule: &str) -> String {
    set_rule(rel.oid(), rule).or_raise()
}

/// Fails unless this database's schema has the node priorities (0.4.0 and later), which `what`
/// needs.
fn require_node_priorities(what: &str) -> Result<(), TrompeError> {
    if crate::conflicts::node_priorities_exist().map_err(TrompeError::Internal)? {
        return Ok(());
    }
    Err(TrompeError::SettingRequired(format!("{what} needs trompe 0.4.0 here: run ALTER EXTENSION trompe UPDATE")))
}

/// Makes every backend read the rule of table `relid` again (capture and apply keep it with
/// the table's relcache entry).
fn forget_ranking(relid: pg_sys::Oid) {
    // SAFETY: queues a relcache invalidation of the table, sent when the transaction commits.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(relid) };
}

fn set_rule(relid: pg_sys::Oid, rule: &str) -> Result<String, TrompeError> {
    let rule = Rule::parse(rule).map_err(|e| TrompeError::BadRule(e.to_string()))?;
    let facts = rel_facts(relid)?;
    if !is_replicated(relid) {
        return Err(TrompeError::NotReplicated(facts.qualified()));
    }
    if rule != Rule::LastUpdateWins {
        require_node_priorities(&format!("conflict rule {}", rule.name()))?;
    }
    as_extension_owner(|| {
        sql::execute(
            "UPDATE trompe.tables SET conflict_rule = $2 WHERE relid = $1::oid",
            &[Some(&relid.to_u32().to_string()), Some(rule.name())],
        )
    })
    .map_err(TrompeError::Internal)?;
    forget_ranking(relid);
    Ok(rule.name().to_string())
}

/// Sets the priority of node `node` for tables under conflict rule `node_priority` (nodes not
/// listed have priority 0; higher wins) and returns it. Every node must hold the same
/// priorities: set them on each node, before the tables take writes.
#[pg_extern(volatile, parallel_unsafe)]
fn set_node_priority(node: pgrx::Uuid, priority: i32) -> i32 {
    set_priority(node, priority).or_raise()
}

fn set_priority(node: pgrx::Uuid, priority: i32) -> Result<i32, TrompeError> {
    require_node_priorities("set_node_priority")?;
    let node = node.to_string();
    let tables = as_extension_owner(|| {
        sql::execute(
            "INSERT INTO trompe.node_priorities (node_id, priority) VALUES ($1::uuid, $2::int)
             ON CONFLICT (node_id) DO UPDATE SET priority = EXCLUDED.priority",
            &[Some(&node), Some(&priority.to_string())],
        )?;
        sql::rows("SELECT relid::text FROM trompe.tables WHERE conflict_rule = 'node_priority'", &[])
    })
    .map_err(TrompeError::Internal)?;
    for t in tables {
        if let Some(relid) = t.first().cloned().flatten().and_then(|r| r.parse::<u32>().ok()) {
            forget_ranking(pg_sys::Oid::from(relid));
        }
    }
    Ok(priority)
}

/// The schema `input` names, checked: its exact name, else read as SQL reads an identifier
/// (`App` is `app`, `"App"` is `App`), as `regnamespace` input is.
fn resolve_schema(input: &str) -> Result<String, TrompeError> {
    let exists = |name: &str| {
        sql::flag("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", &[Some(name)])
            .map_err(TrompeError::Internal)
    };
    let name = if exists(input)? {
        input.to_string()
    } else {
        match trompe_core::ident::parse_identifier(input.trim()) {
            Some(parsed) if exists(&parsed)? => parsed,
            _ => return Err(TrompeError::NoSuchSchema(input.to_string())),
        }
    };
    if RESERVED_SCHEMAS.contains(&name.as_str()) || name.starts_with("pg_") {
        return Err(TrompeError::ReservedSchema(name));
    }
    Ok(name)
}

/// Adds every table of the replicated schemas that is not replicated yet and can be; warns
/// about tables that cannot (no primary key yet). Returns how many were added.
pub fn sync_schema_tables() -> Result<i64, TrompeError> {
    Ok(sync_schema_tables_added()?.len() as i64)
}

/// As [`sync_schema_tables`], returning the tables added.
fn sync_schema_tables_added() -> Result<Vec<pg_sys::Oid>, TrompeError> {
    let candidates = oids(
        "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname IN (SELECT schema_name FROM trompe.schemas)
            AND c.relkind = 'r' AND c.relpersistence = 'p'
            AND NOT EXISTS (SELECT 1 FROM trompe.tables t WHERE t.relid = c.oid)
          ORDER BY c.oid",
        &[],
    )?;
    let mut added = Vec::new();
    for relid in candidates {
        let facts = rel_facts(relid)?;
        match facts.refusal() {
            None => {
                if add_table_by_oid(relid)? {
                    added.push(relid);
                }
            }
            Some(TrompeError::NoPrimaryKey(name)) => {
                crate::notices::warn_once(format!("no primary key {}", relid.to_u32()), || {
                    format!(
                        "table {name} in a replicated schema has no primary key: its rows are not replicated until it \
                         gets one, and from then on it is replicated like the other tables of the schema"
                    )
                })
            }
            Some(_) => {}
        }
    }
    Ok(added)
}

/// Replicates every table in a schema, now and every table created in it later. Returns how
/// many tables were newly added.
#[pg_extern(volatile, parallel_unsafe)]
fn add_schema(schema_name: &str) -> i64 {
    let schema_name = &resolve_schema(schema_name).or_raise();
    {
        let _internal = InternalOperation::begin();
        as_extension_owner(|| {
            sql::execute(
                "INSERT INTO trompe.schemas (schema_name) VALUES ($1) ON CONFLICT DO NOTHING",
                &[Some(schema_name)],
            )
        })
        .map_err(|e| TrompeError::Internal(format!("adding schema {schema_name}: {e}")))
        .or_raise();
    }
    // Peers' DDL that runs as trompe_peer_ddl (src/peer_ddl.rs) may create objects here. Every
    // node's add_schema grants it: the grant is not replicated.
    let internal = InternalOperation::begin();
    as_extension_owner(|| {
        if sql::flag("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'trompe_peer_ddl')", &[])? {
            sql::execute(
                &format!("GRANT USAGE, CREATE ON SCHEMA {} TO trompe_peer_ddl", quote_identifier(schema_name)),
                &[],
            )?;
        }
        Ok::<(), String>(())
    })
    .map_err(|e| TrompeError::Internal(format!("granting schema {schema_name} to trompe_peer_ddl: {e}")))
    .or_raise();
    drop(internal);
    sync_schema_tables().or_raise()
}

/// Stops replicating a schema and every table in it. Returns how many tables were removed.
#[pg_extern(volatile, parallel_unsafe)]
fn remove_schema(schema_name: &str) -> i64 {
    let listed = |name: &str| {
        sql::flag("SELECT EXISTS (SELECT 1 FROM trompe.schemas WHERE schema_name = $1)", &[Some(name)])
            .map_err(TrompeError::Internal)
            .or_raise()
    };
    let parsed = trompe_core::ident::parse_identifier(schema_name.trim());
    let schema_name = match parsed {
        Some(p) if !listed(schema_name) && listed(&p) => p,
        _ => schema_name.to_string(),
    };
    let schema_name = schema_name.as_str();
    let relids = oids(
        "SELECT t.relid::oid FROM trompe.tables t JOIN pg_class c ON c.oid = t.relid
           JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1",
        &[Some(schema_name)],
    )
    .or_raise();
    let _internal = InternalOperation::begin();
    as_extension_owner(|| sql::execute("DELETE FROM trompe.schemas WHERE schema_name = $1", &[Some(schema_name)]))
        .map_err(|e| TrompeError::Internal(format!("removing schema {schema_name}: {e}")))
        .or_raise();
    let mut removed = 0;
    for relid in relids {
        if remove_table_by_oid(relid).or_raise() {
            removed += 1;
        }
    }
    removed
}

/// Called by the DDL event trigger: refuses DDL that leaves a replicated table without a
/// primary key or makes it unlogged, and starts replicating new tables in replicated schemas.
#[pg_extern(volatile, parallel_unsafe)]
fn _after_ddl(touched: Vec<pg_sys::Oid>) {
    for relid in touched {
        if !is_replicated(relid) {
            continue;
        }
        let facts = rel_facts(relid).or_raise();
        if facts.persistence == pg_sys::RELPERSISTENCE_UNLOGGED {
            TrompeError::MadeUnlogged(facts.qualified()).raise();
        }
        if !facts.has_pk {
            TrompeError::DropPrimaryKey(facts.qualified()).raise();
        }
        if let Some(column) = facts.always_identity_outside_key.clone() {
            TrompeError::AlwaysIdentityOutsideKey { table: facts.qualified(), column }.raise();
        }
        let triggers_on = sql::int(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::oid
                AND tgname IN ('trompe_capture', 'trompe_truncate') AND tgenabled IN ('O', 'A')",
            &[Some(&relid.to_u32().to_string())],
        )
        .unwrap_or(0);
        if triggers_on != 2 {
            TrompeError::CaptureDisabled(facts.qualified()).raise();
        }
    }
    // A table of a replicated schema that only now can be replicated (ALTER TABLE ... SET LOGGED
    // after loading it unlogged, ADD PRIMARY KEY after filling it) has rows its peers never saw:
    // they are logged as inserts of this transaction, also when the table was created by it. (A
    // peer that made rows of its own by replaying CREATE TABLE AS gets the origin's over them.)
    let may_have_become_replicable = crate::capture::ddl_policy::take_may_have_become_replicable();
    for relid in sync_schema_tables_added().or_raise() {
        // Only tables this transaction's ALTER TABLE made replicable: a table added back for
        // another reason (one remove_table took out of a replicated schema) has rows its peers
        // may have changed since, which must not be sent again as new.
        if may_have_become_replicable.contains(&relid) {
            crate::capture::row::log_existing_rows(relid).or_raise();
        }
    }
    crate::sequences::adjust().or_raise();
}

/// Called by the sql_drop event trigger: forgets replicated tables that were dropped.
#[pg_extern(volatile, parallel_unsafe)]
fn _forget_dropped(dropped: Vec<pg_sys::Oid>) {
    let _internal = InternalOperation::begin();
    as_extension_owner(|| {
        let list: Vec<String> = dropped.iter().map(|o| o.to_u32().to_string()).collect();
        let oids = format!("{{{}}}", list.join(","));
        for table in ["tables", "tombstones", "truncations"] {
            sql::execute(&format!("DELETE FROM trompe.{table} WHERE relid::oid = ANY($1::oid[])"), &[Some(&oids)])?;
        }
        Ok::<(), String>(())
    })
    .map_err(|e| TrompeError::Internal(format!("forgetting dropped tables: {e}")))
    .or_raise();
}
