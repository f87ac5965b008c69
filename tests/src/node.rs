//! One real PostgreSQL node: its own data directory, port and server log, run as the
//! `postgres` user, with trompe preloaded.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};

use crate::system::{pg_bin_in, run_as_postgres, RunError};
use crate::wait::wait_for;

/// The database every node replicates in tests.
pub const TEST_DB: &str = "app";

/// Settings every node gets, beyond its port: what the README tells users to set, plus
/// test-friendly values that do not change semantics (no fsync: a killed server loses nothing,
/// only an OS crash would). `full_page_writes` stays on, as in production: since PostgreSQL 16
/// it decides which young rows vacuum freezes.
pub const BASE_SETTINGS: &[(&str, &str)] = &[
    ("shared_preload_libraries", "'trompe'"),
    ("track_commit_timestamp", "on"),
    ("max_worker_processes", "16"),
    ("max_replication_slots", "16"),
    ("listen_addresses", "'127.0.0.1'"),
    ("fsync", "off"),
    ("log_min_messages", "info"),
    ("log_line_prefix", "'%m [%p] %a %b '"),
    ("shared_buffers", "32MB"),
    ("max_connections", "60"),
    // Peers' DDL runs as the superuser (trusting peers fully): tests that are not about trust run
    // their DDL as the superuser on tables it owns. tests/tests/hostile_ddl.rs sets the default.
    ("trompe.peer_ddl_role", "'postgres'"),
];

/// Debian's libfaketime (package `libfaketime`), preloaded into a node whose clock is skewed.
pub const FAKETIME_LIBRARY: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// A PostgreSQL node under test.
pub struct Node {
    /// Short name used in messages and as the peer name in meshes (`n1`, `n2`, ...).
    pub name: String,
    /// The TCP port it listens on (127.0.0.1).
    pub port: u16,
    /// Its data directory.
    pub datadir: PathBuf,
    /// Its server log file.
    pub logfile: PathBuf,
    /// Environment variables its server starts with.
    pub env: Vec<(String, String)>,
    /// How far its server's clock is off (libfaketime's `FAKETIME`, e.g. `+3s`), if at all.
    pub clock_offset: Option<String>,
    /// The bin directory of the PostgreSQL installation it runs.
    pub bindir: PathBuf,
}

impl Node {
    /// Creates the node's data directory from an initialised template and configures it.
    pub(crate) fn create(
        name: &str,
        root: &Path,
        bindir: &Path,
        template: &Path,
        port: u16,
        extra: &[(String, String)],
    ) -> Node {
        let datadir = root.join(name);
        let logfile = root.join(format!("{name}.log"));
        let status = Command::new("cp").arg("-a").arg(template).arg(&datadir).status().expect("cp runs");
        assert!(status.success(), "copying the template data directory failed");
        let mut conf = String::from("\n# trompe test harness\n");
        conf += &format!("port = {port}\nunix_socket_directories = '{}'\n", datadir.display());
        for (k, v) in BASE_SETTINGS {
            conf += &format!("{k} = {v}\n");
        }
        for (k, v) in extra {
            conf += &format!("{k} = {v}\n");
        }
        let conf_path = datadir.join("postgresql.conf");
        let mut existing = fs::read_to_string(&conf_path).expect("template postgresql.conf readable");
        existing.push_str(&conf);
        fs::write(&conf_path, existing).expect("postgresql.conf writable");
        Node {
            name: name.to_string(),
            port,
            datadir,
            logfile,
            env: Vec::new(),
            clock_offset: None,
            bindir: bindir.to_path_buf(),
        }
    }

    /// The path of one of the binaries of this node's PostgreSQL installation.
    pub fn pg_bin(&self, name: &str) -> String {
        pg_bin_in(&self.bindir, name)
    }

    /// The major version of PostgreSQL this node runs.
    pub fn major(&self) -> u32 {
        crate::system::pg_major(&self.bindir)
    }

    /// A libpq connection string for `dbname` on this node, as the superuser.
    pub fn conninfo_for(&self, dbname: &str) -> String {
        format!("host=127.0.0.1 port={} dbname={dbname} user=postgres", self.port)
    }

    /// A libpq connection string for the test database.
    pub fn conninfo(&self) -> String {
        self.conninfo_for(TEST_DB)
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&self) {
        self.try_start().unwrap_or_else(|e| panic!("node {} did not start: {e}\n{}", self.name, self.log_tail(60)));
    }

