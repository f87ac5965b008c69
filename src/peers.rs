//! Peers: `trompe.add_peer`, `alter_peer`, `remove_peer`, `pause_peer`, `resume_peer`. `add_peer`
//! and `alter_peer` check everything they can at call time and change nothing when a check
//! fails.
//!
//! Removing a peer touches only what this node pulls from it: the peer is asked to stop
//! keeping its log for this node, but this node's position there (and the replication origin
//! recording it) is kept, so that adding the peer again resumes where it stopped if the peer
//! still has its log from there, and is refused otherwise. What other nodes pull from this
//! node (`trompe.consumers`) is theirs: only they, an administrator (`trompe.drop_consumer`)
//! or log size limits remove them.

use pgrx::prelude::*;
use trompe_core::conninfo::ConnInfo;
use trompe_core::snapshot::Snapshot;

use crate::error::{OrRaise, TrompeError};
use crate::libpq::{query_wait, Conn};
use crate::node::{local_node_id, to_uuid};
use crate::peer_calls::{connect_peer, peer_conninfo, peer_failed, peer_has_function, peer_query, scrub, CALL_TIMEOUT};
use crate::run_as::as_extension_owner;
use crate::session::InternalOperation;
use crate::sql;
use crate::worker::control::{launch_worker_on_commit, wake_worker_on_commit};

/// Makes this node pull from a peer. Checks at call time that the connection string parses,
/// the peer answers and accepts the login, has trompe, is not this node and is not a peer
/// already; on any failure nothing changes. Returns the peer's node id.
///
/// With `sync => true` (on a new, empty node only), this node joins the peer's cluster: its
/// worker copies the peer's schema and replicated data in one snapshot, then pulls the peer
/// from that snapshot (progress in `trompe.status`). Peers added afterwards start where the
/// copy left them.
#[pg_extern(name = "add_peer", volatile, parallel_unsafe)]
fn add_peer_with_sync(name: &str, conninfo: &str, sync: default!(bool, false)) -> pgrx::Uuid {
    hide_statement("add_peer");
    add_peer_impl(name, conninfo, sync).or_raise()
}

/// `add_peer(name, conninfo)` as versions before 0.3.0 declared it: their SQL definition
/// calls this symbol until `ALTER EXTENSION trompe UPDATE` replaces it (a symbol keeps its
/// arguments across versions, so the three-argument function has a symbol of its own).
#[pg_extern(sql = false)]
fn add_peer(name: &str, conninfo: &str) -> pgrx::Uuid {
    hide_statement("add_peer");
    add_peer_impl(name, conninfo, false).or_raise()
}

/// Refuses a join unless this node is new and empty: no peers, nothing replicated, no
/// relations outside trompe's schema.
fn check_empty_node() -> Result<(), TrompeError> {
    let found = as_extension_owner(|| {
        sql::value(
            "SELECT CASE WHEN EXISTS (SELECT 1 FROM trompe.peers) THEN 'it has peers already'
                         WHEN EXISTS (SELECT 1 FROM trompe.tables) OR EXISTS (SELECT 1 FROM trompe.schemas)
                              THEN 'it replicates tables already'
                         ELSE (SELECT format('it has %s %s', CASE c.relkind WHEN 'S' THEN 'sequence' WHEN 'v' THEN 'view'
                                                                           ELSE 'relation' END, c.oid::regclass)
                                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'trompe')
                                  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
                                  AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
                                ORDER BY c.oid LIMIT 1) END",
            &[],
        )
    })
    .map_err(TrompeError::Internal)?;
    match found {
        Some(reason) => Err(TrompeError::SyncNeedsEmptyNode(reason)),
        None => Ok(()),
    }
}

/// The peer this node is still copying from, if a copy is not done (a schema older than 0.3.0
/// has none).
fn unfinished_sync(joining_installed: bool) -> Result<Option<String>, TrompeError> {
    if !joining_installed {
        return Ok(None);
    }
    as_extension_owner(|| {
        sql::value(
            "SELECT p.name FROM trompe.syncs s JOIN trompe.peers p USING (node_id) WHERE s.state <> 'done' LIMIT 1",
            &[],
        )
    })
    .map_err(TrompeError::Internal)
}

