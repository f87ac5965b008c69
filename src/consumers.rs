//! The nodes that pull from this node (its consumers), and which login may act for which.
//!
//! A consumer's registration in `trompe.consumers` is bound to the login role(s) that node pulls
//! with (`logins`): recorded when the node registers itself, or set by an administrator with
//! `trompe.set_consumer_logins`. Only those logins may pull as that node, confirm its positions,
//! register, resume or unregister it, or read its position; any other login, even a member of
//! `trompe_puller`, gets `permission denied` naming the node (SQLSTATE 42501) and changes
//! nothing. Superusers and members of `trompe_admin` may act for every node.
//!
//! Two kinds of registration have no login yet. Those made before 0.5.0 are bound to the first
//! login that pulls or registers as that node. Those a node makes for a node that joins the
//! cluster through it (`register_consumer_from`) carry the SHA-256 of the joining node's secret
//! (`trompe.node.claim_secret`, which nobody else sees): the joining node presents the secret
//! (`claim_consumer`) when it adds this node as a peer, which binds the registration to its
//! login; until then only administrators may act for it.
//!
//! Registrations and the truncation of the log take one advisory lock, so that a node
//! registered at a position (or resuming from one) never misses changes truncated meanwhile;
//! `trompe.log_rotation.truncated_through` records the newest transaction truncated, which tells
//! whether a position a node resumes from is still kept here.

use std::ffi::CStr;

use pgrx::prelude::*;
use trompe_core::snapshot::Snapshot;

use crate::error::{OrRaise, TrompeError};
use crate::run_as::as_extension_owner;
use crate::sql;

/// The advisory lock (`pg_advisory_xact_lock(128034844536946)`, "trompr" in ASCII) a
/// registration holds until it commits; log maintenance truncates only while it can take it.
pub const REGISTRATION_LOCK_KEY: i64 = 0x7472_6f6d_7072;

/// Whether this database's schema binds consumers to logins (0.5.0 or later).
pub fn logins_installed() -> bool {
    // SAFETY: syscache lookups by name, inside a transaction.
    unsafe {
        let nsp = pg_sys::get_namespace_oid(c"trompe".as_ptr(), true);
        if nsp == pg_sys::InvalidOid {
            return false;
        }
        let rel = pg_sys::get_relname_relid(c"consumers".as_ptr(), nsp);
        rel != pg_sys::InvalidOid && pg_sys::get_attnum(rel, c"logins".as_ptr()) != pg_sys::InvalidAttrNumber as i16
    }
}

/// Whether this database's schema can mark consumers lost (`trompe.max_log_size`, 0.5.0 or
/// later).
pub fn lost_installed() -> bool {
    // SAFETY: syscache lookups by name, inside a transaction.
    unsafe {
        let nsp = pg_sys::get_namespace_oid(c"trompe".as_ptr(), true);
        if nsp == pg_sys::InvalidOid {
            return false;
        }
        let rel = pg_sys::get_relname_relid(c"consumers".as_ptr(), nsp);
        rel != pg_sys::InvalidOid && pg_sys::get_attnum(rel, c"lost_at".as_ptr()) != pg_sys::InvalidAttrNumber as i16
    }
}

/// The SQLSTATE a pull of a consumer marked lost fails with (configuration_limit_exceeded).
pub const LOST_SQLSTATE: &str = "53400";