    /// Starts the server, reporting failure instead of panicking.
    pub fn try_start(&self) -> Result<(), RunError> {
        let pg_ctl = self.pg_bin("pg_ctl");
        let start = ["start", "-w", "-t", "120", "-D", path_str(&self.datadir), "-l", path_str(&self.logfile)];
        let mut env = self.env.clone();
        if let Some(offset) = &self.clock_offset {
            // Every process of the server sees a clock off by `offset`; timeouts and latches
            // (the monotonic clock) run normally.
            for (k, v) in
                [("LD_PRELOAD", FAKETIME_LIBRARY), ("FAKETIME", offset.as_str()), ("DONT_FAKE_MONOTONIC", "1")]
            {
                env.push((k.to_string(), v.to_string()));
            }
        }
        if env.is_empty() {
            run_as_postgres(&pg_ctl, &start)?;
        } else {
            // Through env(1): runuser does not pass every variable on.
            let vars: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let mut args: Vec<&str> = vars.iter().map(String::as_str).collect();
            args.push(&pg_ctl);
            args.extend(start);
            run_as_postgres("/usr/bin/env", &args)?;
        }
        Ok(())
    }

    /// Stops the server cleanly (fast shutdown) and waits for it.
    pub fn stop(&self) {
        let _ = run_as_postgres(
            &self.pg_bin("pg_ctl"),
            &["stop", "-w", "-t", "120", "-m", "fast", "-D", path_str(&self.datadir)],
        );
    }

    /// Stops then starts the server.
    pub fn restart(&self) {
        self.stop();
        self.start();
    }