/// The statement calling `add_peer` carries a connection string that may hold a password:
/// `pg_stat_activity` shows a placeholder instead, and an error of this transaction does not
/// write the statement to the server log (`log_min_error_statement`, reset when the
/// transaction ends).
fn hide_statement(function: &str) {
    let shown =
        std::ffi::CString::new(format!("SELECT trompe.{function}(...) -- the connection string is hidden by trompe"))
            .unwrap_or_default();
    // SAFETY: replaces this backend's activity text (pgstat copies it); called from the
    // backend's main thread while running a query.
    unsafe {
        pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, shown.as_ptr());
    }
    let hidden =
        as_extension_owner(|| sql::execute("SELECT set_config('log_min_error_statement', 'panic', true)", &[]));
    if let Err(e) = hidden {
        pgrx::warning!("trompe: cannot keep the {function} statement out of the server log: {e}");
    }
}

/// A password in the connection string reaches the server log when statements are logged
/// before they run (`log_statement = 'all'`) or with their duration: trompe cannot take it back
/// from there, so it says so.
fn warn_if_statement_logged(info: &ConnInfo) {
    if info.get("password").is_none() {
        return;
    }
    let logged = sql::flag(
        "SELECT current_setting('log_statement') = 'all' OR current_setting('log_min_duration_statement')::int >= 0",
        &[],
    )
    .unwrap_or(false);
    if logged {
        pgrx::warning!(
            "the connection string holds a password, and statement logging (log_statement = 'all' or \
             log_min_duration_statement) may have written this call to the server log; put the password \
             in a password file (passfile=...) or a service file instead"
        );
    }
}

