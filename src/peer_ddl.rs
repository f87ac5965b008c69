//! What DDL a peer may make this node run, and as whom.
//!
//! A peer's DDL entry is statement text; before it runs here it is parsed with PostgreSQL's own
//! parser and admitted only if it is one statement of a kind on the allow-list below, in a
//! trusted language if it creates a function, and about objects replicated here (a replicated
//! table or anything on it, or anything in a replicated schema). It then runs as the origin's
//! role when that role exists here and is not a superuser, otherwise as `trompe.peer_ddl_role`
//! (by default the non-superuser role `trompe_peer_ddl`). The origin checks the kind (and the
//! language) of its own DDL the same way before logging it, so what its peers would refuse fails
//! where it is run.
//!
//! The allow-list: `CREATE`/`ALTER`/`DROP` of tables (also `CREATE TABLE ... AS`), indexes
//! (also `REINDEX`), sequences, views and materialized views (also `REFRESH`), composite, enum
//! and range types, domains, functions and procedures in trusted languages, triggers, policies,
//! rules and extended statistics; `COMMENT ON`, `ALTER ... RENAME`, `ALTER ... SET SCHEMA`, `ALTER ... OWNER TO` of
//! those; `GRANT`/`REVOKE` on tables, sequences, functions and types; `GRANT`/`REVOKE`,
//! `ALTER DEFAULT PRIVILEGES IN SCHEMA`, `ALTER SCHEMA ... OWNER TO`/`RENAME` and `COMMENT ON
//! SCHEMA` of a replicated schema; and `SELECT pg_catalog.setval(...)` with constants, as the
//! origin logs a `setval`.

use std::ffi::CStr;

use pgrx::pg_sys;

use crate::pg_list::pointers;

/// Why a peer's DDL statement is not run here.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The entry holds several statements (or none).
    #[error("a replicated DDL entry must hold exactly one statement, this one holds {0}")]
    StatementCount(usize),
    /// The statement's kind is not on the allow-list.
    #[error("{0} is not DDL a peer may run here")]
    Kind(String),
    /// A function in a language that is not trusted.
    #[error("functions in language \"{0}\" are not trusted: a peer may create functions only in trusted languages")]
    UntrustedLanguage(String),
    /// The statement names an object that is not replicated here.
    #[error("{0} is not replicated on this node")]
    NotReplicated(String),
    /// The role peer DDL falls back to does not exist.
    #[error("role \"{0}\" (trompe.peer_ddl_role) does not exist")]
    NoDdlRole(String),
    /// A catalog lookup failed.
    #[error("{0}")]
    Lookup(String),
}

impl Refusal {
    /// The SQLSTATE reported for it.
    pub fn code(&self) -> pgrx::PgSqlErrorCode {
        use pgrx::PgSqlErrorCode::*;
        match self {
            Refusal::NoDdlRole(_) => ERRCODE_UNDEFINED_OBJECT,
            Refusal::Lookup(_) => ERRCODE_INTERNAL_ERROR,
            _ => ERRCODE_INSUFFICIENT_PRIVILEGE,
        }
    }
}

/// Whether the statement's targets are checked too (a peer's DDL) or only its kind (the
/// origin's own DDL, which was captured because it touches replicated objects).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    KindOnly,
    Targets,
}

/// Admits a peer's DDL `statement`: one statement, of an allowed kind, about objects
/// replicated here. Call in a transaction, with the origin's `search_path` and the role it will
/// run as in effect (names resolve as they will when it runs).
pub fn admit(statement: &str) -> Result<(), Refusal> {
    check(statement, Scope::Targets)
}

/// Checks the kind (and language) of DDL `statement` run here, as a peer would on receiving
/// it; `Ok` too if the text does not parse as one statement (nothing can be told then).
pub fn check_own(statement: &str) -> Result<(), Refusal> {
    match check(statement, Scope::KindOnly) {
        Err(Refusal::StatementCount(_)) => Ok(()),
        other => other,
    }
}

