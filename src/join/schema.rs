//! Reading a peer's schema for a joining node: `pg_dump --schema-only` run by the worker
//! against the peer, inside the snapshot the data is copied from (`--snapshot`), so that the
//! schema and the rows match and every later DDL arrives through the peer's log.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use pgrx::pg_sys;
use trompe_core::conninfo::ConnInfo;
use trompe_core::dump::{choose_pg_dump, pg_dump_major, prepare_for, SchemaScript};

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

/// Dumps the schema of the peer `info` connects to, as of the exported snapshot `snapshot`
/// (every schema but trompe's), ready to run here; `source_version` is the peer's
/// `server_version_num`.
pub fn dump(info: &ConnInfo, snapshot: &str, source_version: i32) -> Result<SchemaScript, String> {
    let program = find_pg_dump((source_version / 10000).max(0) as u32)?;
    let mut target = info.clone();
    // The password goes through the environment, never the command line (which `ps` shows).
    let password = target.take("password");
    let mut command = Command::new(&program);
    command
        .args(["--schema-only", "--clean", "--if-exists", "--exclude-schema=trompe", "--no-password"])
        .arg(format!("--snapshot={snapshot}"))
        .arg(format!("--dbname={}", target.to_keyword_value()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(password) = password {
        command.env("PGPASSWORD", password);
    }
    let mut child = command.spawn().map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(format!("waiting for pg_dump: {e}")),
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
    let out = stdout.join().map_err(|_| "reading pg_dump's output failed".to_string())?;
    let err = stderr.join().unwrap_or_default();
    if !status.success() {
        let message = crate::peer_calls::scrub(String::from_utf8_lossy(&err).trim(), info);
        return Err(format!("pg_dump of the peer's schema failed ({status}): {message}"));
    }
    let text = String::from_utf8(out).map_err(|_| "pg_dump's output is not UTF-8".to_string())?;
    prepare_for(&text, known_setting).map_err(|e| e.to_string())
}