fn add_peer_impl(name: &str, conninfo: &str, sync: bool) -> Result<pgrx::Uuid, TrompeError> {
    if crate::shmem::shared().is_none() {
        return Err(TrompeError::NotPreloaded);
    }
    if name.is_empty() || name.chars().count() > 63 || name.contains('\0') {
        return Err(TrompeError::BadPeerName(name.chars().take(80).collect()));
    }
    crate::node::refuse_in_copy()?;
    let info = peer_conninfo(conninfo)?;
    warn_if_statement_logged(&info);
    let joining_installed = crate::join::schema_installed().map_err(TrompeError::Internal)?;
    if let Some(source) = unfinished_sync(joining_installed)? {
        return Err(TrompeError::SyncInProgress(source));
    }
    if sync {
        if !joining_installed {
            return Err(TrompeError::SettingRequired(
                "add_peer with sync => true needs trompe 0.3.0 here: run ALTER EXTENSION trompe UPDATE".into(),
            ));
        }
        check_empty_node()?;
    }
    if !sql::flag("SELECT current_setting('track_commit_timestamp') = 'on'", &[]).map_err(TrompeError::Internal)? {
        return Err(TrompeError::SettingRequired(
            "track_commit_timestamp must be on (set it in postgresql.conf and restart)".into(),
        ));
    }
    let exists =
        as_extension_owner(|| sql::flag("SELECT EXISTS (SELECT 1 FROM trompe.peers WHERE name = $1)", &[Some(name)]))
            .map_err(TrompeError::Internal)?;
    if exists {
        return Err(TrompeError::PeerExists(name.to_string()));
    }
    let mut conn = connect_peer(name, &info)?;
    let ext = peer_query(&mut conn, name, &info, "SELECT extversion FROM pg_extension WHERE extname = 'trompe'", &[])?;
    if ext.rows() == 0 {
        return Err(TrompeError::PeerWithoutTrompe(name.to_string()));
    }
    let ids = peer_query(&mut conn, name, &info, "SELECT trompe.node_id()::text", &[])?;
    let peer_id = ids.get(0, 0).unwrap_or_default().to_string();
    let me = local_node_id().to_string();
    if peer_id == me {
        return Err(TrompeError::PeerIsSelf(name.to_string()));
    }
    let existing =
        as_extension_owner(|| sql::value("SELECT name FROM trompe.peers WHERE node_id = $1::uuid", &[Some(&peer_id)]))
            .map_err(TrompeError::Internal)?;
    if let Some(existing) = existing {
        return Err(TrompeError::NodeAlreadyPeer { node: peer_id, existing });
    }
    let consumer_name =
        sql::value("SELECT current_database()", &[]).map_err(TrompeError::Internal)?.unwrap_or_default();
    if sync {
        // A node that joins starts from the copy: positions it kept from peers it pulled from
        // before (it was emptied since) mean nothing any more.
        as_extension_owner(|| {
            sql::execute(
                "DELETE FROM trompe.progress p WHERE NOT EXISTS (SELECT 1 FROM trompe.peers x WHERE x.node_id = p.node_id)",
                &[],
            )
        })
        .map_err(TrompeError::Internal)?;
    }
    // Where this node stopped pulling the peer, if it pulled it before (removed, now added
    // again): it resumes from there.
    let kept = as_extension_owner(|| {
        sql::value("SELECT done FROM trompe.progress WHERE node_id = $1::uuid", &[Some(&peer_id)])
    })
    .map_err(TrompeError::Internal)?;
    if let Some(done) = &kept {
        resume_at_peer(&mut conn, name, &info, &me, &consumer_name, done)?;
        let _internal = InternalOperation::begin();
        as_extension_owner(|| {
            sql::execute(
                "INSERT INTO trompe.peers (name, node_id, conninfo) VALUES ($1, $2::uuid, $3)",
                &[Some(name), Some(&peer_id), Some(conninfo)],
            )?;
            crate::origins::create(&crate::origins::name(&peer_id))
        })
        .map_err(|e| TrompeError::Internal(format!("recording peer {name}: {e}")))?;
        launch_worker_on_commit();
        return to_uuid(&peer_id);
    }
    // A node that joined by copying another starts where that copy left this peer's changes;
    // the copy's source registered it here at a position no later than that.
    let start = if joining_installed {
        as_extension_owner(|| {
            sql::row(
                "SELECT done, cur, after::text FROM trompe.start_positions WHERE node_id = $1::uuid",
                &[Some(&peer_id)],
            )
        })
        .map_err(TrompeError::Internal)?
    } else {
        None
    };
    let (done, cur, after) = match start {
        Some(row) => {
            claim_at_peer(&mut conn, name, &info, &me)?;
            (row[0].clone().unwrap_or_default(), row[1].clone(), row[2].clone().unwrap_or_else(|| "0".into()))
        }
        None => {
            let reg = peer_query(
                &mut conn,
                name,
                &info,
                "SELECT node_id::text, snapshot, commit_timestamps FROM trompe.register_consumer($1::uuid, $2)",
                &[Some(&me), Some(&consumer_name)],
            )?;
            if reg.get(0, 2) != Some("t") {
                return Err(TrompeError::SettingRequired(format!(
                    "track_commit_timestamp must be on at peer \"{name}\" (set it in its postgresql.conf and restart it)"
                )));
            }
            (reg.get(0, 1).unwrap_or_default().to_string(), None, "0".to_string())
        }
    };
    let _internal = InternalOperation::begin();
    as_extension_owner(|| {
        sql::execute(
            "INSERT INTO trompe.peers (name, node_id, conninfo) VALUES ($1, $2::uuid, $3)",
            &[Some(name), Some(&peer_id), Some(conninfo)],
        )?;
        sql::execute(
            "INSERT INTO trompe.progress (node_id, done, cur, after) VALUES ($1::uuid, $2, $3, $4::bigint)",
            &[Some(&peer_id), Some(&done), cur.as_deref(), Some(&after)],
        )?;
        if joining_installed {
            // A replication origin left from an earlier time this peer was added may still
            // record a position: the new one starts above it (see worker::progress).
            sql::execute(
                &format!(
                    "UPDATE trompe.progress SET after_offset = coalesce((
                            SELECT (pg_replication_origin_progress(o.roname, false) - '0/0'::pg_lsn)::bigint
                              FROM pg_replication_origin o WHERE o.roname = {}), 0)
                      WHERE node_id = $1::uuid",
                    crate::origins::name_sql("$1")
                ),
                &[Some(&peer_id)],
            )?;
            sql::execute("DELETE FROM trompe.start_positions WHERE node_id = $1::uuid", &[Some(&peer_id)])?;
        }
        if sync {
            sql::execute("INSERT INTO trompe.syncs (node_id) VALUES ($1::uuid)", &[Some(&peer_id)])?;
        }
        // A peer removed and added again may still have its origin (dropped by the worker).
        crate::origins::create(&crate::origins::name(&peer_id))
    })
    .map_err(|e| TrompeError::Internal(format!("recording peer {name}: {e}")))?;
    launch_worker_on_commit();
    to_uuid(&peer_id)
}

