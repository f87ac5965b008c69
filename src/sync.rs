//! `trompe.wait_sync`: waits until this node has applied every change each (unpaused) peer
//! had committed when it was called.

use std::time::{Duration, Instant};

use pgrx::prelude::*;

use crate::error::{OrRaise, TrompeError};
use crate::libpq::{connect_wait, query_wait, Conn};
use crate::peer_calls::peer_conninfo;
use crate::run_as::as_extension_owner;
use crate::sql;

struct Target {
    node: String,
    conninfo: String,
    conn: Option<Conn>,
    upto: Option<String>,
    synced: bool,
}

fn read_position(node: &str) -> Option<(String, Option<String>, i64)> {
    let row = as_extension_owner(|| {
        let after = crate::worker::progress::after_sql(crate::worker::progress::origin_holds_after()?);
        sql::row(
            &format!("SELECT pr.done, pr.cur, {after} FROM trompe.progress pr WHERE pr.node_id = $1::uuid"),
            &[Some(node)],
        )
    })
    .ok()
    .flatten()?;
    let after = row[2].as_deref().and_then(|a| a.parse().ok()).unwrap_or(0);
    Some((row[0].clone()?, row[1].clone(), after))
}

/// Implementation of `trompe.wait_sync`; `timeout_s` in seconds.
#[pg_extern(volatile, parallel_unsafe)]
fn _wait_sync(timeout_s: f64) -> bool {
    if crate::shmem::shared().is_none() {
        TrompeError::NotPreloaded.raise();
    }
    // A copy of the node's database pulls nothing: it would wait for nothing.
    crate::node::refuse_in_copy().or_raise();
    let deadline = Instant::now() + Duration::from_secs_f64(timeout_s.clamp(0.0, 86_400.0 * 365.0));
    let peers: Vec<(String, String)> =
        as_extension_owner(|| sql::rows("SELECT node_id, conninfo FROM trompe.peers WHERE NOT paused", &[]))
            .map_err(TrompeError::Internal)
            .or_raise()
            .into_iter()
            .filter_map(|r| Some((r[0].clone()?, r[1].clone()?)))
            .collect();
    let mut targets: Vec<Target> = peers
        .into_iter()
        .map(|(node, conninfo)| Target { node, conninfo, conn: None, upto: None, synced: false })
        .collect();
    // SAFETY: MyDatabaseId is a backend-local global.
    let dboid = unsafe { pg_sys::MyDatabaseId };
    let mut pause = Duration::from_millis(2);
    let mut last_wake: Option<Instant> = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        for t in targets.iter_mut().filter(|t| !t.synced) {
            if let Err(e) = check(t, left.min(Duration::from_secs(10))) {
                pgrx::debug1!("trompe.wait_sync: {e}");
                t.conn = None;
            }
        }
        if targets.iter().all(|t| t.synced) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        // Skip the worker's retry delays (a peer just came back), but not so often that a
        // change failing to apply is retried (and logged) many times a second.
        if last_wake.is_none_or(|w| w.elapsed() >= WAKE_EVERY) {
            crate::worker::control::wake_worker(dboid);
            last_wake = Some(Instant::now());
        }
        let wait = pause.min(deadline.saturating_duration_since(Instant::now()));
        crate::libpq::wait_socket(
            pgrx::pg_sys::PGINVALID_SOCKET,
            crate::libpq::Want::Done,
            wait.max(Duration::from_millis(1)),
        );
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// How often `wait_sync` wakes the worker.
const WAKE_EVERY: Duration = Duration::from_secs(1);

/// One check of one peer: fixes the target snapshot on first contact, then asks the peer how
/// many of the changes up to it this node's position does not cover.
fn check(t: &mut Target, timeout: Duration) -> Result<(), String> {
    if t.conn.is_none() {
        let info = peer_conninfo(&t.conninfo).map_err(|e| e.to_string())?;
        t.conn = Some(connect_wait(&info, timeout).map_err(|e| e.message)?);
    }
    let conn = t.conn.as_mut().ok_or("no connection")?;
    if t.upto.is_none() {
        let r = query_wait(conn, "SELECT trompe.current_snapshot()", &[], timeout).map_err(|e| e.message)?;
        t.upto = r.get(0, 0).map(str::to_string);
    }
    let upto = t.upto.clone().ok_or("the peer returned no snapshot")?;
    let (done, cur, after) = read_position(&t.node).ok_or("the peer has no position here")?;
    let after = after.to_string();
    let r = query_wait(
        conn,
        "SELECT trompe.pending_changes($1, $2, $3::bigint, $4)",
        &[Some(&done), cur.as_deref(), Some(&after), Some(&upto)],
        timeout,
    )
    .map_err(|e| e.message)?;
    if r.get(0, 0) == Some("0") {
        t.synced = true;
        t.conn = None;
    }
    Ok(())
}