/// The login of this session (`session_user`: what it authenticated as; neither `SET ROLE` nor
/// a SECURITY DEFINER function changes it).
pub fn session_login() -> String {
    // SAFETY: the name of the session's role, which exists while the session runs; copied.
    unsafe {
        let p = pg_sys::GetUserNameFromId(pg_sys::GetSessionUserId(), false);
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

/// Whether the session's login may act for every node: a superuser, or a member of
/// `trompe_admin`.
pub fn privileged() -> bool {
    // SAFETY: role lookups in the catalog caches, inside a transaction.
    unsafe {
        let me = pg_sys::GetSessionUserId();
        if pg_sys::superuser_arg(me) {
            return true;
        }
        let admin = pg_sys::get_role_oid(c"trompe_admin".as_ptr(), true);
        admin != pg_sys::InvalidOid && pg_sys::has_privs_of_role(me, admin)
    }
}

/// What this node records about a consumer, as the session's login sees it.
pub struct Registration {
    /// The position it confirmed last (as stored; see `effective_confirmed`).
    pub confirmed: String,
    /// The session's login is one of its logins (always, before 0.5.0).
    pub mine: bool,
    /// No login is recorded for it.
    pub unbound: bool,
    /// It waits to be claimed with its node's secret.
    pub claim_pending: bool,
    /// This transaction bound it to the session's login (and holds its row lock).
    pub bound_now: bool,
    /// Why it was marked lost (`trompe.max_log_size`), if it was.
    pub lost: Option<String>,
}

/// How a login acts for a consumer.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// Pulling, confirming or registering: binds a registration without login to this one.
    Bind,
    /// Reading its position or unregistering it: binds nothing.
    Use,
}

/// The registration of consumer `node`, if any (read as the extension's owner).
pub fn read(node: &str) -> Result<Option<Registration>, TrompeError> {
    let login = session_login();
    let row = as_extension_owner(|| {
        if logins_installed() {
            let lost = if lost_installed() {
                "CASE WHEN lost_at IS NOT NULL THEN coalesce(lost_reason, 'lost') END"
            } else {
                "NULL"
            };
            sql::row(
                &format!(
                    "SELECT confirmed, coalesce($2 = ANY(logins), false), logins IS NULL, claim IS NOT NULL, {lost}
                       FROM trompe.consumers WHERE node_id = $1::uuid"
                ),
                &[Some(node), Some(&login)],
            )
        } else {
            sql::row(
                "SELECT confirmed, true, false, false, NULL FROM trompe.consumers WHERE node_id = $1::uuid",
                &[Some(node)],
            )
        }
    })
    .map_err(TrompeError::Internal)?;
    Ok(row.map(|r| Registration {
        confirmed: r[0].clone().unwrap_or_default(),
        mine: r[1].as_deref() == Some("t"),
        unbound: r[2].as_deref() == Some("t"),
        claim_pending: r[3].as_deref() == Some("t"),
        bound_now: false,
        lost: r[4].clone(),
    }))
}

/// Checks that the session's login may act for consumer `node`, registered as `reg`; with
/// `Act::Bind`, a registration without login (nor claim) becomes this login's (then true).
pub fn authorize(node: &str, reg: &Registration, act: Act) -> Result<bool, TrompeError> {
    if reg.mine {
        return Ok(false);
    }
    if reg.unbound && !reg.claim_pending {
        if act == Act::Use {
            return Ok(false);
        }
        let login = session_login();
        let bound = as_extension_owner(|| {
            sql::execute(
                "UPDATE trompe.consumers SET logins = ARRAY[$2] WHERE node_id = $1::uuid AND logins IS NULL AND claim IS NULL",
                &[Some(node), Some(&login)],
            )
        })
        .map_err(TrompeError::Internal)?;
        if bound == 1 {
            return Ok(true);
        }
        // Another login bound it meanwhile: judge again with what it recorded.
        if let Some(now) = read(node)? {
            if now.mine {
                return Ok(false);
            }
        }
    }
    if privileged() {
        return Ok(false);
    }
    Err(TrompeError::NotNodesLogin { login: session_login(), node: node.to_string() })
}

/// The registration of consumer `node` if the session's login may act for it (`act`), `None`
/// if it is not registered.
pub fn authorized(node: &str, act: Act) -> Result<Option<Registration>, TrompeError> {
    let Some(mut reg) = read(node)? else { return Ok(None) };
    reg.bound_now = authorize(node, &reg, act)?;
    Ok(Some(reg))
}

/// Checks that the session's login is one a registered node pulls with (or privileged), for
/// the functions a peer calls that concern no node in particular (`pending_changes`, reading
/// replicated rows for `compare` and joins, copying large objects).
pub fn require_peer_login() -> Result<(), TrompeError> {
    if !logins_installed() || privileged() {
        return Ok(());
    }
    let login = session_login();
    let known = as_extension_owner(|| {
        sql::flag("SELECT EXISTS (SELECT 1 FROM trompe.consumers WHERE $1 = ANY(logins))", &[Some(&login)])
    })
    .map_err(TrompeError::Internal)?;
    if known {
        Ok(())
    } else {
        Err(TrompeError::NotAPeerLogin(login))
    }
}

/// Raises `permission denied` (42501) unless the session's login is one a registered node
/// pulls with, or privileged: called first by the functions peers read replicated data with.
#[pg_extern(volatile, parallel_unsafe)]
fn _require_peer_login() {
    require_peer_login().or_raise();
}

/// Takes the registration lock until the end of the transaction.
pub fn lock_registrations() -> Result<(), String> {
    sql::execute("SELECT pg_advisory_xact_lock($1::bigint)", &[Some(&REGISTRATION_LOCK_KEY.to_string())]).map(drop)
}

/// Takes the registration lock until the end of the transaction if it is free.
pub fn try_lock_registrations() -> Result<bool, String> {
    sql::flag("SELECT pg_try_advisory_xact_lock($1::bigint)", &[Some(&REGISTRATION_LOCK_KEY.to_string())])
}

/// The position `consumer` confirmed last: from shared memory when newer than the table.
pub fn effective_confirmed(consumer: &[u8; 16], stored: &str) -> String {
    // SAFETY: MyDatabaseId is a backend-local global.
    let dboid = unsafe { pg_sys::MyDatabaseId };
    let Some(live) = crate::shmem::shared().and_then(|s| s.confirmed(dboid, consumer)) else {
        return stored.to_string();
    };
    match (live.parse::<Snapshot>(), stored.parse::<Snapshot>()) {
        (Ok(l), Ok(t)) if l.covers(&t) => live,
        _ => stored.to_string(),
    }
}

/// Forgets what consumer `consumer` confirmed through shared memory (it was removed or
/// registered anew).
pub fn forget_live_confirmation(consumer: &pgrx::Uuid) {
    // SAFETY: MyDatabaseId is a backend-local global.
    let dboid = unsafe { pg_sys::MyDatabaseId };
    if let Some(s) = crate::shmem::shared() {
        s.forget_consumer(dboid, consumer.as_bytes());
    }
}

/// Whether this node's log still holds every change a node at position `position` has not
/// applied: nothing it had not seen was truncated (every truncated transaction is older than
/// the position's xmin), or it is still registered at a position the given one covers.
/// Called with the registration lock held.
fn log_keeps(position: &Snapshot, reg: Option<&Registration>, node: &[u8; 16]) -> Result<bool, String> {
    if let Some(reg) = reg {
        let confirmed = effective_confirmed(node, &reg.confirmed);
        if confirmed.parse::<Snapshot>().is_ok_and(|c| position.covers(&c)) {
            return Ok(true);
        }
    }
    let through = sql::value("SELECT max(truncated_through)::text FROM trompe.log_rotation", &[])?;
    Ok(match through {
        None => true,
        Some(t) => t.parse::<u64>().map_err(|e| format!("truncated_through {t}: {e}"))? < position.xmin,
    })
}

/// Registers the calling node as a consumer of this node's log again, at `position`, where it
/// stopped pulling (it removed this node as a peer, and adds it again): everything after it is
/// kept for it from now on. Refused (SQLSTATE 55000) if this node no longer keeps its log from
/// there. Returns this node's id and whether commit timestamps are tracked here.
#[pg_extern(volatile, parallel_unsafe)]
fn resume_consumer(
    consumer: pgrx::Uuid,
    consumer_name: &str,
    position: &str,
) -> TableIterator<'static, (name!(node_id, pgrx::Uuid), name!(commit_timestamps, bool))> {
    let node = consumer.to_string();
    let wanted = position.parse::<Snapshot>().map_err(|e| TrompeError::BadRequest(format!("position: {e}"))).or_raise();
    let login = session_login();
    as_extension_owner(|| -> Result<(), TrompeError> {
        // Under the lock, nothing registers this node meanwhile and nothing is truncated.
        lock_registrations().map_err(TrompeError::Internal)?;
        let reg = authorized(&node, Act::Bind)?;
        if let Some(reason) = reg.as_ref().and_then(|r| r.lost.clone()) {
            return Err(TrompeError::ConsumerLost { node: node.clone(), reason });
        }
        let now = crate::sql::snapshot_now().map_err(TrompeError::Internal)?;
        if !now.covers(&wanted) {
            return Err(TrompeError::BadRequest(format!("position {position} is ahead of this node")));
        }
        if !log_keeps(&wanted, reg.as_ref(), consumer.as_bytes()).map_err(TrompeError::Internal)? {
            return Err(TrompeError::LogNotKept(position.to_string()));
        }
        sql::execute(
            "INSERT INTO trompe.consumers (node_id, name, confirmed, logins) VALUES ($1::uuid, $2, $3, ARRAY[$4])
             ON CONFLICT (node_id) DO UPDATE SET name = EXCLUDED.name, confirmed = EXCLUDED.confirmed,
                 registered_at = now(), confirmed_at = now()",
            &[Some(&node), Some(consumer_name), Some(position), Some(&login)],
        )
        .map_err(|e| TrompeError::Internal(format!("registering consumer: {e}")))?;
        Ok(())
    })
    .or_raise();
    forget_live_confirmation(&consumer);
    let tracked = sql::flag("SELECT current_setting('track_commit_timestamp') = 'on'", &[])
        .map_err(TrompeError::Internal)
        .or_raise();
    TableIterator::once((crate::node::local_node_id(), tracked))
}

