//! Shared pieces of trompe's benchmarks: statistics and running pgbench.

pub mod memory;
pub mod plot;

use std::process::Command;
use std::time::Duration;

use trompe_tests::system::pg_bin;
use trompe_tests::{Cluster, Node};

/// The median of a sample.
pub fn median(values: &[f64]) -> f64 {
    percentile(values, 50.0)
}

/// The `p`th percentile (nearest rank) of a sample.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

/// The arithmetic mean.
pub fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// Runs pgbench against `node` as the superuser with `args` (connection options are added
/// here, the database last) and returns its output; panics with the output if it failed.
pub fn run_pgbench(node: &Node, args: &[&str]) -> String {
    let out = Command::new(pg_bin("pgbench"))
        .args(["-n", "-h", "127.0.0.1", "-U", "postgres", "-p", &node.port.to_string()])
        .args(args)
        .arg(trompe_tests::node::TEST_DB)
        .output()
        .expect("pgbench runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "pgbench failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    text
}

/// The number that follows `prefix` at the start of a line of pgbench's output (`"tps = "`,
/// `"number of transactions actually processed: "`).
pub fn pgbench_figure(output: &str, prefix: &str) -> f64 {
    output
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix(prefix)?;
            rest.split(|c: char| !(c.is_ascii_digit() || c == '.')).next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no {prefix:?} in pgbench output: {output}"))
}

/// Runs pgbench against `node` (TPC-B, prepared statements, no vacuum) and returns its TPS.
pub fn pgbench(node: &Node, clients: u32, duration: Duration) -> f64 {
    let (clients, secs) = (clients.to_string(), duration.as_secs().to_string());
    let out = run_pgbench(node, &["-M", "prepared", "-c", &clients, "-j", &clients, "-T", &secs]);
    pgbench_figure(&out, "tps = ")
}

/// Runs a custom pgbench script against `node` for `duration`, throttled to `rate`
/// transactions per second if given; returns the TPS.
pub fn pgbench_script(
    node: &Node,
    clients: u32,
    duration: Duration,
    script: &std::path::Path,
    rate: Option<f64>,
) -> f64 {
    let (clients, secs) = (clients.to_string(), duration.as_secs().to_string());
    let script = script.to_string_lossy();
    let rate = rate.map(|r| format!("{r:.0}"));
    let mut args = vec!["-M", "prepared", "-c", &clients, "-j", &clients, "-T", &secs, "-f", &script];
    if let Some(r) = &rate {
        args.extend(["-R", r.as_str()]);
    }
    pgbench_figure(&run_pgbench(node, &args), "tps = ")
}

/// Reads a duration in seconds from the environment, with a default.
pub fn env_secs(name: &str, default: u64) -> Duration {
    Duration::from_secs(std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default))
}

/// Reads a count from the environment, with a default.
pub fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Two nodes without trompe, ready for PostgreSQL's own logical replication (`wal_level =
/// logical`), with the shared buffers the benchmarks give trompe's nodes too: the baseline's
/// cluster.
pub fn native_pair(name: &str) -> Cluster {
    Cluster::builder(name)
        .nodes(2)
        .with_extension(false)
        .setting("wal_level", "logical")
        .setting("shared_buffers", "256MB")
        .start()
}
