//! trompe's shared memory: per-database slots (worker, log rotation, commit counter), per-peer
//! live status, and the condition variable that wakes peers' pull requests when a transaction
//! that wrote to the log commits.
//!
//! Only present when the library is in `shared_preload_libraries`; everything here degrades to
//! "not available" otherwise.

use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering};

use pgrx::pg_sys;

/// Databases with trompe a server can serve at once.
pub const MAX_DATABASES: usize = 64;
/// Peers (over all databases) whose live status is kept.
pub const MAX_PEERS: usize = 256;
/// Bytes kept of a peer's last error message.
pub const ERROR_BYTES: usize = 512;
/// Consumers (over all databases) whose confirmed position is kept in shared memory.
pub const MAX_CONSUMERS: usize = 256;
/// Longest confirmed snapshot text kept in shared memory (longer ones go to the table).
pub const SNAPSHOT_BYTES: usize = 256;

/// State of one database's worker.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DbState {
    /// Slot unused.
    Free = 0,
    /// A worker should be started for this database.
    LaunchRequested = 1,
    /// A worker runs.
    Running = 2,
    /// The database has no trompe; do not start a worker until asked.
    NoExtension = 3,
    /// The database is being dropped or renamed: keep its worker away until `retry_at`.
    Held = 4,
    /// The worker exited with an error; restart it at `retry_at`.
    Failed = 5,
}

impl DbState {
    fn from_u32(v: u32) -> DbState {
        match v {
            1 => DbState::LaunchRequested,
            2 => DbState::Running,
            3 => DbState::NoExtension,
            4 => DbState::Held,
            5 => DbState::Failed,
            _ => DbState::Free,
        }
    }
}

/// Shared state of one database.
#[repr(C)]
pub struct DbSlot {
    /// The database, or 0 if the slot is free.
    pub dboid: AtomicU32,
    state: AtomicU32,
    /// Process id of its worker, 0 if none.
    pub worker_pid: AtomicI32,
    /// When (ms since epoch) a held or failed worker may be started again.
    pub retry_at: AtomicI64,
    /// The log table writers append to, -1 if not known yet.
    pub log_slot: AtomicI32,
    /// Counts commits of transactions that wrote to this database's log.
    pub log_commits: AtomicU64,
    /// Bumped to make the worker re-read its peers and pull at once.
    pub wake_requests: AtomicU64,
    /// Bumped after a transaction wrote tombstones or truncation markers (at its end, before
    /// it releases its locks).
    pub tombstone_generation: AtomicU64,
    /// Bumped before such a transaction commits; it equals `tombstone_generation` while no
    /// such commit is in flight.
    pub tombstone_writers: AtomicU64,
    /// The newest commit time (PostgreSQL TimestampTz) of the peer transactions applied here
    /// since the server started, 0 if none: rows, tombstones and truncation markers of peers
    /// are no newer (see [`newest_applied_commit`]).
    pub newest_applied_us: AtomicI64,
}

impl DbSlot {
    /// The worker state.
    pub fn state(&self) -> DbState {
        DbState::from_u32(self.state.load(Ordering::Acquire))
    }

    /// Sets the worker state.
    pub fn set_state(&self, s: DbState) {
        self.state.store(s as u32, Ordering::SeqCst);
    }

    /// Sets the worker state to `new` if it is still `expected`; returns whether it was.
    pub fn replace_state(&self, expected: DbState, new: DbState) -> bool {
        self.state.compare_exchange(expected as u32, new as u32, Ordering::SeqCst, Ordering::SeqCst).is_ok()
    }
}