/// Claims the registration another node made here for consumer `consumer` when it joined the
/// cluster through that node (`register_consumer_from`): `secret` is the joining node's
/// (`trompe.node.claim_secret` there), whose SHA-256 came with the registration. Binds the
/// registration to the calling login and returns the position confirmed for it. A login that
/// may act for the node already (its own, an administrator's) gets the position too.
#[pg_extern(volatile, parallel_unsafe)]
fn claim_consumer(consumer: pgrx::Uuid, secret: &str) -> String {
    let node = consumer.to_string();
    let Some(reg) = read(&node).or_raise() else {
        TrompeError::NotAConsumer(node).raise();
    };
    if reg.claim_pending {
        let login = session_login();
        let claimed = as_extension_owner(|| {
            sql::value(
                "UPDATE trompe.consumers SET logins = ARRAY[$3], claim = NULL
                  WHERE node_id = $1::uuid AND claim = encode(sha256(convert_to($2, 'UTF8')), 'hex')
                 RETURNING confirmed",
                &[Some(&node), Some(secret), Some(&login)],
            )
        })
        .map_err(TrompeError::Internal)
        .or_raise();
        if claimed.is_some() {
            return effective_confirmed(consumer.as_bytes(), &reg.confirmed);
        }
    }
    authorize(&node, &reg, Act::Bind).or_raise();
    effective_confirmed(consumer.as_bytes(), &reg.confirmed)
}