/// The role a peer's DDL runs as: `origin_role` if it exists here and has ordinary rights
/// (no superuser, nor one with the rights of a role that runs programs, touches the server's
/// files or administers trompe), otherwise `trompe.peer_ddl_role`.
pub fn run_as(origin_role: &str) -> Result<String, Refusal> {
    if !origin_role.is_empty() {
        // A peer names the role: only one with no more than ordinary rights is taken (no
        // superuser, predefined or trompe role, none that may create roles, bypass row
        // security or replicate), and none that is a member of one with more (it could
        // SET ROLE to it, or has its rights): of such a role, or of a predefined or trompe
        // role (reading all data, running programs, administering trompe, ...), except the
        // database's owner (pg_database_owner) and trompe_peer_ddl.
        let ordinary = crate::sql::value(
            "SELECT (NOT r.rolsuper AND NOT r.rolcreaterole AND NOT r.rolbypassrls AND NOT r.rolreplication
                     AND r.rolname !~ '^(pg_|trompe_)'
                     AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles p
                                      WHERE p.oid <> r.oid
                                        AND (p.rolsuper OR p.rolcreaterole OR p.rolbypassrls OR p.rolreplication
                                             OR (p.rolname ~ '^(pg_|trompe_)'
                                                 AND p.rolname NOT IN ('pg_database_owner', 'trompe_peer_ddl')))
                                        AND pg_catalog.pg_has_role(r.oid, p.oid, 'MEMBER')))::pg_catalog.text
               FROM pg_catalog.pg_roles r WHERE r.rolname = $1",
            &[Some(origin_role)],
        )
        .map_err(Refusal::Lookup)?;
        if ordinary.as_deref() == Some("true") {
            return Ok(origin_role.to_string());
        }
    }
    let fallback = crate::guc::peer_ddl_role();
    let exists =
        crate::sql::flag("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1)", &[Some(&fallback)])
            .map_err(Refusal::Lookup)?;
    if !exists {
        return Err(Refusal::NoDdlRole(fallback));
    }
    Ok(fallback)
}

fn check(statement: &str, scope: Scope) -> Result<(), Refusal> {
    let text = std::ffi::CString::new(statement.replace('\0', "")).unwrap_or_default();
    // SAFETY: a raw parse (no catalog access) in the current memory context; a syntax error
    // raises, which the caller's transaction catches; the nodes are read by their tags.
    unsafe {
        let list = pg_sys::pg_parse_query(text.as_ptr());
        let count = if list.is_null() { 0 } else { (*list).length as usize };
        if count != 1 {
            return Err(Refusal::StatementCount(count));
        }
        let raw = (*(*list).elements).ptr_value as *mut pg_sys::RawStmt;
        Statement { node: (*raw).stmt, scope }.check()
    }
}

/// Object types whose DDL a peer may run (for statements that name their object type).
fn allowed_object_type(t: pg_sys::ObjectType::Type) -> bool {
    use pg_sys::ObjectType::*;
    matches!(
        t,
        OBJECT_TABLE
            | OBJECT_INDEX
            | OBJECT_SEQUENCE
            | OBJECT_VIEW
            | OBJECT_MATVIEW
            | OBJECT_TYPE
            | OBJECT_DOMAIN
            | OBJECT_FUNCTION
            | OBJECT_PROCEDURE
            | OBJECT_ROUTINE
            | OBJECT_TRIGGER
            | OBJECT_POLICY
            | OBJECT_RULE
            | OBJECT_COLUMN
            | OBJECT_ATTRIBUTE
            | OBJECT_TABCONSTRAINT
            | OBJECT_DOMCONSTRAINT
            | OBJECT_STATISTIC_EXT
    )
}

struct Statement {
    node: *mut pg_sys::Node,
    scope: Scope,
}

impl Statement {
    /// The statement's command tag, for messages ("CREATE ROLE").
    unsafe fn tag(&self) -> String {
        // SAFETY: the caller passes a raw statement; the tag name is a static string.
        unsafe {
            let name = pg_sys::GetCommandTagName(pg_sys::CreateCommandTag(self.node));
            if name.is_null() {
                "this statement".into()
            } else {
                CStr::from_ptr(name).to_string_lossy().into_owned()
            }
        }
    }

    fn refuse(&self) -> Refusal {
        // SAFETY: self.node is the parsed statement.
        Refusal::Kind(unsafe { self.tag() })
    }

    fn targets(&self) -> bool {
        self.scope == Scope::Targets
    }

