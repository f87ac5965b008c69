//! Reading a peer's schema for a joining node: `pg_dump --schema-only --format=custom` run by
//! the worker against the peer, inside the snapshot the data is copied from (`--snapshot`), so
//! that the schema and the rows match and every later DDL arrives through the peer's log; then
//! `pg_restore` (the one next to that pg_dump) lists the archive and writes the SQL of every
//! entry but trompe's own (see `trompe_core::dump`). The files live in a directory of this
//! server's `base/pgsql_tmp`, removed afterwards (and by PostgreSQL at its next start).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use pgrx::pg_sys;
use trompe_core::conninfo::ConnInfo;
use trompe_core::dump::{
    choose_pg_dump, pg_dump_major, prepare, restore_has_restrict_key, without_own_entries, DumpError, OwnObjects,
    SchemaScript,
};

/// How often the worker looks whether pg_dump has finished (it answers signals meanwhile).
const POLL: Duration = Duration::from_millis(100);

/// The directory of this server's programs (pg_dump is installed next to postgres).
fn bindir() -> Result<std::path::PathBuf, String> {
    // SAFETY: my_exec_path is a NUL-terminated path set at startup and never changed after.
    let exec = unsafe { std::ffi::CStr::from_ptr((&raw const pg_sys::my_exec_path).cast::<std::ffi::c_char>()) };
    let exec = std::path::PathBuf::from(exec.to_string_lossy().into_owned());
    exec.parent().map(|p| p.to_path_buf()).ok_or_else(|| format!("no directory in {}", exec.display()))
}

/// Where to look for `pg_dump`, in order of preference: this server's own, the directories of
/// `trompe.pg_dump_path`, then Debian's `/usr/lib/postgresql/<version>/bin` from
/// `source_major` on (the newest last: the closest version dumps most faithfully).
fn pg_dump_candidates(source_major: u32) -> Vec<std::path::PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(own) = bindir() {
        dirs.push(own);
    }
    if let Some(path) = crate::guc::PG_DUMP_PATH.get() {
        let path = path.to_string_lossy().into_owned();
        dirs.extend(path.split(':').map(str::trim).filter(|d| !d.is_empty()).map(std::path::PathBuf::from));
    }
    dirs.extend(
        (source_major..=source_major + 10).map(|v| std::path::PathBuf::from(format!("/usr/lib/postgresql/{v}/bin"))),
    );
    dirs.into_iter().map(|d| d.join("pg_dump")).filter(|p| p.is_file()).collect()
}

/// The major version of a `pg_dump` program, if it runs.
fn pg_dump_version(program: &std::path::Path) -> Option<u32> {
    let out = Command::new(program).arg("--version").stdin(Stdio::null()).output().ok()?;
    pg_dump_major(&String::from_utf8_lossy(&out.stdout))
}

/// A `pg_dump` that can read a server of major version `source_major`: pg_dump refuses
/// servers newer than itself, so a node joining from a newer server needs a newer pg_dump
/// than its own.
fn find_pg_dump(source_major: u32) -> Result<std::path::PathBuf, String> {
    let found: Vec<(std::path::PathBuf, u32)> =
        pg_dump_candidates(source_major).into_iter().filter_map(|p| pg_dump_version(&p).map(|v| (p, v))).collect();
    choose_pg_dump(&found, source_major).cloned().ok_or_else(|| {
        let seen: Vec<String> = found.iter().map(|(p, v)| format!("{} ({v})", p.display())).collect();
        format!(
            "no pg_dump of PostgreSQL {source_major} or newer found to read the peer's schema (found: {}): \
             install one, or name its directory in trompe.pg_dump_path",
            if seen.is_empty() { "none".to_string() } else { seen.join(", ") }
        )
    })
}

/// True if this server knows the parameter `name` (a dump of a newer pg_dump may set ones it
/// does not).
fn known_setting(name: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(name) else { return false };
    // SAFETY: looks a parameter up by a NUL-terminated name; missing_ok makes an unknown one
    // return NULL instead of raising an error. The returned string is not kept.
    unsafe { !pg_sys::GetConfigOption(name.as_ptr(), true, false).is_null() }
}

/// Why the peer's schema could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// No pg_dump new enough (the message says what was found).
    #[error("{0}")]
    NoPgDump(String),
    /// pg_dump has no pg_restore next to it.
    #[error("no pg_restore next to {0} (pg_restore of the same installation reads its archive)")]
    NoPgRestore(PathBuf),
    /// A program could not be started or waited for.
    #[error("cannot run {program}: {error}")]
    Spawn { program: String, error: std::io::Error },
    /// A program failed.
    #[error("{what} failed ({status}): {message}")]
    Failed { what: &'static str, status: std::process::ExitStatus, message: String },
    /// The directory for the archive could not be made or written.
    #[error("cannot write the peer's schema archive in {path}: {error}")]
    Files { path: PathBuf, error: std::io::Error },
    /// A program's output is not UTF-8.
    #[error("the output of {0} is not UTF-8")]
    NotUtf8(&'static str),
    /// The archive or pg_restore's output is not what pg_restore writes.
    #[error(transparent)]
    Dump(#[from] DumpError),
}

/// Reads a child's pipe to the end on a thread of its own (it never calls PostgreSQL), so that
/// a full pipe never stalls the child.
fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut out);
        }
        out
    })
}

