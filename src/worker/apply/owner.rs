//! Row changes are applied as the table's owner, not as the worker's superuser: the functions a
//! write calls (CHECK constraints, domain checks, index expressions, triggers that fire in
//! replica mode, defaults) run with the rights of whoever owns the table, as PostgreSQL's own
//! logical replication applies them. A peer (or a local table owner) that attaches a function to
//! a replicated table gains no more than the owner has.

use pgrx::pg_sys;

/// The first of `relids` if every one of them has the same owner (None otherwise).
pub fn common_owner(relids: impl IntoIterator<Item = pg_sys::Oid>) -> Option<pg_sys::Oid> {
    let mut first = None;
    for relid in relids {
        let owner = owner_of(relid)?;
        match first {
            None => first = Some((relid, owner)),
            Some((_, o)) if o == owner => {}
            Some(_) => return None,
        }
    }
    first.map(|(relid, _)| relid)
}

/// Whether a superuser owns every one of `relids` (a relation that is gone counts as not).
pub fn all_superuser_owned(relids: impl IntoIterator<Item = pg_sys::Oid>) -> bool {
    relids.into_iter().all(|relid| {
        // SAFETY: a syscache lookup of a role.
        owner_of(relid).is_some_and(|owner| unsafe { pg_sys::superuser_arg(owner) })
    })
}

fn owner_of(relid: pg_sys::Oid) -> Option<pg_sys::Oid> {
    // SAFETY: the relation cache entry is read and released; relowner is a plain field.
    unsafe {
        let rel = pg_sys::RelationIdGetRelation(relid);
        if rel.is_null() {
            return None;
        }
        let owner = (*(*rel).rd_rel).relowner;
        pg_sys::RelationClose(rel);
        Some(owner)
    }
}

/// Runs `f` (a write to relation `relid`) as the relation's owner when that is no superuser,
/// in a security-restricted operation (no `SET ROLE`, no session settings kept), as
/// PostgreSQL's `SwitchToUntrustedUser` does; as the current user otherwise.
pub fn as_table_owner<R>(relid: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    struct Restore {
        user: pg_sys::Oid,
        context: i32,
        level: i32,
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: puts back the settings the function may have changed and the user id and
            // security context saved below (an error's abort does the same first).
            unsafe {
                pg_sys::AtEOXact_GUC(false, self.level);
                pg_sys::SetUserIdAndSecContext(self.user, self.context);
            }
        }
    }
    let Some(owner) = owner_of(relid) else { return f() };
    // SAFETY: a syscache lookup of a role.
    if unsafe { pg_sys::superuser_arg(owner) } {
        return f();
    }
    let mut user = pg_sys::InvalidOid;
    let mut context = 0;
    // SAFETY: saves and switches the current user id, as a SECURITY DEFINER function (and
    // PostgreSQL's apply worker) does; a GUC nest level undoes settings changed meanwhile.
    let level = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            owner,
            context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32 | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
        pg_sys::NewGUCNestLevel()
    };
    let _restore = Restore { user, context, level };
    f()
}
