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

/// Runs pgbench against `node` (TPC-B, prepared statements, no vacuum) and returns its TPS.
pub fn pgbench(node: &Node, clients: u32, duration: Duration) -> f64 {
    let out = Command::new(pg_bin("pgbench"))
        .args(["-n", "-M", "prepared", "-h", "127.0.0.1", "-U", "postgres"])
        .args(["-p", &node.port.to_string(), "-c", &clients.to_string(), "-j", &clients.to_string()])
        .args(["-T", &duration.as_secs().to_string(), trompe_tests::node::TEST_DB])
        .output()
        .expect("pgbench runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pgbench failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    text.lines()
        .find_map(|l| l.strip_prefix("tps = ").and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse().ok()))
        .unwrap_or_else(|| panic!("no tps in pgbench output: {text}"))
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
    let mut cmd = Command::new(pg_bin("pgbench"));
    cmd.args(["-n", "-M", "prepared", "-h", "127.0.0.1", "-U", "postgres"])
        .args(["-p", &node.port.to_string(), "-c", &clients.to_string(), "-j", &clients.to_string()])
        .args(["-T", &duration.as_secs().to_string(), "-f"])
        .arg(script);
    if let Some(r) = rate {
        cmd.args(["-R", &format!("{r:.0}")]);
    }
    let out = cmd.arg(trompe_tests::node::TEST_DB).output().expect("pgbench runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pgbench failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    text.lines()
        .find_map(|l| l.strip_prefix("tps = ").and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse().ok()))
        .unwrap_or_else(|| panic!("no tps in pgbench output: {text}"))
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