/// Stops pulling from a peer and forgets it; the peer is asked to stop keeping its log for
/// this node. This node keeps its position there (and the replication origin that records it),
/// so that adding the peer again resumes where it stopped, as long as the peer still has its
/// log from there. Nothing changes for the nodes that pull from this node, the removed peer
/// included. Returns the peer's node id.
#[pg_extern(volatile, parallel_unsafe)]
fn remove_peer(name: &str) -> pgrx::Uuid {
    crate::node::refuse_in_copy().or_raise();
    let found =
        as_extension_owner(|| sql::row("SELECT node_id, conninfo FROM trompe.peers WHERE name = $1", &[Some(name)]))
            .map_err(TrompeError::Internal)
            .or_raise();
    let Some([Some(peer_id), Some(conninfo)]) = found.map(|r| [r[0].clone(), r[1].clone()]) else {
        TrompeError::NoSuchPeer(name.to_string()).raise();
    };
    {
        let _internal = InternalOperation::begin();
        as_extension_owner(|| {
            // A copy from this peer that did not finish leaves nothing behind: the node is
            // empty again and can join anew (its position there means nothing).
            let unfinished = crate::join::schema_installed()?
                && sql::flag(
                    "SELECT EXISTS (SELECT 1 FROM trompe.syncs WHERE node_id = $1::uuid AND state <> 'done')",
                    &[Some(&peer_id)],
                )?;
            if unfinished {
                crate::join::copy::undo_attempt(&peer_id)?;
            }
            sql::execute("DELETE FROM trompe.peers WHERE name = $1", &[Some(name)])?;
            if unfinished {
                sql::execute("DELETE FROM trompe.progress WHERE node_id = $1::uuid", &[Some(&peer_id)])?;
            }
            Ok::<(), String>(())
        })
        .map_err(|e| TrompeError::Internal(format!("removing peer {name}: {e}")))
        .or_raise();
    }
    let peer_uuid = to_uuid(&peer_id).or_raise();
    wake_worker_on_commit();
    let me = local_node_id().to_string();
    let told = peer_conninfo(&conninfo).and_then(|info| {
        let mut conn = connect_peer(name, &info)?;
        peer_query(&mut conn, name, &info, "SELECT trompe.unregister_consumer($1::uuid)", &[Some(&me)])
    });
    if let Err(e) = told {
        pgrx::warning!(
            "peer \"{name}\" was removed here, but could not be told to stop keeping its log for this node: {e}; \
             an administrator there can run SELECT trompe.drop_consumer('{me}')"
        );
    }
    peer_uuid
}

/// Asks the peer to keep its log for this node again from `done`, where this node stopped
/// pulling it; refused if the peer no longer has it (a peer older than 0.5.0: if it stopped
/// keeping it for this node).
fn resume_at_peer(
    conn: &mut Conn,
    name: &str,
    info: &ConnInfo,
    me: &str,
    consumer_name: &str,
    done: &str,
) -> Result<(), TrompeError> {
    if !peer_has_function(conn, name, info, "trompe.resume_consumer(uuid,text,text)")? {
        let kept = peer_query(conn, name, info, "SELECT trompe.consumer_confirmed($1::uuid)", &[Some(me)])?;
        let confirmed = kept.get(0, 0).and_then(|c| c.parse::<Snapshot>().ok());
        let done = done.parse::<Snapshot>().ok();
        return match (done, confirmed) {
            (Some(done), Some(confirmed)) if done.covers(&confirmed) => Ok(()),
            _ => Err(TrompeError::ResumeImpossible(name.to_string())),
        };
    }
    let resumed = query_wait(
        conn,
        "SELECT commit_timestamps FROM trompe.resume_consumer($1::uuid, $2, $3)",
        &[Some(me), Some(consumer_name), Some(done)],
        CALL_TIMEOUT,
    )
    .map_err(|e| match e.sqlstate.as_deref() {
        Some("55000") => TrompeError::ResumeImpossible(name.to_string()),
        _ => peer_failed(name, info, &e),
    })?;
    if resumed.get(0, 0) != Some("t") {
        return Err(TrompeError::SettingRequired(format!(
            "track_commit_timestamp must be on at peer \"{name}\" (set it in its postgresql.conf and restart it)"
        )));
    }
    Ok(())
}