    /// Checks the statement by its parse tree.
    ///
    /// # Safety
    /// `self.node` must be a raw statement from the parser.
    unsafe fn check(&self) -> Result<(), Refusal> {
        use pg_sys::NodeTag::*;
        let node = self.node;
        // SAFETY: each node is read as the type its tag says; lists are PostgreSQL Lists.
        unsafe {
            match (*node).type_ {
                T_CreateStmt => {
                    let s = node as *mut pg_sys::CreateStmt;
                    // A partition or child changes its parents too.
                    for parent in pointers::<pg_sys::Node>((*s).inhRelations) {
                        if (*parent).type_ == pg_sys::NodeTag::T_RangeVar {
                            self.relation(parent as *mut pg_sys::RangeVar)?;
                        }
                    }
                    self.creating_relation((*s).relation)
                }
                T_CreateTableAsStmt => {
                    let s = node as *mut pg_sys::CreateTableAsStmt;
                    if !matches!((*s).objtype, pg_sys::ObjectType::OBJECT_TABLE | pg_sys::ObjectType::OBJECT_MATVIEW)
                        || (*s).into.is_null()
                    {
                        return Err(self.refuse());
                    }
                    self.creating_relation((*(*s).into).rel)
                }
                T_ViewStmt => self.creating_relation((*(node as *mut pg_sys::ViewStmt)).view),
                T_CreateSeqStmt => self.creating_relation((*(node as *mut pg_sys::CreateSeqStmt)).sequence),
                T_CompositeTypeStmt => self.creating_relation((*(node as *mut pg_sys::CompositeTypeStmt)).typevar),
                T_AlterSeqStmt => self.relation((*(node as *mut pg_sys::AlterSeqStmt)).sequence),
                T_AlterTableStmt => {
                    let s = node as *mut pg_sys::AlterTableStmt;
                    if !allowed_object_type((*s).objtype) {
                        return Err(self.refuse());
                    }
                    self.relation((*s).relation)
                }
                T_IndexStmt => self.relation((*(node as *mut pg_sys::IndexStmt)).relation),
                T_CreateTrigStmt => {
                    let s = node as *mut pg_sys::CreateTrigStmt;
                    // Fired at commit, after rows are applied as their table's owner: as the
                    // applying worker's superuser (src/worker/apply/owner.rs).
                    if (*s).isconstraint && (*s).initdeferred {
                        return Err(Refusal::Kind("CREATE CONSTRAINT TRIGGER ... INITIALLY DEFERRED".into()));
                    }
                    self.relation((*s).relation)
                }
                T_CreatePolicyStmt => self.relation((*(node as *mut pg_sys::CreatePolicyStmt)).table),
                T_AlterPolicyStmt => self.relation((*(node as *mut pg_sys::AlterPolicyStmt)).table),
                T_RuleStmt => self.relation((*(node as *mut pg_sys::RuleStmt)).relation),
                T_RefreshMatViewStmt => self.relation((*(node as *mut pg_sys::RefreshMatViewStmt)).relation),
                T_ReindexStmt => {
                    let s = node as *mut pg_sys::ReindexStmt;
                    match (*s).kind {
                        pg_sys::ReindexObjectType::REINDEX_OBJECT_TABLE
                        | pg_sys::ReindexObjectType::REINDEX_OBJECT_INDEX => self.relation((*s).relation),
                        _ => Err(self.refuse()),
                    }
                }
                T_CreateEnumStmt => self.creating_named((*(node as *mut pg_sys::CreateEnumStmt)).typeName),
                T_CreateRangeStmt => self.creating_named((*(node as *mut pg_sys::CreateRangeStmt)).typeName),
                T_CreateDomainStmt => self.creating_named((*(node as *mut pg_sys::CreateDomainStmt)).domainname),
                T_AlterEnumStmt => self
                    .object(pg_sys::ObjectType::OBJECT_TYPE, (*(node as *mut pg_sys::AlterEnumStmt)).typeName.cast()),
                T_AlterDomainStmt => self.object(
                    pg_sys::ObjectType::OBJECT_DOMAIN,
                    (*(node as *mut pg_sys::AlterDomainStmt)).typeName.cast(),
                ),
                T_CreateFunctionStmt => {
                    let s = node as *mut pg_sys::CreateFunctionStmt;
                    self.trusted_language(s)?;
                    self.creating_named((*s).funcname)
                }
                T_AlterFunctionStmt => {
                    let s = node as *mut pg_sys::AlterFunctionStmt;
                    self.object((*s).objtype, (*s).func.cast())
                }
                T_DropStmt => {
                    let s = node as *mut pg_sys::DropStmt;
                    if !allowed_object_type((*s).removeType) {
                        return Err(self.refuse());
                    }
                    for object in pointers::<pg_sys::Node>((*s).objects) {
                        self.object((*s).removeType, object)?;
                    }
                    Ok(())
                }
                T_CommentStmt => {
                    let s = node as *mut pg_sys::CommentStmt;
                    if (*s).objtype == pg_sys::ObjectType::OBJECT_SCHEMA {
                        self.schema((*s).object)
                    } else {
                        self.object((*s).objtype, (*s).object)
                    }
                }
                T_RenameStmt => {
                    let s = node as *mut pg_sys::RenameStmt;
                    if (*s).renameType == pg_sys::ObjectType::OBJECT_SCHEMA {
                        // ALTER SCHEMA s RENAME TO: the schema's name is `subname`.
                        return self.schema_name((*s).subname);
                    }
                    if !allowed_object_type((*s).renameType) {
                        return Err(self.refuse());
                    }
                    if !(*s).relation.is_null() {
                        self.relation((*s).relation)
                    } else if (*s).renameType == pg_sys::ObjectType::OBJECT_DOMCONSTRAINT {
                        // ALTER DOMAIN d RENAME CONSTRAINT: the object is the domain's name.
                        self.object(pg_sys::ObjectType::OBJECT_DOMAIN, (*s).object)
                    } else {
                        self.object((*s).renameType, (*s).object)
                    }
                }
                T_AlterObjectSchemaStmt => {
                    let s = node as *mut pg_sys::AlterObjectSchemaStmt;
                    let moved = if !(*s).relation.is_null() && allowed_object_type((*s).objectType) {
                        self.relation((*s).relation)?;
                        self.lookup_relation((*s).relation)
                    } else {
                        self.object((*s).objectType, (*s).object)?;
                        pg_sys::InvalidOid
                    };
                    self.moving_to((*s).newschema, moved)
                }
                T_AlterOwnerStmt => {
                    let s = node as *mut pg_sys::AlterOwnerStmt;
                    if (*s).objectType == pg_sys::ObjectType::OBJECT_SCHEMA {
                        return self.schema((*s).object);
                    }
                    if !(*s).relation.is_null() && allowed_object_type((*s).objectType) {
                        self.relation((*s).relation)
                    } else {
                        self.object((*s).objectType, (*s).object)
                    }
                }
                T_GrantStmt => self.grant(node as *mut pg_sys::GrantStmt),
                T_AlterDefaultPrivilegesStmt => {
                    self.default_privileges(node as *mut pg_sys::AlterDefaultPrivilegesStmt)
                }
                T_SelectStmt => self.setval(node as *mut pg_sys::SelectStmt),
                T_CreateStatsStmt => {
                    let s = node as *mut pg_sys::CreateStatsStmt;
                    for relation in pointers::<pg_sys::Node>((*s).relations) {
                        if (*relation).type_ != pg_sys::NodeTag::T_RangeVar {
                            return Err(self.refuse());
                        }
                        self.relation(relation as *mut pg_sys::RangeVar)?;
                    }
                    if (*s).defnames.is_null() {
                        Ok(())
                    } else {
                        self.creating_named((*s).defnames)
                    }
                }
                T_AlterStatsStmt => self.object(
                    pg_sys::ObjectType::OBJECT_STATISTIC_EXT,
                    (*(node as *mut pg_sys::AlterStatsStmt)).defnames.cast(),
                ),
                _ => Err(self.refuse()),
            }
        }
    }