/// Runs `command` to its end while answering interrupts, and returns its standard output;
/// `what` names it in errors, whose standard error text goes through `scrub`.
fn run(command: &mut Command, what: &'static str, scrub: impl Fn(&str) -> String) -> Result<Vec<u8>, SchemaError> {
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command.spawn().map_err(|error| SchemaError::Spawn { program: program.clone(), error })?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(error) => return Err(SchemaError::Spawn { program, error }),
        }
        // SAFETY: waits on this process's latch with a timeout, then handles interrupts
        // (a shutdown request ends the worker; pg_dump then ends with its connection).
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                POLL.as_millis() as std::ffi::c_long,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        pgrx::check_for_interrupts!();
    };
    let out = stdout.join().unwrap_or_default();
    let err = stderr.join().unwrap_or_default();
    if !status.success() {
        return Err(SchemaError::Failed { what, status, message: scrub(String::from_utf8_lossy(&err).trim()) });
    }
    Ok(out)
}

/// A directory of this server's own for the archive, removed when dropped. It is named as
/// PostgreSQL names temporary files, so that a crash leaves nothing behind after a restart.
struct WorkDir(PathBuf);

impl WorkDir {
    fn create() -> Result<WorkDir, SchemaError> {
        // SAFETY: DataDir is the NUL-terminated data directory, set at startup and never changed after.
        let data = unsafe { std::ffi::CStr::from_ptr(pg_sys::DataDir) }.to_string_lossy().into_owned();
        let path =
            Path::new(&data).join("base/pgsql_tmp").join(format!("pgsql_tmp_trompe_join_{}", std::process::id()));
        let files = |error| SchemaError::Files { path: path.clone(), error };
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(files)?;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(files)?;
        }
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700).create(&path).map_err(files)?;
        Ok(WorkDir(path))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `\restrict` key for pg_restore (letters and digits), the same for both of its runs.
fn restrict_key() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("trompe{:x}{nanos:x}", std::process::id())
}

/// Dumps the schema of the peer `info` connects to, as of the exported snapshot `snapshot`
/// (every schema but trompe's, and none of the objects `own` names), ready to run here;
/// `source_version` is the peer's `server_version_num`.
pub fn dump(info: &ConnInfo, snapshot: &str, source_version: i32, own: &OwnObjects) -> Result<SchemaScript, String> {
    read(info, snapshot, source_version, own).map_err(|e| e.to_string())
}

fn read(info: &ConnInfo, snapshot: &str, source_version: i32, own: &OwnObjects) -> Result<SchemaScript, SchemaError> {
    let pg_dump = find_pg_dump((source_version / 10000).max(0) as u32).map_err(SchemaError::NoPgDump)?;
    let pg_restore = pg_dump.with_file_name("pg_restore");
    if !pg_restore.is_file() {
        return Err(SchemaError::NoPgRestore(pg_dump));
    }
    let dir = WorkDir::create()?;
    let archive = dir.0.join("schema.dump");
    let list = dir.0.join("schema.list");
    let mut target = info.clone();
    // The password goes through the environment, never the command line (which `ps` shows).
    let password = target.take("password");
    let mut command = Command::new(&pg_dump);
    command
        .args(["--schema-only", "--format=custom", "--exclude-schema=trompe", "--no-password"])
        .arg(format!("--snapshot={snapshot}"))
        .arg(format!("--dbname={}", target.to_keyword_value()))
        .arg("--file")
        .arg(&archive);
    if let Some(password) = password {
        command.env("PGPASSWORD", password);
    }
    let scrub = |text: &str| crate::peer_calls::scrub(text, info);
    run(&mut command, "pg_dump of the peer's schema", scrub)?;
    let no_scrub = |text: &str| text.to_string();
    let listing = run(Command::new(&pg_restore).arg("--list").arg(&archive), "pg_restore --list", no_scrub)?;
    let listing = String::from_utf8(listing).map_err(|_| SchemaError::NotUtf8("pg_restore --list"))?;
    std::fs::write(&list, without_own_entries(&listing, own)?)
        .map_err(|error| SchemaError::Files { path: list.clone(), error })?;
    let help = run(Command::new(&pg_restore).arg("--help"), "pg_restore --help", no_scrub)?;
    let key = restore_has_restrict_key(&String::from_utf8_lossy(&help)).then(restrict_key);
    let sql = |clean: bool| -> Result<String, SchemaError> {
        let mut command = Command::new(&pg_restore);
        command.arg("--use-list").arg(&list).arg("--file=-");
        if let Some(key) = &key {
            command.arg(format!("--restrict-key={key}"));
        }
        if clean {
            command.args(["--clean", "--if-exists"]);
        }
        let out = run(command.arg(&archive), "pg_restore of the peer's schema", no_scrub)?;
        String::from_utf8(out).map_err(|_| SchemaError::NotUtf8("pg_restore"))
    };
    Ok(prepare(&sql(false)?, &sql(true)?, known_setting)?)
}
