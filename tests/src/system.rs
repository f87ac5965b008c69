//! The host side of the harness: PostgreSQL binaries, running them as the `postgres` user, and
//! the initialised data directory every node is copied from.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// A command that failed, with what it printed.
#[derive(Debug)]
pub struct RunError(pub String);

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The directory with PostgreSQL's server binaries (`TROMPE_PG_BIN`, else PostgreSQL 15's).
pub fn pg_bindir() -> PathBuf {
    std::env::var_os("TROMPE_PG_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

/// The path of one PostgreSQL binary.
pub fn pg_bin(name: &str) -> String {
    pg_bin_in(&pg_bindir(), name)
}

/// The path of one binary of the PostgreSQL installation whose binaries are in `bindir`.
pub fn pg_bin_in(bindir: &Path, name: &str) -> String {
    bindir.join(name).to_string_lossy().into_owned()
}

/// The major version of the PostgreSQL installation in `bindir` (from its `pg_config`).
pub fn pg_major(bindir: &Path) -> u32 {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, u32>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    *cache.entry(bindir.to_path_buf()).or_insert_with(|| {
        let out = Command::new(pg_bin_in(bindir, "pg_config"))
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("cannot run pg_config of {}: {e}", bindir.display()));
        // "PostgreSQL 18.4", "PostgreSQL 15.20 (Debian 15.20-0+deb12u1)"
        let text = String::from_utf8_lossy(&out.stdout);
        let version = text.split_whitespace().nth(1).unwrap_or_default();
        let digits: String = version.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().unwrap_or_else(|_| panic!("pg_config of {} says {text:?}", bindir.display()))
    })
}

/// The bin directory of an installation of PostgreSQL `major` with trompe installed:
/// `TROMPE_PG<major>_BIN` (as `scripts/test` sets them for the mixed-version tests), else the
/// default one (`TROMPE_PG_BIN`) if it is that version.
pub fn bindir_for_major(major: u32) -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(format!("TROMPE_PG{major}_BIN")) {
        return Some(PathBuf::from(dir));
    }
    let default = pg_bindir();
    (default.join("pg_config").exists() && pg_major(&default) == major).then_some(default)
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { geteuid() == 0 }
}

extern "C" {
    fn geteuid() -> u32;
}

/// A command that runs `program` as the `postgres` user (through `runuser` when we are root).
pub fn postgres_command(program: &str) -> Command {
    let mut cmd = if running_as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", program]);
        c
    } else {
        Command::new(program)
    };
    cmd.current_dir("/");
    // Servers run as users run them: a test runner's RUST_BACKTRACE would make pgrx append a
    // Rust backtrace to every error the extension reports.
    cmd.env_remove("RUST_BACKTRACE").env_remove("RUST_LIB_BACKTRACE");
    cmd
}

/// Runs a program as the `postgres` user and returns its stdout.
pub fn run_as_postgres(program: &str, args: &[&str]) -> Result<String, RunError> {
    let out = postgres_command(program).args(args).output().map_err(|e| RunError(format!("{program}: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(RunError(format!(
            "{program} {} exited with {}: {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

/// Creates a directory the `postgres` user owns.
pub fn make_postgres_dir(path: &Path) {
    fs::create_dir_all(path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    if running_as_root() {
        let status = Command::new("chown").args(["postgres:postgres"]).arg(path).status().expect("chown runs");
        assert!(status.success(), "chown of {} failed", path.display());
    }
}

/// Where the server looks for extensions' control and script files.
pub fn extension_dir() -> PathBuf {
    extension_dir_in(&pg_bindir())
}

/// Where the server of the installation in `bindir` looks for extensions.
pub fn extension_dir_in(bindir: &Path) -> PathBuf {
    let sharedir = Command::new(pg_bin_in(bindir, "pg_config")).arg("--sharedir").output();
    let sharedir = match sharedir {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => "/usr/share/postgresql/15".to_string(),
    };
    Path::new(&sharedir).join("extension")
}

/// True if the extension `name` (e.g. contrib's `lo`) is installed in the default
/// installation: the PostgreSQL 16 and 18 used here come without contrib.
pub fn has_extension(name: &str) -> bool {
    extension_dir().join(format!("{name}.control")).exists()
}

/// Checks that the trompe extension is installed where the server of `bindir` looks for it.
pub fn check_extension_installed(bindir: &Path) {
    let control = extension_dir_in(bindir).join("trompe.control");
    assert!(
        control.exists(),
        "the trompe extension is not installed ({} is missing): run scripts/test, or scripts/install",
        control.display()
    );
}

/// The scratch directory of this test process; removed by `scripts/test` before each run.
pub fn scratch_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let base = std::env::var_os("TROMPE_TEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp/trompe-tests"));
        make_postgres_dir(&base);
        let root = base.join(format!("p{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        make_postgres_dir(&root);
        root
    })
}

/// An initialised data directory of the default installation with the test database, created
/// once per test process.
pub fn template_datadir() -> PathBuf {
    template_datadir_for(&pg_bindir())
}

/// An initialised data directory of the installation in `bindir` with the test database,
/// created once per test process and installation.
pub fn template_datadir_for(bindir: &Path) -> PathBuf {
    static TEMPLATES: OnceLock<Mutex<HashMap<PathBuf, PathBuf>>> = OnceLock::new();
    let templates = TEMPLATES.get_or_init(|| Mutex::new(HashMap::new()));
    // Held while initdb runs: tests that start at once wait for one template.
    let mut templates = templates.lock().unwrap_or_else(|e| e.into_inner());
    let n = templates.len();
    templates
        .entry(bindir.to_path_buf())
        .or_insert_with(|| {
            let name = if n == 0 { "template".to_string() } else { format!("template{n}") };
            create_template(bindir, &scratch_root().join(name))
        })
        .clone()
}

/// Runs initdb for the installation in `bindir` into `dir` and creates the test database.
fn create_template(bindir: &Path, dir: &Path) -> PathBuf {
    check_extension_installed(bindir);
    let dir_s = dir.to_string_lossy().into_owned();
    run_as_postgres(
        &pg_bin_in(bindir, "initdb"),
        &["-D", &dir_s, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"],
    )
    .unwrap_or_else(|e| panic!("initdb failed: {e}"));
    // Create the test database in single-user mode: no port needed, nothing to clean up.
    let mut child = postgres_command(&pg_bin_in(bindir, "postgres"));
    child
        .args(["--single", "-D", &dir_s, "postgres"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut proc = child.spawn().expect("postgres --single starts");
    {
        use std::io::Write;
        let stdin = proc.stdin.as_mut().expect("stdin piped");
        stdin.write_all(format!("CREATE DATABASE {};\n", crate::node::TEST_DB).as_bytes()).expect("write");
    }
    let out = proc.wait_with_output().expect("postgres --single finishes");
    assert!(out.status.success(), "creating the test database failed: {}", String::from_utf8_lossy(&out.stderr));
    dir.to_path_buf()
}