    /// `CREATE FUNCTION`/`PROCEDURE` must name a trusted language (SQL when none is named).
    unsafe fn trusted_language(&self, s: *mut pg_sys::CreateFunctionStmt) -> Result<(), Refusal> {
        let mut language = "sql".to_string();
        // SAFETY: the options are DefElems; `language`'s argument is a String node.
        unsafe {
            for option in pointers::<pg_sys::Node>((*s).options) {
                let def = option as *mut pg_sys::DefElem;
                if (*def).defname.is_null() || CStr::from_ptr((*def).defname).to_bytes() != b"language" {
                    continue;
                }
                let arg = (*def).arg;
                if !arg.is_null() && (*arg).type_ == pg_sys::NodeTag::T_String {
                    let sval = (*(arg as *mut pg_sys::String)).sval;
                    if !sval.is_null() {
                        language = CStr::from_ptr(sval).to_string_lossy().into_owned();
                    }
                }
            }
        }
        let trusted = crate::sql::value(
            "SELECT lanpltrusted::text FROM pg_catalog.pg_language WHERE lanname = $1",
            &[Some(&language)],
        )
        .map_err(Refusal::Lookup)?;
        if trusted.as_deref() == Some("true") {
            Ok(())
        } else {
            Err(Refusal::UntrustedLanguage(language))
        }
    }