/// Live status of one peer of one database, written by that database's worker.
#[repr(C)]
pub struct PeerSlot {
    /// The database, or 0 if the slot is free.
    pub dboid: AtomicU32,
    /// The peer's node id.
    pub node_id: [u8; 16],
    /// Connection state (see `worker::link::ConnState`).
    pub conn_state: AtomicU32,
    /// When the last pull succeeded (ms since epoch), 0 if never.
    pub last_pull_ms: AtomicI64,
    /// When the last error happened (ms since epoch), 0 if never.
    pub last_error_ms: AtomicI64,
    /// Origin transactions applied since the counters in `trompe.progress` were last written.
    pub applied_txns: AtomicU64,
    /// Changes applied since the counters in `trompe.progress` were last written.
    pub applied_changes: AtomicU64,
    /// Changes the peer has committed that are not applied here yet, -1 if unknown.
    pub pending_changes: AtomicI64,
    /// Commit time (ms since epoch) of the oldest change not applied yet, 0 if none.
    pub oldest_pending_ms: AtomicI64,
    /// How long the last applied transaction took from its commit at the peer to its
    /// application here (ms); 0 once a pull found nothing new.
    pub apply_delay_ms: AtomicI64,
    /// The log id closing the peer's transaction that failed to apply (what `trompe.skip`
    /// sets aside), 0 while none fails.
    pub failing_txn: AtomicI64,
    /// Transactions and bytes of the peer's log it retains for this node (not confirmed as
    /// applied), as it last said; -1 if unknown.
    pub peer_log_txns: AtomicI64,
    pub peer_log_bytes: AtomicI64,
    error_len: AtomicU32,
    error: [u8; ERROR_BYTES],
}

/// The position a consumer of this node's log last confirmed, written by the pull requests
/// it makes (no table write on the hot path) and saved to `trompe.consumers` by the worker.
#[repr(C)]
pub struct ConsumerSlot {
    /// The database, or 0 if the slot is free.
    pub dboid: AtomicU32,
    /// The consumer's node id.
    pub node_id: [u8; 16],
    len: AtomicU32,
    text: [u8; SNAPSHOT_BYTES],
}

/// The whole shared segment.
#[repr(C)]
pub struct Shared {
    lock: *mut pg_sys::LWLock,
    /// Process id of the supervisor, 0 if none.
    pub supervisor_pid: AtomicI32,
    /// Pull requests of peers wait on this for a commit that wrote to the log.
    pub log_commit_cv: pg_sys::ConditionVariable,
    /// Per-database state.
    pub dbs: [DbSlot; MAX_DATABASES],
    /// Per-peer live status.
    pub peers: [PeerSlot; MAX_PEERS],
    /// Positions confirmed by consumers of this node's log.
    pub consumers: [ConsumerSlot; MAX_CONSUMERS],
}

static mut SHARED: *mut Shared = std::ptr::null_mut();
static mut PREV_STARTUP: pg_sys::shmem_startup_hook_type = None;

/// Asks for the segment and the lock; called from `_PG_init` while preloading.
pub fn request() {
    // SAFETY: hook installation from _PG_init, single-threaded, in the postmaster.
    unsafe {
        crate::pg_compat::request_shared_memory(request_space);
        PREV_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup);
    }
}

unsafe fn request_space() {
    pg_sys::RequestAddinShmemSpace(std::mem::size_of::<Shared>());
    pg_sys::RequestAddinShmemSpace(crate::commit_time_cache::shmem_size());
    pg_sys::RequestNamedLWLockTranche(c"trompe".as_ptr(), 1);
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    if let Some(prev) = PREV_STARTUP {
        prev();
    }
    let init_lock = crate::pg_compat::addin_shmem_init_lock();
    pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
    let mut found = false;
    let shared = pg_sys::ShmemInitStruct(c"trompe".as_ptr(), std::mem::size_of::<Shared>(), &mut found) as *mut Shared;
    if !found {
        std::ptr::write_bytes(shared as *mut u8, 0, std::mem::size_of::<Shared>());
        (*shared).lock = &mut (*pg_sys::GetNamedLWLockTranche(c"trompe".as_ptr())).lock;
        pg_sys::ConditionVariableInit(&mut (*shared).log_commit_cv);
        for db in (*shared).dbs.iter() {
            db.log_slot.store(-1, Ordering::Relaxed);
        }
    }
    SHARED = shared;
    crate::commit_time_cache::attach();
    pg_sys::LWLockRelease(init_lock);
}

/// The shared segment, if trompe was preloaded.
pub fn shared() -> Option<&'static Shared> {
    // SAFETY: SHARED is set once at startup (inherited by every backend) and never freed.
    unsafe { SHARED.as_ref() }
}

