//! trompe's settings (`trompe.*` in postgresql.conf), all changeable with a reload.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// `trompe.enabled`: off pauses every worker of the server.
pub static ENABLED: GucSetting<bool> = GucSetting::<bool>::new(true);
/// `trompe.pull_interval`: how long a pull request waits for new changes before it returns
/// empty (the fallback when no commit wakes it), in milliseconds.
pub static PULL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);
/// `trompe.batch_size`: changes fetched from a peer per request.
pub static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(10_000);
/// `trompe.retry_min_delay`: first retry delay after a peer failed, in milliseconds.
pub static RETRY_MIN_MS: GucSetting<i32> = GucSetting::<i32>::new(500);
/// `trompe.retry_max_delay`: longest retry delay, in milliseconds.
pub static RETRY_MAX_MS: GucSetting<i32> = GucSetting::<i32>::new(30_000);
/// `trompe.connect_timeout`: default libpq connect_timeout for peers, in seconds.
pub static CONNECT_TIMEOUT_S: GucSetting<i32> = GucSetting::<i32>::new(10);
/// `trompe.peer_timeout`: how long a peer may stay silent (no byte received) while it owes an
/// answer before the connection is given up, in milliseconds. A pull that keeps moving bytes
/// never times out, however long it takes.
pub static PEER_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(60_000);
/// `trompe.max_log_size`: the most log this node keeps for consumers that fall behind, in MB
/// (-1: no limit). Past it, the consumers holding back the oldest log table are marked lost.
pub static MAX_LOG_SIZE_MB: GucSetting<i32> = GucSetting::<i32>::new(-1);
/// `trompe.log_rotation_interval`: how often the current log table is switched, in ms.
pub static LOG_ROTATION_MS: GucSetting<i32> = GucSetting::<i32>::new(30_000);

/// `trompe.max_clock_skew`: the longest a transaction waits at commit for this node's clock to
/// pass a version it replaces (written by a node whose clock runs ahead), in milliseconds.
pub static MAX_CLOCK_SKEW_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);
/// `trompe.conflict_retention`: how long resolved conflicts are kept, in seconds.
pub static CONFLICT_RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(7 * 86_400);
/// `trompe.tombstone_retention`: how long the keys of deleted rows are kept, in seconds.
pub static TOMBSTONE_RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(7 * 86_400);
/// `trompe.commit_time_cache`: how many transactions' commit times are cached in shared memory
/// (16 bytes each) for capture and apply, which look up the version of every row they replace.
pub static COMMIT_TIME_CACHE: GucSetting<i32> = GucSetting::<i32>::new(1 << 20);

/// `trompe.pg_dump_path`: directories (separated by `:`) where a joining node also looks for a
/// `pg_dump` new enough to read its source, after this server's own bin directory.
pub static PG_DUMP_PATH: GucSetting<Option<std::ffi::CString>> = GucSetting::<Option<std::ffi::CString>>::new(None);

/// `trompe.peer_ddl_role`: the role a peer's DDL runs as when its origin's role does not exist
/// here or is a superuser.
pub static PEER_DDL_ROLE: GucSetting<Option<std::ffi::CString>> =
    GucSetting::<Option<std::ffi::CString>>::new(Some(c"trompe_peer_ddl"));

/// The role a peer's DDL falls back to (`trompe.peer_ddl_role`; `trompe_peer_ddl` when empty).
pub fn peer_ddl_role() -> String {
    match PEER_DDL_ROLE.get() {
        Some(r) if !r.as_bytes().is_empty() => r.to_string_lossy().into_owned(),
        _ => "trompe_peer_ddl".to_string(),
    }
}

/// Registers every setting.
pub fn define() {
    GucRegistry::define_bool_guc(
        c"trompe.enabled",
        c"Whether trompe's workers replicate.",
        c"Off pauses every trompe worker of this server; changes are still captured.",
        &ENABLED,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"trompe.pull_interval",
        c"How long a pull waits for new changes before returning.",
        c"A commit on the peer wakes the pull at once; this is the fallback period.",
        &PULL_INTERVAL_MS,
        100,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"trompe.batch_size",
        c"Changes fetched from a peer per request.",
        c"Whole transactions are always fetched, so a request can return more.",
        &BATCH_SIZE,
        1,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"trompe.retry_min_delay",
        c"First delay before retrying a peer that failed.",
        c"Doubles after each further failure, up to trompe.retry_max_delay.",
        &RETRY_MIN_MS,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"trompe.retry_max_delay",
        c"Longest delay before retrying a peer that failed.",
        c"",
        &RETRY_MAX_MS,
        10,
        86_400_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"trompe.connect_timeout",
        c"Default connect_timeout for connections to peers.",
        c"Used when a peer's connection string does not set connect_timeout.",
        &CONNECT_TIMEOUT_S,
        1,
        3600,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"trompe.peer_timeout",
        c"How long a peer may send nothing while it owes an answer.",
        c"Counted from the last byte received (after the pull's own wait for news): a slow but moving transfer never times out.",
        &PEER_TIMEOUT_MS,
        100,
        86_400_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"trompe.max_log_size",
        c"The most change log kept for consumers that fall behind (-1: no limit).",
        c"Past it, the consumers holding back the oldest log table are marked lost and must join again.",
        &MAX_LOG_SIZE_MB,
        -1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MB,
    );
    GucRegistry::define_int_guc(
        c"trompe.max_clock_skew",
        c"Longest wait at commit for the clock to pass a replaced version.",
        c"A transaction replacing a row version written by a node whose clock runs further ahead fails.",
        &MAX_CLOCK_SKEW_MS,
        0,
        3_600_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"trompe.conflict_retention",
        c"How long resolved conflicts are kept in trompe.conflicts.",
        c"",
        &CONFLICT_RETENTION_S,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"trompe.tombstone_retention",
        c"How long the keys of deleted rows are kept to resolve late conflicting changes.",
        c"Must be longer than any outage after which a node is expected to catch up.",
        &TOMBSTONE_RETENTION_S,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"trompe.log_rotation_interval",
        c"How often writers switch to the next change log table.",
        c"A log table is truncated once every peer has confirmed it.",
        &LOG_ROTATION_MS,
        100,
        86_400_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_string_guc(
        c"trompe.pg_dump_path",
        c"Directories (separated by ':') where a joining node looks for a pg_dump new enough for its source.",
        c"Searched after this server's own bin directory and before /usr/lib/postgresql/<version>/bin.",
        &PG_DUMP_PATH,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"trompe.peer_ddl_role",
        c"The role a peer's DDL runs as when its origin's role does not exist here or is a superuser.",
        c"Default trompe_peer_ddl, which is no superuser; naming a superuser trusts peers with any DDL.",
        &PEER_DDL_ROLE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
}

/// Registers the settings that size shared memory (PostgreSQL accepts them only while the
/// library is preloaded).
pub fn define_preloaded() {
    GucRegistry::define_int_guc(
        c"trompe.commit_time_cache",
        c"Transactions whose commit time and origin are cached in shared memory (16 bytes each).",
        c"Capture and apply look up the version of every row they replace; a miss reads pg_commit_ts. 0 disables the cache.",
        &COMMIT_TIME_CACHE,
        0,
        1 << 27,
        GucContext::Postmaster,
        GucFlags::default(),
    );
}