    /// A `GRANT`/`REVOKE` on named tables, sequences, functions or types, on replicated schemas,
    /// or on all tables, sequences or functions in replicated schemas.
    unsafe fn grant(&self, s: *mut pg_sys::GrantStmt) -> Result<(), Refusal> {
        use pg_sys::ObjectType::*;
        // SAFETY: the objects of a GRANT on tables and sequences are RangeVars, on functions
        // ObjectWithArgs, on types name lists, on schemas (and all objects in schemas) String
        // nodes.
        unsafe {
            if (*s).targtype == pg_sys::GrantTargetType::ACL_TARGET_ALL_IN_SCHEMA
                || ((*s).targtype == pg_sys::GrantTargetType::ACL_TARGET_OBJECT && (*s).objtype == OBJECT_SCHEMA)
            {
                for schema in pointers::<pg_sys::Node>((*s).objects) {
                    self.schema(schema)?;
                }
                return Ok(());
            }
            if (*s).targtype != pg_sys::GrantTargetType::ACL_TARGET_OBJECT
                || !matches!(
                    (*s).objtype,
                    OBJECT_TABLE
                        | OBJECT_SEQUENCE
                        | OBJECT_FUNCTION
                        | OBJECT_PROCEDURE
                        | OBJECT_ROUTINE
                        | OBJECT_TYPE
                        | OBJECT_DOMAIN
                )
            {
                return Err(self.refuse());
            }
            for object in pointers::<pg_sys::Node>((*s).objects) {
                if (*object).type_ == pg_sys::NodeTag::T_RangeVar {
                    self.relation(object as *mut pg_sys::RangeVar)?;
                } else {
                    self.object((*s).objtype, object)?;
                }
            }
        }
        Ok(())
    }

    /// `ALTER DEFAULT PRIVILEGES IN SCHEMA` of replicated schemas (without `IN SCHEMA` it is not
    /// about replicated objects).
    unsafe fn default_privileges(&self, s: *mut pg_sys::AlterDefaultPrivilegesStmt) -> Result<(), Refusal> {
        let mut schemas = Vec::new();
        // SAFETY: the options are DefElems; "schemas" holds a list of String nodes.
        unsafe {
            for option in pointers::<pg_sys::Node>((*s).options) {
                let def = option as *mut pg_sys::DefElem;
                if !(*def).defname.is_null() && CStr::from_ptr((*def).defname).to_bytes() == b"schemas" {
                    schemas.extend(pointers::<pg_sys::Node>((*def).arg.cast()));
                }
            }
        }
        if schemas.is_empty() {
            return Err(self.refuse());
        }
        for schema in schemas {
            // SAFETY: a String node from the parser.
            unsafe { self.schema(schema)? };
        }
        Ok(())
    }

