//! Reading a peer's schema for a joining node: `pg_dump --schema-only` run by the worker
//! against the peer, inside the snapshot the data is copied from (`--snapshot`), so that the
//! schema and the rows match and every later DDL arrives through the peer's log.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use pgrx::pg_sys;
use trompe_core::conninfo::ConnInfo;
use trompe_core::dump::{prepare, SchemaScript};

/// How often the worker looks whether pg_dump has finished (it answers signals meanwhile).
const POLL: Duration = Duration::from_millis(100);

/// The directory of this server's programs (pg_dump is installed next to postgres).
fn bindir() -> Result<std::path::PathBuf, String> {
    // SAFETY: my_exec_path is a NUL-terminated path set at startup and never changed after.
    let exec = unsafe { std::ffi::CStr::from_ptr((&raw const pg_sys::my_exec_path).cast::<std::ffi::c_char>()) };
    let exec = std::path::PathBuf::from(exec.to_string_lossy().into_owned());
    exec.parent().map(|p| p.to_path_buf()).ok_or_else(|| format!("no directory in {}", exec.display()))
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
/// (every schema but trompe's), ready to run here.
pub fn dump(info: &ConnInfo, snapshot: &str) -> Result<SchemaScript, String> {
    let program = bindir()?.join("pg_dump");
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
        let message = crate::peers::scrub(String::from_utf8_lossy(&err).trim(), info);
        return Err(format!("pg_dump of the peer's schema failed ({status}): {message}"));
    }
    let text = String::from_utf8(out).map_err(|_| "pg_dump's output is not UTF-8".to_string())?;
    prepare(&text).map_err(|e| e.to_string())
}
