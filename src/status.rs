//! `trompe.status`: one row per peer, from the stored position and counters and the worker's
//! live state in shared memory.

use std::sync::atomic::Ordering;

use pgrx::prelude::*;
use trompe_core::nodeid::NodeId;

use crate::error::OrRaise;
use crate::shmem::{now_ms, shared, DbState};
use crate::worker::link::ConnState;

/// A peer's stored state.
struct StoredPeer {
    name: String,
    node: String,
    paused: bool,
    done: String,
    cur: Option<String>,
    after: i64,
    txns: i64,
    changes: i64,
}

/// The rows of `trompe.status` (times in ms since the Unix epoch; the view converts them).
// pgrx needs the row type spelled out here (no type alias), hence the complex type.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_unsafe)]
fn _status() -> TableIterator<
    'static,
    (
        name!(name, String),
        name!(node_id, String),
        name!(state, String),
        name!(position, String),
        name!(behind_changes, Option<i64>),
        name!(behind_ms, Option<i64>),
        name!(last_pull_ms, Option<i64>),
        name!(last_error, Option<String>),
        name!(last_error_ms, Option<i64>),
        name!(applied_txns, i64),
        name!(applied_changes, i64),
        name!(peer_log_transactions, Option<i64>),
        name!(peer_log_bytes, Option<i64>),
    ),
> {
    let rows: Vec<StoredPeer> = crate::run_as::as_extension_owner(|| {
        let after = crate::worker::progress::after_sql(crate::worker::progress::origin_holds_after()?);
        crate::sql::rows(
            &format!(
                "SELECT p.name, p.node_id, p.paused, pr.done, pr.cur, {after}, pr.applied_txns, pr.applied_changes
                   FROM trompe.peers p JOIN trompe.progress pr USING (node_id) ORDER BY p.name"
            ),
            &[],
        )
    })
    .map_err(crate::error::TrompeError::Internal)
    .or_raise()
    .into_iter()
    .map(|r| {
        let num = |i: usize| r[i].as_deref().and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
        StoredPeer {
            name: r[0].clone().unwrap_or_default(),
            node: r[1].clone().unwrap_or_default(),
            paused: r[2].as_deref() == Some("t"),
            done: r[3].clone().unwrap_or_default(),
            cur: r[4].clone(),
            after: num(5),
            txns: num(6),
            changes: num(7),
        }
    })
    .collect();
    // SAFETY: MyDatabaseId is a backend-local global.
    let dboid = unsafe { pg_sys::MyDatabaseId };
    let shared = shared();
    let worker_running = shared
        .and_then(|s| s.db_slot(dboid))
        .is_some_and(|d| d.worker_pid.load(Ordering::Acquire) != 0 && d.state() == DbState::Running);
    let enabled = crate::guc::ENABLED.get();
    let now = now_ms();
    let out: Vec<_> = rows
        .into_iter()
        .map(|StoredPeer { name, node, paused, done, cur, after, txns, changes }| {
            let position = match cur {
                Some(c) => format!("{done} (applying {c} after {after})"),
                None => done,
            };
            let slot = node.parse::<NodeId>().ok().and_then(|n| shared.and_then(|s| s.find_peer_slot(dboid, &n.0)));
            let state = if shared.is_none() {
                "not preloaded".to_string()
            } else if paused {
                "paused".to_string()
            } else if !enabled {
                "disabled".to_string()
            } else if !worker_running {
                "no worker".to_string()
            } else {
                ConnState::label(slot.map_or(0, |s| s.conn_state.load(Ordering::Acquire))).to_string()
            };
            let pending = slot.map(|s| s.pending_changes.load(Ordering::Acquire)).filter(|p| *p >= 0);
            // How old the oldest change not applied yet is, or, when everything the last pull
            // returned is applied, how late the last one was applied.
            let behind_ms = slot.and_then(|s| {
                let oldest = s.oldest_pending_ms.load(Ordering::Acquire);
                let delay = s.apply_delay_ms.load(Ordering::Acquire).max(0);
                match pending {
                    Some(0) => Some(delay),
                    Some(_) if oldest > 0 => Some((now - oldest).max(delay)),
                    _ => None,
                }
            });
            let last_pull = slot.map(|s| s.last_pull_ms.load(Ordering::Acquire)).filter(|v| *v > 0);
            let last_error_ms = slot.map(|s| s.last_error_ms.load(Ordering::Acquire)).filter(|v| *v > 0);
            let last_error = slot.and_then(|s| s.error());
            // The table's counters are written when a step starts or ends; the worker counts
            // what it applied since in shared memory.
            let txns = txns + slot.map_or(0, |s| s.applied_txns.load(Ordering::Acquire) as i64);
            let changes = changes + slot.map_or(0, |s| s.applied_changes.load(Ordering::Acquire) as i64);
            let peer_log_txns = slot.map(|s| s.peer_log_txns.load(Ordering::Acquire)).filter(|v| *v >= 0);
            let peer_log_bytes = slot.map(|s| s.peer_log_bytes.load(Ordering::Acquire)).filter(|v| *v >= 0);
            (
                name,
                node,
                state,
                position,
                pending,
                behind_ms,
                last_pull,
                last_error,
                last_error_ms,
                txns,
                changes,
                peer_log_txns,
                peer_log_bytes,
            )
        })
        .collect();
    TableIterator::new(out)
}