    /// `SELECT pg_catalog.setval('seq'::regclass, value[, called])`, as the origin logs a
    /// `setval` on a sequence a replicated table draws from: exactly that, with constants, on a
    /// replicated sequence. Any other `SELECT` is refused.
    unsafe fn setval(&self, s: *mut pg_sys::SelectStmt) -> Result<(), Refusal> {
        // SAFETY: a SelectStmt from the parser; every node is read as the type its tag says.
        unsafe {
            let plain = (*s).op == pg_sys::SetOperation::SETOP_NONE
                && (*s).distinctClause.is_null()
                && (*s).intoClause.is_null()
                && (*s).fromClause.is_null()
                && (*s).whereClause.is_null()
                && (*s).groupClause.is_null()
                && (*s).havingClause.is_null()
                && (*s).windowClause.is_null()
                && (*s).valuesLists.is_null()
                && (*s).sortClause.is_null()
                && (*s).limitOffset.is_null()
                && (*s).limitCount.is_null()
                && (*s).lockingClause.is_null()
                && (*s).withClause.is_null();
            let targets = pointers::<pg_sys::Node>((*s).targetList);
            if !plain || targets.len() != 1 || (*targets[0]).type_ != pg_sys::NodeTag::T_ResTarget {
                return Err(self.refuse());
            }
            let call = (*(targets[0] as *mut pg_sys::ResTarget)).val;
            if call.is_null() || (*call).type_ != pg_sys::NodeTag::T_FuncCall {
                return Err(self.refuse());
            }
            let call = call as *mut pg_sys::FuncCall;
            let name: Vec<String> =
                pointers::<pg_sys::Node>((*call).funcname).into_iter().filter_map(|n| string_node(n)).collect();
            let args = pointers::<pg_sys::Node>((*call).args);
            if name != ["pg_catalog", "setval"]
                || !(2..=3).contains(&args.len())
                || !(*call).agg_order.is_null()
                || !(*call).agg_filter.is_null()
                || !(*call).over.is_null()
                || (*call).agg_star
                || (*call).agg_distinct
                || (*call).func_variadic
                || !args.iter().all(|a| constant(*a))
            {
                return Err(Refusal::Kind("SELECT other than pg_catalog.setval of a sequence".into()));
            }
            if !self.targets() {
                return Ok(());
            }
            // The sequence: the string of the first argument ('schema.seq'::regclass).
            let mut first = args[0];
            if (*first).type_ == pg_sys::NodeTag::T_TypeCast {
                first = (*(first as *mut pg_sys::TypeCast)).arg;
            }
            let a = first as *mut pg_sys::A_Const;
            if (*a).isnull || (*a).val.node.type_ != pg_sys::NodeTag::T_String {
                return Err(Refusal::Kind("SELECT other than pg_catalog.setval of a sequence".into()));
            }
            let sequence = string_node(std::ptr::addr_of_mut!((*a).val.sval).cast()).unwrap_or_default();
            let relid = crate::sql::value(
                "SELECT c.oid::pg_catalog.text FROM pg_catalog.pg_class c
                  WHERE c.oid = pg_catalog.to_regclass($1)::pg_catalog.oid AND c.relkind = 'S'",
                &[Some(&sequence)],
            )
            .map_err(Refusal::Lookup)?;
            match relid.and_then(|r| r.parse::<u32>().ok()) {
                Some(oid) => relation_replicated(pg_sys::Oid::from(oid), &sequence),
                None => Err(Refusal::NotReplicated(format!("sequence {sequence}"))),
            }
        }
    }

    /// A statement about schema `name` (a String node): it must be replicated here.
    unsafe fn schema(&self, name: *mut pg_sys::Node) -> Result<(), Refusal> {
        // SAFETY: the grammar gives schema names as String nodes.
        let name = unsafe { string_node(name) };
        let Some(name) = name else { return Err(self.refuse()) };
        let name = std::ffi::CString::new(name).unwrap_or_default();
        // SAFETY: a NUL-terminated name that outlives the call.
        unsafe { self.schema_name(name.as_ptr()) }
    }

    /// A statement about the schema named `name`: it must be replicated here (one that does not
    /// exist is left to the statement).
    unsafe fn schema_name(&self, name: *const std::ffi::c_char) -> Result<(), Refusal> {
        if name.is_null() {
            return Err(self.refuse());
        }
        if !self.targets() {
            return Ok(());
        }
        // SAFETY: a syscache lookup (missing_ok) of a NUL-terminated name.
        let (oid, text) =
            unsafe { (pg_sys::get_namespace_oid(name, true), CStr::from_ptr(name).to_string_lossy().into_owned()) };
        if oid == pg_sys::InvalidOid {
            return Ok(());
        }
        namespace_replicated(oid, &format!("schema {text}"))
    }

    /// Relation `rv` (InvalidOid if it does not exist).
    unsafe fn lookup_relation(&self, rv: *mut pg_sys::RangeVar) -> pg_sys::Oid {
        // SAFETY: looks the name up (missing_ok), no lock.
        unsafe {
            pg_sys::RangeVarGetRelidExtended(
                rv,
                pg_sys::NoLock as pg_sys::LOCKMODE,
                pg_sys::RVROption::RVR_MISSING_OK,
                None,
                std::ptr::null_mut(),
            )
        }
    }