/// Runs `f` holding trompe's lock exclusively (released also on error).
pub fn with_lock<R>(shared: &Shared, f: impl FnOnce() -> R) -> R {
    struct Release(*mut pg_sys::LWLock);
    impl Drop for Release {
        fn drop(&mut self) {
            // SAFETY: releases the lock acquired below. LWLocks are also released on error
            // by the abort path; releasing a lock not held would be an error, so only release
            // while this process still holds it.
            unsafe {
                if pg_sys::LWLockHeldByMe(self.0) {
                    pg_sys::LWLockRelease(self.0);
                }
            }
        }
    }
    // SAFETY: the lock lives in shared memory for the server's lifetime.
    unsafe { pg_sys::LWLockAcquire(shared.lock, pg_sys::LWLockMode::LW_EXCLUSIVE) };
    let _release = Release(shared.lock);
    f()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Shared {
    /// The slot of `dboid`, if one exists.
    pub fn db_slot(&self, dboid: pg_sys::Oid) -> Option<&DbSlot> {
        let want = dboid.to_u32();
        self.dbs.iter().find(|d| d.dboid.load(Ordering::Acquire) == want)
    }

    /// The slot of `dboid`, allocating a free one if needed (None if all are taken).
    pub fn db_slot_or_new(&self, dboid: pg_sys::Oid) -> Option<&DbSlot> {
        if let Some(slot) = self.db_slot(dboid) {
            return Some(slot);
        }
        with_lock(self, || {
            if let Some(slot) = self.db_slot(dboid) {
                return Some(slot);
            }
            let slot = self.dbs.iter().find(|d| d.dboid.load(Ordering::Acquire) == 0)?;
            slot.set_state(DbState::Free);
            slot.worker_pid.store(0, Ordering::Relaxed);
            slot.retry_at.store(0, Ordering::Relaxed);
            slot.log_slot.store(-1, Ordering::Relaxed);
            slot.newest_applied_us.store(0, Ordering::Relaxed);
            slot.dboid.store(dboid.to_u32(), Ordering::Release);
            Some(slot)
        })
    }

    /// The status slot of peer `node_id` of database `dboid`, allocating it if needed.
    pub fn peer_slot(&self, dboid: pg_sys::Oid, node_id: &[u8; 16]) -> Option<&PeerSlot> {
        let want = dboid.to_u32();
        let find = || self.peers.iter().find(|p| p.dboid.load(Ordering::Acquire) == want && &p.node_id == node_id);
        if let Some(p) = find() {
            return Some(p);
        }
        with_lock(self, || {
            if let Some(p) = find() {
                return Some(p);
            }
            let slot = self.peers.iter().find(|p| p.dboid.load(Ordering::Acquire) == 0)?;
            let ptr = slot as *const PeerSlot as *mut PeerSlot;
            // SAFETY: the slot is free and we hold the lock, so nobody else reads or writes its
            // plain fields while we reset them.
            unsafe {
                (*ptr).node_id = *node_id;
            }
            slot.reset();
            slot.dboid.store(want, Ordering::Release);
            Some(slot)
        })
    }

    /// The status slot of a peer, if it has one.
    pub fn find_peer_slot(&self, dboid: pg_sys::Oid, node_id: &[u8; 16]) -> Option<&PeerSlot> {
        let want = dboid.to_u32();
        self.peers.iter().find(|p| p.dboid.load(Ordering::Acquire) == want && &p.node_id == node_id)
    }

    /// Frees every peer slot of `dboid` whose node id is not in `keep`.
    pub fn release_peer_slots(&self, dboid: pg_sys::Oid, keep: &[[u8; 16]]) {
        let want = dboid.to_u32();
        with_lock(self, || {
            for p in self.peers.iter() {
                if p.dboid.load(Ordering::Acquire) == want && !keep.contains(&p.node_id) {
                    p.dboid.store(0, Ordering::Release);
                }
            }
        });
    }
}

impl Shared {
    /// Records that consumer `node_id` of `dboid` confirmed `snapshot`; false if it does not
    /// fit (the caller then writes the table).
    pub fn set_confirmed(&self, dboid: pg_sys::Oid, node_id: &[u8; 16], snapshot: &str) -> bool {
        if snapshot.len() > SNAPSHOT_BYTES {
            return false;
        }
        let want = dboid.to_u32();
        with_lock(self, || {
            let slot = self
                .consumers
                .iter()
                .find(|c| c.dboid.load(Ordering::Acquire) == want && &c.node_id == node_id)
                .or_else(|| self.consumers.iter().find(|c| c.dboid.load(Ordering::Acquire) == 0));
            let Some(slot) = slot else { return false };
            let ptr = slot as *const ConsumerSlot as *mut ConsumerSlot;
            // SAFETY: consumer slots' plain fields are only read and written under the lock.
            unsafe {
                (*ptr).node_id = *node_id;
                (&mut (*ptr).text)[..snapshot.len()].copy_from_slice(snapshot.as_bytes());
            }
            slot.len.store(snapshot.len() as u32, Ordering::Release);
            slot.dboid.store(want, Ordering::Release);
            true
        })
    }

    /// The position consumer `node_id` of `dboid` confirmed last, if kept here.
    pub fn confirmed(&self, dboid: pg_sys::Oid, node_id: &[u8; 16]) -> Option<String> {
        let want = dboid.to_u32();
        with_lock(self, || {
            let slot =
                self.consumers.iter().find(|c| c.dboid.load(Ordering::Acquire) == want && &c.node_id == node_id)?;
            let len = slot.len.load(Ordering::Acquire) as usize;
            Some(String::from_utf8_lossy(&slot.text[..len.min(SNAPSHOT_BYTES)]).into_owned())
        })
    }

    /// Forgets consumer `node_id` of `dboid`.
    pub fn forget_consumer(&self, dboid: pg_sys::Oid, node_id: &[u8; 16]) {
        let want = dboid.to_u32();
        with_lock(self, || {
            for c in self.consumers.iter() {
                if c.dboid.load(Ordering::Acquire) == want && &c.node_id == node_id {
                    c.dboid.store(0, Ordering::Release);
                }
            }
        });
    }
}

impl PeerSlot {
    fn reset(&self) {
        self.conn_state.store(0, Ordering::Relaxed);
        self.last_pull_ms.store(0, Ordering::Relaxed);
        self.last_error_ms.store(0, Ordering::Relaxed);
        self.applied_txns.store(0, Ordering::Relaxed);
        self.applied_changes.store(0, Ordering::Relaxed);
        self.pending_changes.store(-1, Ordering::Relaxed);
        self.oldest_pending_ms.store(0, Ordering::Relaxed);
        self.apply_delay_ms.store(0, Ordering::Relaxed);
        self.failing_txn.store(0, Ordering::Relaxed);
        self.peer_log_txns.store(-1, Ordering::Relaxed);
        self.peer_log_bytes.store(-1, Ordering::Relaxed);
        self.error_len.store(0, Ordering::Relaxed);
    }

    /// Records an error (truncated to `ERROR_BYTES` at a character boundary) and its time.
    pub fn set_error(&self, message: &str) {
        let shared = match shared() {
            Some(s) => s,
            None => return,
        };
        let mut end = message.len().min(ERROR_BYTES);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        with_lock(shared, || {
            let ptr = self as *const PeerSlot as *mut PeerSlot;
            // SAFETY: error bytes are only written and read under the lock.
            unsafe {
                (&mut (*ptr).error)[..end].copy_from_slice(&message.as_bytes()[..end]);
            }
            self.error_len.store(end as u32, Ordering::Release);
        });
        self.last_error_ms.store(now_ms(), Ordering::Release);
    }

    /// Clears the last error message (keeping its time).
    pub fn clear_error(&self) {
        self.error_len.store(0, Ordering::Release);
    }

    /// The last error message, if any.
    pub fn error(&self) -> Option<String> {
        let shared = shared()?;
        with_lock(shared, || {
            let len = self.error_len.load(Ordering::Acquire) as usize;
            (len > 0).then(|| String::from_utf8_lossy(&self.error[..len.min(ERROR_BYTES)]).into_owned())
        })
    }
}

/// Announces that a transaction that wrote to this database's log has committed: wakes every
/// pull request waiting for changes. Called from the commit callback; never raises.
pub fn announce_log_commit() {
    let Some(shared) = shared() else { return };
    // SAFETY: MyDatabaseId is a backend-local global.
    let dboid = unsafe { pg_sys::MyDatabaseId };
    if let Some(slot) = shared.db_slot(dboid) {
        slot.log_commits.fetch_add(1, Ordering::AcqRel);
        // SAFETY: the condition variable lives in shared memory for the server's lifetime.
        unsafe { pg_sys::ConditionVariableBroadcast(&shared.log_commit_cv as *const _ as *mut _) };
    }
}

thread_local! {
    static LOCAL_GENERATION: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The tombstone generation of this database: cached facts about tombstones stay valid while it
/// does not change. Without shared memory it changes on every call (nothing is cached).
pub fn tombstone_generation() -> u64 {
    // SAFETY: MyDatabaseId is a backend-local global.
    let slot = shared().and_then(|s| s.db_slot(unsafe { pg_sys::MyDatabaseId }));
    match slot {
        Some(slot) => slot.tombstone_generation.load(Ordering::Acquire),
        None => {
            let g = LOCAL_GENERATION.get() + 1;
            LOCAL_GENERATION.set(g);
            g | (1 << 63)
        }
    }
}

/// How many transactions have started to commit tombstones or truncation markers in this
/// database. If it differs from a `tombstone_generation()` read earlier, some may have
/// committed since. Without shared memory it changes on every call.
pub fn tombstone_writers() -> u64 {
    // SAFETY: MyDatabaseId is a backend-local global.
    let slot = shared().and_then(|s| s.db_slot(unsafe { pg_sys::MyDatabaseId }));
    match slot {
        Some(slot) => slot.tombstone_writers.load(Ordering::Acquire),
        None => tombstone_generation(),
    }
}

/// Announces that this transaction is about to commit tombstones or truncation markers (call
/// `bump_tombstone_generation` once it ended, committed or not).
pub fn announce_tombstone_writer() {
    // SAFETY: MyDatabaseId is a backend-local global.
    if let Some(slot) = shared().and_then(|s| s.db_slot_or_new(unsafe { pg_sys::MyDatabaseId })) {
        slot.tombstone_writers.fetch_add(1, Ordering::AcqRel);
    }
}

/// Announces that a transaction that ended changed tombstones or truncation markers (both
/// counters, for writers that did not announce themselves before committing).
pub fn tombstones_changed() {
    announce_tombstone_writer();
    bump_tombstone_generation();
}

/// The apply worker is about to apply (and announce the tombstones of) a peer transaction
/// committed at `commit_us`: local transactions that must rank above what it writes read it
/// through [`newest_applied_commit`].
pub fn note_applied_commit(commit_us: i64) {
    // SAFETY: MyDatabaseId is a backend-local global.
    if let Some(slot) = shared().and_then(|s| s.db_slot_or_new(unsafe { pg_sys::MyDatabaseId })) {
        slot.newest_applied_us.fetch_max(commit_us, Ordering::AcqRel);
    }
}

/// No row, tombstone or truncation marker written here for a peer has a newer commit time than
/// this. Rows applied before the server started count too: they are no newer than its start
/// plus `trompe.max_clock_skew` (how far ahead a peer's clock may be).
pub fn newest_applied_commit() -> i64 {
    // SAFETY: PgStartTime is set once by the postmaster.
    let before_start = unsafe { pg_sys::PgStartTime } + i64::from(crate::guc::MAX_CLOCK_SKEW_MS.get()) * 1000;
    newest_applied_since_start().max(before_start)
}

/// The newest commit time of the peer transactions applied since the server started (0 if
/// none): what a transaction running now can meet of what the worker applies meanwhile.
pub fn newest_applied_since_start() -> i64 {
    // SAFETY: MyDatabaseId is a backend-local global.
    let slot = shared().and_then(|s| s.db_slot(unsafe { pg_sys::MyDatabaseId }));
    slot.map_or(0, |s| s.newest_applied_us.load(Ordering::Acquire))
}

/// Announces that tombstones or truncation markers of this database changed.
pub fn bump_tombstone_generation() {
    // SAFETY: MyDatabaseId is a backend-local global.
    if let Some(slot) = shared().and_then(|s| s.db_slot_or_new(unsafe { pg_sys::MyDatabaseId })) {
        slot.tombstone_generation.fetch_add(1, Ordering::AcqRel);
    }
}