    /// The postmaster's process id, if it is running.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = fs::read_to_string(self.datadir.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Kills the postmaster and every process it started with SIGKILL, like a power cut of the
    /// server (the OS keeps what was written, as after a process crash).
    pub fn crash(&self) {
        let Some(pm) = self.postmaster_pid() else {
            return;
        };
        let mut victims = vec![pm];
        victims.extend(children_of(pm));
        for pid in &victims {
            // SAFETY: plain kill(2) on pids we read from /proc and postmaster.pid.
            unsafe {
                kill(*pid, 9);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while victims.iter().any(|&p| Path::new(&format!("/proc/{p}")).exists()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops (SIGSTOP) the server's WAL writer until the server is killed: WAL that only it
    /// would write (asynchronous commits and aborts) stays in the server's memory, so a crash
    /// loses it, as one can at any moment without this within `wal_writer_delay`.
    pub fn stop_wal_writer(&self) {
        let pid = self.query_i64("SELECT pid FROM pg_stat_activity WHERE backend_type = 'walwriter'");
        // SAFETY: plain kill(2) on the pid PostgreSQL reports for its WAL writer.
        let rc = unsafe { kill(pid as i32, SIGSTOP) };
        assert_eq!(rc, 0, "cannot stop the WAL writer (pid {pid}) of node {}", self.name);
    }

    /// Kills the postmaster with SIGKILL and starts the server again (crash recovery).
    pub fn crash_and_restart(&self) {
        self.crash();
        self.start();
    }

    /// A new client connection to `dbname`.
    pub fn connect_to(&self, dbname: &str) -> Client {
        let conninfo = self.conninfo_for(dbname);
        let mut last_err = None;
        for _ in 0..50 {
            match Client::connect(&conninfo, NoTls) {
                Ok(c) => return c,
                Err(e) => {
                    last_err = Some(e);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        panic!("cannot connect to node {} ({conninfo}): {:?}\n{}", self.name, last_err, self.log_tail(40));
    }

    /// A new client connection to the test database.
    pub fn connect(&self) -> Client {
        self.connect_to(TEST_DB)
    }

    /// A new client connection to the test database that keeps every notice and warning the
    /// server sends it (`severity: message`), in order.
    pub fn connect_keeping_notices(&self) -> (Client, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = notices.clone();
        let mut config: postgres::Config = self.conninfo().parse().expect("a valid connection string");
        config.notice_callback(move |n| {
            if let Ok(mut all) = kept.lock() {
                all.push(format!("{}: {}", n.severity(), n.message()));
            }
        });
        let client = config
            .connect(NoTls)
            .unwrap_or_else(|e| panic!("cannot connect to node {}: {}", self.name, crate::describe_error(&e)));
        (client, notices)
    }

    /// Runs `script` with `psql` (as a client would load a dump: one session, each statement in
    /// its own transaction unless the script says otherwise, stopping at the first error);
    /// returns what psql printed.
    pub fn psql(&self, script: &str) -> String {
        use std::io::Write;
        let mut child = crate::system::postgres_command(&self.pg_bin("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &self.conninfo(), "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("psql starts");
        let mut stdin = child.stdin.take().expect("stdin piped");
        let input = script.to_string();
        let feeder = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let out = child.wait_with_output().expect("psql finishes");
        let _ = feeder.join();
        let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "psql on node {} failed:\n{printed}", self.name);
        printed
    }

    /// What `pg_dump` prints for the test database with `args` (e.g. `--schema-only`).
    pub fn pg_dump(&self, args: &[&str]) -> String {
        let conninfo = self.conninfo();
        let mut all = vec!["-d", conninfo.as_str()];
        all.extend_from_slice(args);
        run_as_postgres(&self.pg_bin("pg_dump"), &all)
            .unwrap_or_else(|e| panic!("pg_dump on node {} failed: {e}", self.name))
    }

    /// Runs one or more statements in the test database; panics with the node's name on error.
    pub fn exec(&self, sql: &str) {
        let mut c = self.connect();
        if let Err(e) = c.batch_execute(sql) {
            panic!("on node {}: {sql}\nfailed: {}", self.name, crate::describe_error(&e));
        }
    }

    /// Runs a query in the test database and returns the first column of the first row as text.
    pub fn query_text(&self, sql: &str) -> Option<String> {
        let mut c = self.connect();
        let rows = c
            .simple_query(sql)
            .unwrap_or_else(|e| panic!("on node {}: {sql}\nfailed: {}", self.name, crate::describe_error(&e)));
        rows.into_iter().find_map(|m| match m {
            postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_string)),
            _ => None,
        })?
    }

    /// Runs a query in the test database and returns its first row as text values.
    pub fn query_row(&self, sql: &str) -> Vec<Option<String>> {
        let mut c = self.connect();
        let rows = c
            .simple_query(sql)
            .unwrap_or_else(|e| panic!("on node {}: {sql}\nfailed: {}", self.name, crate::describe_error(&e)));
        rows.into_iter()
            .find_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                }
                _ => None,
            })
            .unwrap_or_default()
    }

    /// Runs a query returning one bigint-compatible value (e.g. `count(*)`).
    pub fn query_i64(&self, sql: &str) -> i64 {
        let text =
            self.query_text(sql).unwrap_or_else(|| panic!("on node {}: {sql} returned NULL or no row", self.name));
        text.parse().unwrap_or_else(|_| panic!("on node {}: {sql} returned {text:?}, not a number", self.name))
    }

    /// Waits until `sql` (returning one text value) returns `expected`.
    pub fn wait_for_value(&self, sql: &str, expected: &str, timeout: Duration) {
        let mut last = None;
        let ok = wait_for(timeout, || {
            last = self.query_text(sql);
            last.as_deref() == Some(expected)
        });
        assert!(
            ok,
            "on node {}: waited {timeout:?} for `{sql}` to return {expected:?}; last value {last:?}",
            self.name
        );
    }

    /// Appends `bytes` to this node's log as one transaction's row, as if captured here (a
    /// forged entry, for tests of hostile peers), and commits an ordinary change to table
    /// `wake` after it so that pullers are woken.
    pub fn serve_forged(&self, bytes: &[u8]) {
        let mut c = self.connect();
        let slot: i32 = c
            .query_one("SELECT slot FROM trompe.log_rotation WHERE is_current", &[])
            .expect("the current log slot")
            .get(0);
        c.execute(
            &format!(
                "INSERT INTO trompe.log_{slot} (id, txid, nchanges, changes)
                 VALUES (nextval('trompe.log_id_seq'), pg_current_xact_id(), 1, $1)"
            ),
            &[&bytes],
        )
        .expect("a forged log entry");
        c.execute("INSERT INTO wake DEFAULT VALUES", &[]).expect("a change to table wake");
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.logfile).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let start = all.len().saturating_sub(lines);
        all[start..].join("\n")
    }

    /// The whole server log.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.logfile).unwrap_or_default()
    }
}

pub(crate) fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Every descendant process of `pid`, found through /proc.
fn children_of(pid: i32) -> Vec<i32> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // The parent pid is the second field after the parenthesised command name.
        let Some(after) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
            continue;
        };
        let ppid = after.split_whitespace().nth(1).and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(pid) {
            found.push(child);
        }
    }
    found
}

/// SIGSTOP on Linux.
const SIGSTOP: i32 = 19;

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}