    /// `ALTER ... SET SCHEMA new`: the object goes to a replicated schema, or is a table
    /// replicated by itself (`relid`, `add_table`, outside replicated schemas), which stays
    /// replicated wherever it is.
    unsafe fn moving_to(&self, new: *mut std::ffi::c_char, relid: pg_sys::Oid) -> Result<(), Refusal> {
        if !self.targets() {
            return Ok(());
        }
        if relid != pg_sys::InvalidOid
            && crate::sql::flag(
                "SELECT EXISTS (SELECT 1 FROM trompe.tables t JOIN pg_catalog.pg_class c ON c.oid = t.relid::pg_catalog.oid
                                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                                WHERE c.oid = $1::pg_catalog.oid
                                  AND n.nspname::pg_catalog.text NOT IN (SELECT s.schema_name::pg_catalog.text FROM trompe.schemas s))",
                &[Some(&relid.to_u32().to_string())],
            )
            .map_err(Refusal::Lookup)?
        {
            return Ok(());
        }
        // SAFETY: the new schema's name from the parser.
        unsafe { self.schema_name(new) }
    }

    /// A statement creating relation `rv`: its schema must be replicated here.
    unsafe fn creating_relation(&self, rv: *mut pg_sys::RangeVar) -> Result<(), Refusal> {
        if !self.targets() {
            return Ok(());
        }
        if rv.is_null() {
            return Err(self.refuse());
        }
        // SAFETY: resolves the schema the relation would be created in (explicit, or the
        // first of the search_path), raising if there is none.
        let namespace = unsafe { pg_sys::RangeVarGetCreationNamespace(rv) };
        // SAFETY: rv is a RangeVar from the parser.
        let name = unsafe { range_var_text(rv) };
        namespace_replicated(namespace, &name)
    }

    /// A statement creating the object named by the name list `names`.
    unsafe fn creating_named(&self, names: *mut pg_sys::List) -> Result<(), Refusal> {
        if !self.targets() {
            return Ok(());
        }
        let mut object_name: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: names is a list of String nodes; the lookup raises for a missing schema.
        let (namespace, name) = unsafe {
            let namespace = pg_sys::QualifiedNameGetCreationNamespace(names, &mut object_name);
            let text = pg_sys::NameListToString(names);
            (
                namespace,
                if text.is_null() { String::new() } else { CStr::from_ptr(text).to_string_lossy().into_owned() },
            )
        };
        namespace_replicated(namespace, &name)
    }

    /// A statement about existing relation `rv` (one that does not exist is left to the
    /// statement, which fails or, with `IF EXISTS`, does nothing).
    unsafe fn relation(&self, rv: *mut pg_sys::RangeVar) -> Result<(), Refusal> {
        if !self.targets() {
            return Ok(());
        }
        if rv.is_null() {
            return Err(self.refuse());
        }
        // SAFETY: looks the name up (missing_ok); no lock, the statement takes its own.
        let (relid, name) = unsafe {
            let relid = pg_sys::RangeVarGetRelidExtended(
                rv,
                pg_sys::NoLock as pg_sys::LOCKMODE,
                pg_sys::RVROption::RVR_MISSING_OK,
                None,
                std::ptr::null_mut(),
            );
            (relid, range_var_text(rv))
        };
        if relid == pg_sys::InvalidOid {
            return Ok(());
        }
        relation_replicated(relid, &name)
    }

    /// A statement about existing object `object` of type `objtype` (as the statement names
    /// it). One that does not exist is left to the statement.
    unsafe fn object(&self, objtype: pg_sys::ObjectType::Type, object: *mut pg_sys::Node) -> Result<(), Refusal> {
        if !allowed_object_type(objtype) || object.is_null() {
            return Err(self.refuse());
        }
        if !self.targets() {
            return Ok(());
        }
        // SAFETY: get_object_address takes the object in the form the grammar gives it for
        // DROP and COMMENT; statements that name a type by a bare name list get a TypeName made
        // of it. A relation it opens is closed again (its lock kept to the end of the
        // transaction, as the statement would take it).
        unsafe {
            let mut object = object;
            if matches!(objtype, pg_sys::ObjectType::OBJECT_TYPE | pg_sys::ObjectType::OBJECT_DOMAIN)
                && (*object).type_ == pg_sys::NodeTag::T_List
            {
                object = pg_sys::makeTypeNameFromNameList(object as *mut pg_sys::List).cast();
            }
            let mut rel: pg_sys::Relation = std::ptr::null_mut();
            let address = pg_sys::get_object_address(
                objtype,
                object,
                &mut rel,
                pg_sys::AccessShareLock as pg_sys::LOCKMODE,
                true,
            );
            let on_relation = if rel.is_null() {
                None
            } else {
                let relid = (*rel).rd_id;
                pg_sys::relation_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
                Some(relid)
            };
            if address.objectId == pg_sys::InvalidOid && on_relation.is_none() {
                return Ok(());
            }
            let description = {
                let d = pg_sys::getObjectDescription(&address, true);
                if d.is_null() {
                    "the object".to_string()
                } else {
                    CStr::from_ptr(d).to_string_lossy().into_owned()
                }
            };
            if let Some(relid) = on_relation {
                return relation_replicated(relid, &description);
            }
            if address.classId == pg_sys::RelationRelationId {
                return relation_replicated(address.objectId, &description);
            }
            namespace_replicated(pg_sys::get_object_namespace(&address), &description)
        }
    }
}

