//! The per-database worker: pulls every peer and applies its changes, keeps the log pruned,
//! and exits when the extension is dropped. It never blocks: it waits on its latch together
//! with every peer's socket, so a hung peer delays nothing and signals are answered at once.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use pgrx::pg_sys;
use trompe_core::backoff::Backoff;
use trompe_core::nodeid::NodeId;
use trompe_core::position::{in_origin, Position, Step};
use trompe_core::snapshot::Snapshot;

use crate::libpq::Want;
use crate::shmem::{now_ms, shared, DbSlot, DbState};
use crate::sql;
use crate::worker::apply::{register_invalidation, ApplyCache};
use crate::worker::link::{Link, WaitSpec};
use crate::worker::txn::in_transaction;

/// How often the worker re-reads its peers even without being woken.
const RELOAD_EVERY_MS: i64 = 10_000;
/// How often it checks that the extension still exists.
const EXTENSION_CHECK_MS: i64 = 1_000;
/// How often it keeps the versions of rows vacuum may freeze soon (see `crate::row_versions`).
const VERSIONS_EVERY_MS: i64 = 60_000;
/// How often it runs log maintenance.
const MAINTENANCE_EVERY_MS: i64 = 1_000;

/// A peer row as stored.
struct PeerRow {
    name: String,
    node: NodeId,
    conninfo: String,
    paused: bool,
    origin: u32,
    position: Position,
    stored: crate::worker::link::Stored,
    /// When the peer was added: a peer removed and added again starts afresh.
    added_at: String,
}

fn extension_exists() -> bool {
    in_transaction(|| {
        // SAFETY: catalog lookup inside a transaction.
        let oid = unsafe { pg_sys::get_extension_oid(c"trompe".as_ptr(), true) };
        Ok(oid != pg_sys::InvalidOid)
    })
    .unwrap_or(false)
}

/// This node's id, its peers, the replication origins of removed peers whose position is kept
/// (`trompe.progress` rows without a peer: adding the peer again resumes from there), the
/// transactions of peers an admin asked to set aside, and whether this database is the node.
type LoadedPeers = (String, Vec<PeerRow>, Vec<String>, Vec<(NodeId, i64)>, crate::node::Identity);