/// For a node that joined by copying another: makes the registration the copy's source made
/// for this node at the peer this node's own (presenting this node's secret), or checks that
/// the peer still keeps its log for this node (a peer older than 0.5.0).
fn claim_at_peer(conn: &mut Conn, name: &str, info: &ConnInfo, me: &str) -> Result<(), TrompeError> {
    let lost = || TrompeError::StartPositionLost(name.to_string());
    if !peer_has_function(conn, name, info, "trompe.claim_consumer(uuid,text)")? {
        let kept = peer_query(conn, name, info, "SELECT trompe.consumer_confirmed($1::uuid)", &[Some(me)])?;
        return if kept.get(0, 0).is_some() { Ok(()) } else { Err(lost()) };
    }
    let secret = as_extension_owner(|| sql::value("SELECT claim_secret FROM trompe.node", &[]))
        .map_err(TrompeError::Internal)?
        .unwrap_or_default();
    query_wait(conn, "SELECT trompe.claim_consumer($1::uuid, $2)", &[Some(me), Some(&secret)], CALL_TIMEOUT).map_err(
        |e| match e.sqlstate.as_deref() {
            Some("55000") => lost(),
            _ => peer_failed(name, info, &e),
        },
    )?;
    Ok(())
}

/// Changes the connection string of a peer in place: its position, its replication origin and
/// this node's registration there stay as they are, and the worker reconnects with the new
/// string. Checks first that it reaches the same node, which accepts its login for this node;
/// on any failure nothing changes. Returns the peer's node id.
#[pg_extern(volatile, parallel_unsafe)]
fn alter_peer(name: &str, conninfo: &str) -> pgrx::Uuid {
    hide_statement("alter_peer");
    alter_peer_impl(name, conninfo).or_raise()
}

fn alter_peer_impl(name: &str, conninfo: &str) -> Result<pgrx::Uuid, TrompeError> {
    let info = peer_conninfo(conninfo)?;
    warn_if_statement_logged(&info);
    let peer_id = as_extension_owner(|| sql::value("SELECT node_id FROM trompe.peers WHERE name = $1", &[Some(name)]))
        .map_err(TrompeError::Internal)?
        .ok_or_else(|| TrompeError::NoSuchPeer(name.to_string()))?;
    let mut conn = connect_peer(name, &info)?;
    let ext = peer_query(&mut conn, name, &info, "SELECT extversion FROM pg_extension WHERE extname = 'trompe'", &[])?;
    if ext.rows() == 0 {
        return Err(TrompeError::PeerWithoutTrompe(name.to_string()));
    }
    let ids = peer_query(&mut conn, name, &info, "SELECT trompe.node_id()::text", &[])?;
    let found = ids.get(0, 0).unwrap_or_default().to_string();
    if found != peer_id {
        return Err(TrompeError::OtherNode { name: name.to_string(), expected: peer_id, found });
    }
    // A login that may not act for this node there is refused (permission denied).
    let me = local_node_id().to_string();
    query_wait(&mut conn, "SELECT trompe.consumer_confirmed($1::uuid)", &[Some(&me)], CALL_TIMEOUT).map_err(
        |e| match e.sqlstate.as_deref() {
            Some("42501") => TrompeError::PeerDeniesNode { name: name.to_string(), message: scrub(&e.message, &info) },
            _ => peer_failed(name, &info, &e),
        },
    )?;
    let _internal = InternalOperation::begin();
    as_extension_owner(|| {
        sql::execute("UPDATE trompe.peers SET conninfo = $2 WHERE name = $1", &[Some(name), Some(conninfo)])
    })
    .map_err(|e| TrompeError::Internal(format!("changing peer {name}: {e}")))?;
    wake_worker_on_commit();
    to_uuid(&peer_id)
}

fn set_paused(name: &str, paused: bool) -> bool {
    let flag = if paused { "true" } else { "false" };
    let changed = as_extension_owner(|| {
        sql::execute("UPDATE trompe.peers SET paused = $2::boolean WHERE name = $1", &[Some(name), Some(flag)])
    })
    .map_err(TrompeError::Internal)
    .or_raise();
    if changed == 0 {
        TrompeError::NoSuchPeer(name.to_string()).raise();
    }
    wake_worker_on_commit();
    true
}

/// Stops pulling from a peer until `resume_peer`; its position is kept, and the peer keeps
/// its log for this node meanwhile.
#[pg_extern(volatile, parallel_unsafe)]
fn pause_peer(name: &str) -> bool {
    set_paused(name, true)
}

/// Resumes pulling from a paused peer, from where it stopped.
#[pg_extern(volatile, parallel_unsafe)]
fn resume_peer(name: &str) -> bool {
    set_paused(name, false)
}