/// The text of a String node (None for anything else).
///
/// # Safety
/// `node` must be NULL or a parse node.
unsafe fn string_node(node: *mut pg_sys::Node) -> Option<String> {
    // SAFETY: read as a String only when its tag says so.
    unsafe {
        if node.is_null() || (*node).type_ != pg_sys::NodeTag::T_String {
            return None;
        }
        let sval = (*(node as *mut pg_sys::String)).sval;
        (!sval.is_null()).then(|| CStr::from_ptr(sval).to_string_lossy().into_owned())
    }
}

/// Whether `node` is a constant (`42`, `'text'`, `true`), or one cast to a type by name.
///
/// # Safety
/// `node` must be a parse node.
unsafe fn constant(node: *mut pg_sys::Node) -> bool {
    // SAFETY: read as the type its tag says.
    unsafe {
        match (*node).type_ {
            pg_sys::NodeTag::T_A_Const => true,
            pg_sys::NodeTag::T_TypeCast => {
                let arg = (*(node as *mut pg_sys::TypeCast)).arg;
                !arg.is_null() && (*arg).type_ == pg_sys::NodeTag::T_A_Const
            }
            _ => false,
        }
    }
}

/// `schema.name` (or `name`) as a RangeVar gives it.
///
/// # Safety
/// `rv` must be a RangeVar.
unsafe fn range_var_text(rv: *mut pg_sys::RangeVar) -> String {
    // SAFETY: the names are NUL-terminated strings or NULL.
    unsafe {
        let part = |p: *mut std::ffi::c_char| (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned());
        match (part((*rv).schemaname), part((*rv).relname)) {
            (Some(s), Some(r)) => format!("{s}.{r}"),
            (None, Some(r)) => r,
            _ => "the relation".into(),
        }
    }
}

/// Whether schema `namespace` is replicated here; `what` names the object for the refusal.
fn namespace_replicated(namespace: pg_sys::Oid, what: &str) -> Result<(), Refusal> {
    let replicated = namespace != pg_sys::InvalidOid
        && crate::sql::flag(
            "SELECT EXISTS (SELECT 1 FROM trompe.schemas s JOIN pg_catalog.pg_namespace n
                              ON n.nspname::text = s.schema_name::text WHERE n.oid = $1::oid)",
            &[Some(&namespace.to_u32().to_string())],
        )
        .map_err(Refusal::Lookup)?;
    if replicated {
        Ok(())
    } else {
        Err(Refusal::NotReplicated(what.to_string()))
    }
}

/// Whether relation `relid` is replicated here: a replicated table, an index or a sequence of
/// one, a sequence a replicated table's column default draws from, or any relation in a
/// replicated schema.
fn relation_replicated(relid: pg_sys::Oid, what: &str) -> Result<(), Refusal> {
    let replicated = crate::sql::flag(
        "WITH r AS (
             SELECT c.oid, c.relnamespace FROM pg_catalog.pg_class c WHERE c.oid = $1::oid
             UNION ALL
             SELECT c.oid, c.relnamespace FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indrelid
              WHERE i.indexrelid = $1::oid
             UNION ALL
             SELECT c.oid, c.relnamespace FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_class c ON c.oid = d.refobjid
              WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = $1::oid
                AND d.refclassid = 'pg_catalog.pg_class'::regclass AND d.deptype IN ('a', 'i')
             UNION ALL
             SELECT c.oid, c.relnamespace FROM pg_catalog.pg_depend d
               JOIN pg_catalog.pg_attrdef ad ON d.classid = 'pg_catalog.pg_attrdef'::regclass AND d.objid = ad.oid
               JOIN pg_catalog.pg_class c ON c.oid = ad.adrelid
              WHERE d.refclassid = 'pg_catalog.pg_class'::regclass AND d.refobjid = $1::oid)
         SELECT EXISTS (SELECT 1 FROM r
                         WHERE r.oid IN (SELECT relid::oid FROM trompe.tables)
                            OR r.relnamespace IN (SELECT n.oid FROM pg_catalog.pg_namespace n
                                                    JOIN trompe.schemas s ON s.schema_name::text = n.nspname::text))",
        &[Some(&relid.to_u32().to_string())],
    )
    .map_err(Refusal::Lookup)?;
    if replicated {
        Ok(())
    } else {
        Err(Refusal::NotReplicated(what.to_string()))
    }
}