thread_local! {
    /// Whether the schema named origins per database when the worker loaded its peers first.
    static ORIGINS_PER_DATABASE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

fn load_peers() -> Result<LoadedPeers, String> {
    in_transaction(|| {
        let me = crate::node::read_node_id()?.ok_or("trompe.node is empty")?.to_string();
        // The schema was updated to name origins per database: the origin sessions of the links
        // use the old ones, so the worker starts again (the supervisor restarts it).
        let per_database = crate::origins::per_database();
        if ORIGINS_PER_DATABASE.replace(Some(per_database)).is_some_and(|before| before != per_database) {
            pgrx::log!("trompe: the schema now names replication origins per database; worker restarts");
            // SAFETY: ends the background worker; its transaction is aborted on the way out.
            unsafe { crate::pg_compat::proc_exit(1) };
        }
        // Create missing replication origins (e.g. after a restore) before reading them.
        crate::origins::create_for_peers()?;
        let origin_holds_after = crate::worker::progress::origin_holds_after()?;
        let rows = sql::rows(
            &format!(
                "SELECT p.name, p.node_id, p.conninfo, p.paused, pr.done, pr.cur, pr.after, o.roident, p.added_at::text,
                        {}, coalesce((pg_replication_origin_progress(o.roname, false) - '0/0'::pg_lsn)::bigint, 0)
                   FROM trompe.peers p JOIN trompe.progress pr USING (node_id)
                   JOIN pg_replication_origin o ON o.roname = {}
                  ORDER BY p.name",
                if origin_holds_after { "pr.after_offset" } else { "0" },
                crate::origins::name_sql("p.node_id")
            ),
            &[],
        )?;
        let mut peers = Vec::new();
        for r in rows {
            let text = |i: usize| r[i].clone().unwrap_or_default();
            let node: NodeId = text(1).parse().map_err(|e: trompe_core::nodeid::NodeIdError| e.to_string())?;
            let done: Snapshot = text(4).parse().map_err(|e: trompe_core::snapshot::SnapshotError| e.to_string())?;
            let offset: i64 = text(9).parse().unwrap_or(0);
            let origin: u64 = text(10).parse().unwrap_or(0);
            let step = match &r[5] {
                Some(c) => Some(Step {
                    cur: c.parse().map_err(|e: trompe_core::snapshot::SnapshotError| e.to_string())?,
                    after: in_origin::after(text(6).parse().unwrap_or(0), offset, origin),
                }),
                None => None,
            };
            let stored = crate::worker::link::Stored {
                origin_holds_after,
                step: step.as_ref().map(|s| s.cur.clone()),
                offset,
                origin,
                ..Default::default()
            };
            peers.push(PeerRow {
                name: text(0),
                node,
                conninfo: text(2),
                paused: r[3].as_deref() == Some("t"),
                origin: text(7).parse().unwrap_or(0),
                position: Position { done, step },
                stored,
                added_at: text(8),
            });
        }
        let kept = sql::rows(
            &format!(
                "SELECT {} FROM trompe.progress pr
                  WHERE NOT EXISTS (SELECT 1 FROM trompe.peers p WHERE p.node_id = pr.node_id)",
                crate::origins::name_sql("pr.node_id")
            ),
            &[],
        )?
        .into_iter()
        .filter_map(|r| r.into_iter().next().flatten())
        .collect();
        Ok((me, peers, kept, crate::exceptions::skip_requests()?, crate::node::identity()?))
    })
}

/// The worker's state.
struct Engine {
    dboid: pg_sys::Oid,
    slot: &'static DbSlot,
    links: Vec<Link>,
    /// When each linked peer was added (a re-added peer gets a new link).
    added: HashMap<NodeId, String>,
    /// The replication origins of removed peers whose position is kept.
    kept_origins: Vec<String>,
    cache: ApplyCache,
    wake_seen: u64,
    next_reload_ms: i64,
    next_extension_check_ms: i64,
    next_maintenance_ms: i64,
    /// When to look again whether a snapshot mark is due (see `crate::log::marks`).
    next_mark_ms: i64,
    next_versions_ms: i64,
    /// Tables whose aging rows' versions are being kept, with the block the next slice of each
    /// starts at (one slice per turn of the loop: replication goes on in between).
    sweeps: std::collections::VecDeque<(crate::row_versions::Sweep, u32)>,
    last_pruning_ms: i64,
    extension_seen: bool,
    /// A copy from a peer this node is joining through (nothing is pulled until it is done).
    sync: Option<crate::join::copy::SyncJob>,
    sync_not_before_ms: i64,
    sync_backoff: Backoff,
}

impl Engine {
    /// Drops the replication origins of the peers this worker knew, and of removed peers whose
    /// position was kept (after DROP EXTENSION): those named the 0.4.0 way here, the ones named
    /// per database by `origins::drop_this_databases` after.
    fn drop_origins(&mut self) {
        let mut names: Vec<String> =
            self.links.iter().map(|l| trompe_core::nodeid::legacy_origin_name(l.node)).collect();
        names.append(&mut self.kept_origins);
        self.links.clear();
        let result = in_transaction(|| {
            for name in &names {
                sql::execute(
                    "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname = $1",
                    &[Some(name)],
                )?;
            }
            Ok(())
        });
        if let Err(e) = result {
            pgrx::log!("trompe: cannot drop replication origins: {e}");
        }
    }

    fn reload(&mut self) {
        self.sync = match crate::join::copy::pending() {
            Ok(job) => job,
            Err(e) => {
                pgrx::log!("trompe: cannot read pending copies: {e}");
                None
            }
        };
        let (me, mut rows, kept, skips, identity) = match load_peers() {
            Ok(v) => v,
            Err(e) => {
                pgrx::log!("trompe: cannot read peers: {e}");
                return;
            }
        };
        // A copy of the node's database pulls nothing: it would confirm, as the node, positions
        // the node has not reached, and the peers would free log the node still needs.
        let copy_of = match identity {
            crate::node::Identity::CopyOf { original } => Some(original),
            crate::node::Identity::Own => None,
        };
        if copy_of.is_some() {
            rows.iter_mut().for_each(|r| r.paused = true);
            // Nor does it go on with a join the node was making when it was copied: that would
            // register it at the peers as the node.
            self.sync = None;
        }
        self.kept_origins = kept;
        let shared = shared();
        let mut old: HashMap<NodeId, Link> = self.links.drain(..).map(|l| (l.node, l)).collect();
        for row in rows {
            let info = match crate::peer_calls::peer_conninfo(&row.conninfo) {
                Ok(i) => i,
                Err(e) => {
                    pgrx::log!("trompe: peer \"{}\" has an invalid connection string: {e}", row.name);
                    continue;
                }
            };
            let same_peer = self.added.get(&row.node) == Some(&row.added_at);
            self.added.insert(row.node, row.added_at.clone());
            match old.remove(&row.node).filter(|_| same_peer) {
                Some(mut link) => {
                    link.update(row.conninfo, info, row.paused);
                    link.schema_updated(row.stored.origin_holds_after);
                    self.links.push(link);
                }
                None => {
                    let slot = shared.and_then(|s| s.peer_slot(self.dboid, &row.node.0));
                    self.links.push(Link::new(
                        row.name,
                        row.node,
                        row.conninfo,
                        info,
                        row.paused,
                        row.origin as pg_sys::RepOriginId,
                        row.position,
                        row.stored,
                        me.clone(),
                        slot,
                    ));
                }
            }
        }
        for link in self.links.iter_mut() {
            link.set_skip(skips.iter().find(|(node, _)| *node == link.node).map(|(_, txn)| *txn));
            if let Some(original) = &copy_of {
                link.refuse_as_copy(original);
            }
        }
        if let Some(shared) = shared {
            let keep: Vec<[u8; 16]> = self.links.iter().map(|l| l.node.0).collect();
            shared.release_peer_slots(self.dboid, &keep);
        }
        // Peers removed since: their replication origins stay. Rows applied from a peer keep
        // its origin's number as their version's node, for as long as they exist (a dropped
        // origin's number would be given to the next one created), and a peer added again
        // resumes from its position.
        for node in old.keys() {
            self.added.remove(node);
        }
    }

    /// Makes the pending copy from a peer (this node is joining a cluster), unless it failed
    /// shortly before: it is retried with backoff, each attempt from the start.
    fn drive_sync(&mut self) {
        let Some(job) = self.sync.take() else { return };
        if now_ms() < self.sync_not_before_ms {
            self.sync = Some(job);
            return;
        }
        let slot = shared().and_then(|s| s.peer_slot(self.dboid, &job.node.0));
        pgrx::log!("trompe: copying the schema and data of peer \"{}\"", job.name);
        match crate::join::copy::run(&job) {
            Ok(()) => {
                pgrx::log!("trompe: copy from peer \"{}\" done; replicating from it", job.name);
                if let Some(slot) = slot {
                    slot.clear_error();
                }
                self.sync_backoff.succeed();
                // Links start again from the positions the copy set.
                self.links.clear();
                self.added.clear();
                self.reload();
            }
            Err(e) => {
                pgrx::log!("trompe: copy from peer \"{}\" failed (will start again): {e}", job.name);
                if let Some(slot) = slot {
                    slot.set_error(&format!("copying from the peer: {e}"));
                }
                self.sync_not_before_ms = now_ms() + self.sync_backoff.fail().as_millis() as i64;
                self.sync = Some(job);
            }
        }
    }

    fn iterate(&mut self) {
        let now = now_ms();
        if now >= self.next_extension_check_ms {
            if !extension_exists() {
                self.slot.set_state(DbState::NoExtension);
                if self.extension_seen {
                    pgrx::log!("trompe: the extension was dropped; worker exits");
                    self.drop_origins();
                }
                // A worker stopped for DROP EXTENSION (worker::dbguard) never saw it go: this
                // database's origins are dropped by the worker started after it.
                if let Err(e) = in_transaction(crate::origins::drop_this_databases) {
                    pgrx::log!("trompe: cannot drop the replication origins of this database: {e}");
                }
                // SAFETY: a clean exit of the background worker.
                unsafe { crate::pg_compat::proc_exit(0) };
            }
            self.extension_seen = true;
            self.next_extension_check_ms = now + EXTENSION_CHECK_MS;
        }
        let wake = self.slot.wake_requests.load(Ordering::Acquire);
        if wake != self.wake_seen || now >= self.next_reload_ms {
            let woken = wake != self.wake_seen;
            self.wake_seen = wake;
            self.reload();
            if woken {
                self.links.iter_mut().for_each(Link::hurry);
            }
            self.next_reload_ms = now + RELOAD_EVERY_MS;
        }
        if self.sync.is_some() {
            self.drive_sync();
            if self.sync.is_some() {
                let wake_at = self.sync_not_before_ms.min(self.next_extension_check_ms).min(self.next_reload_ms);
                wait(&[], (wake_at - now_ms()).max(0));
                return;
            }
        }
        let enabled = crate::guc::ENABLED.get();
        let mut waits: Vec<WaitSpec> = Vec::with_capacity(self.links.len());
        for link in self.links.iter_mut() {
            waits.push(link.drive(&mut self.cache, enabled));
        }
        // Every link's flag is taken (and reset), so no short-circuit here.
        let mut applied_ddl = false;
        for link in self.links.iter_mut() {
            applied_ddl |= link.take_applied_ddl();
        }
        if applied_ddl {
            // A change that waited for DDL from another peer may go through now.
            for (link, wait) in self.links.iter_mut().zip(waits.iter_mut()) {
                link.retry_failed();
                if wait.socket.is_none() {
                    wait.wake_at_ms = Some(now_ms());
                }
            }
        }
        // Outside any batch (no replication origin set up): this node's own transaction.
        crate::worker::apply::retire::log_queued(&mut self.cache);
        if now_ms() >= self.next_maintenance_ms {
            if let Err(e) = in_transaction(|| crate::log::rotation::maintain(self.slot)) {
                pgrx::log!("trompe: log maintenance failed: {e}");
            }
            self.next_maintenance_ms = now_ms() + MAINTENANCE_EVERY_MS;
        }
        if now_ms() >= self.next_mark_ms {
            if crate::log::marks::due(self.slot) {
                if let Err(e) = in_transaction(|| crate::log::marks::record(self.slot)) {
                    pgrx::log!("trompe: recording a snapshot mark failed: {e}");
                }
            }
            self.next_mark_ms = now_ms() + crate::log::marks::MARK_EVERY_MS;
        }
        if self.sweeps.is_empty() && now_ms() >= self.next_versions_ms {
            if let Err(e) = in_transaction(crate::row_versions::maintain) {
                pgrx::log!("trompe: pruning kept row versions failed: {e}");
            }
            match in_transaction(crate::row_versions::sweeps_due) {
                Ok(due) => self.sweeps = due.into_iter().map(|table| (table, 0)).collect(),
                Err(e) => pgrx::log!("trompe: finding tables whose row versions need keeping failed: {e}"),
            }
            self.next_versions_ms = now_ms() + VERSIONS_EVERY_MS;
        }
        if let Some((table, from_block)) = self.sweeps.front_mut() {
            // One slice of one table per turn, in a transaction of its own: one table that
            // fails holds back no other.
            match in_transaction(|| crate::row_versions::sweep_slice(table, *from_block)) {
                Ok(Some(next)) => *from_block = next,
                Ok(None) => {
                    self.sweeps.pop_front();
                }
                Err(e) => {
                    pgrx::log!(
                        "trompe: keeping the versions of aging rows of table {} failed: {e}",
                        table.relid.to_u32()
                    );
                    self.sweeps.pop_front();
                }
            }
        }
        // The interval follows the retention settings, which a reload may have just changed.
        if now_ms() >= self.last_pruning_ms + crate::retention::interval_ms() {
            self.last_pruning_ms = now_ms();
            match in_transaction(crate::retention::prune) {
                Ok(pruned) => {
                    if pruned.tombstones {
                        crate::shmem::tombstones_changed();
                    }
                    if pruned.more {
                        self.last_pruning_ms = 0;
                    }
                }
                Err(e) => pgrx::log!("trompe: pruning conflicts and tombstones failed: {e}"),
            }
        }
        let mut wake_at = self
            .next_maintenance_ms
            .min(self.last_pruning_ms + crate::retention::interval_ms())
            .min(self.next_extension_check_ms)
            .min(if self.sweeps.is_empty() { self.next_versions_ms } else { now_ms() })
            .min(self.next_mark_ms)
            .min(self.next_reload_ms);
        for w in &waits {
            if let Some(t) = w.wake_at_ms {
                wake_at = wake_at.min(t);
            }
        }
        wait(&waits, (wake_at - now_ms()).max(0));
    }
}

/// Waits for the latch, any peer socket's readiness, postmaster death, or the timeout.
fn wait(waits: &[WaitSpec], timeout_ms: i64) {
    crate::worker::txn::report_statistics();
    // SAFETY: the wait event set is created in the current memory context and freed here; the
    // sockets belong to live connections.
    unsafe {
        let sockets: Vec<(pg_sys::pgsocket, Want)> = waits.iter().filter_map(|w| w.socket).collect();
        let set = crate::pg_compat::create_wait_event_set(2 + sockets.len() as i32);
        pg_sys::AddWaitEventToSet(
            set,
            pg_sys::WL_LATCH_SET,
            pg_sys::PGINVALID_SOCKET,
            pg_sys::MyLatch,
            std::ptr::null_mut(),
        );
        pg_sys::AddWaitEventToSet(
            set,
            pg_sys::WL_EXIT_ON_PM_DEATH,
            pg_sys::PGINVALID_SOCKET,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
        for (sock, want) in &sockets {
            let events = match want {
                Want::Write => pg_sys::WL_SOCKET_WRITEABLE,
                _ => pg_sys::WL_SOCKET_READABLE,
            };
            pg_sys::AddWaitEventToSet(set, events, *sock, std::ptr::null_mut(), std::ptr::null_mut());
        }
        let mut occurred = [pg_sys::WaitEvent::default(); 1];
        pg_sys::WaitEventSetWait(
            set,
            timeout_ms.min(i32::MAX as i64) as std::ffi::c_long,
            occurred.as_mut_ptr(),
            1,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::FreeWaitEventSet(set);
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
}

/// Main loop of a database's worker (after it connected to its database).
pub fn run(dboid: pg_sys::Oid, slot: &'static DbSlot) -> ! {
    register_invalidation();
    // Applied transactions record their commit times (crate::commit_time_cache) at commit.
    crate::capture::xact::ensure_xact_callback();
    let mut engine = Engine {
        dboid,
        slot,
        links: Vec::new(),
        added: HashMap::new(),
        kept_origins: Vec::new(),
        cache: ApplyCache::default(),
        wake_seen: u64::MAX,
        next_reload_ms: 0,
        next_extension_check_ms: 0,
        next_maintenance_ms: 0,
        next_mark_ms: 0,
        next_versions_ms: 0,
        sweeps: std::collections::VecDeque::new(),
        last_pruning_ms: 0,
        extension_seen: false,
        sync: None,
        sync_not_before_ms: 0,
        sync_backoff: Backoff::new(std::time::Duration::from_secs(1), std::time::Duration::from_secs(60)),
    };
    if let Err(e) = in_transaction(crate::origins::drop_those_of_dropped_databases) {
        pgrx::log!("trompe: cannot drop the replication origins of dropped databases: {e}");
    }
    // SAFETY: a memory context for one loop iteration, reset at the start of each.
    let loop_context = unsafe {
        pg_sys::AllocSetContextCreateInternal(
            pg_sys::TopMemoryContext,
            c"trompe worker loop".as_ptr(),
            pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        )
    };
    loop {
        // SAFETY: resetting and switching to our own context; CHECK_FOR_INTERRUPTS handles
        // SIGTERM (die) and postmaster death; the reload flag is set by our SIGHUP handler.
        unsafe {
            pg_sys::MemoryContextReset(loop_context);
            pg_sys::MemoryContextSwitchTo(loop_context);
            if pg_sys::ConfigReloadPending != 0 {
                pg_sys::ConfigReloadPending = 0;
                pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
                engine.links.iter_mut().for_each(Link::reload_settings);
            }
        }
        pgrx::check_for_interrupts!();
        engine.iterate();
    }
}