/// Forgets consumer `node` (an administrator's decision: the node was taken out for good):
/// its position no longer holds back log truncation, and it cannot pull from this node until
/// it joins again. Returns whether it was registered.
#[pg_extern(volatile, parallel_unsafe)]
fn drop_consumer(node: pgrx::Uuid) -> bool {
    forget_live_confirmation(&node);
    as_extension_owner(|| {
        sql::execute("DELETE FROM trompe.consumers WHERE node_id = $1::uuid", &[Some(&node.to_string())])
    })
    .map_err(TrompeError::Internal)
    .or_raise()
        > 0
}

/// Sets the login roles consumer `node` may pull with (replacing those recorded; NULL: the
/// next login that pulls as it). For a node that changes its login: list both while it
/// switches. Returns whether the node is registered.
#[pg_extern(volatile, parallel_unsafe)]
fn set_consumer_logins(node: pgrx::Uuid, logins: Option<Vec<Option<String>>>) -> bool {
    let logins: Option<Vec<String>> = logins.map(|l| l.into_iter().flatten().collect());
    for role in logins.iter().flatten() {
        let name = std::ffi::CString::new(role.as_str())
            .map_err(|_| TrompeError::NoSuchRole(role.replace('\0', "")))
            .or_raise();
        // SAFETY: a catalog lookup by name, inside a transaction.
        if unsafe { pg_sys::get_role_oid(name.as_ptr(), true) } == pg_sys::InvalidOid {
            TrompeError::NoSuchRole(role.clone()).raise();
        }
    }
    let array = logins.as_ref().filter(|l| !l.is_empty()).map(|l| {
        let items: Vec<Option<&str>> = l.iter().map(|s| Some(s.as_str())).collect();
        trompe_core::pgarray::format_text_array(&items)
    });
    as_extension_owner(|| {
        sql::execute(
            "UPDATE trompe.consumers SET logins = $2::text[], claim = NULL WHERE node_id = $1::uuid",
            &[Some(&node.to_string()), array.as_deref()],
        )
    })
    .map_err(TrompeError::Internal)
    .or_raise()
        > 0
}
