//! Peak memory of server processes while a benchmark runs: private resident memory (RssAnon in
//! /proc/PID/status) sampled every 20 ms, so shared buffers a process touches do not count.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use trompe_tests::{wait_for, Node};

/// The private resident memory of process `pid`, in kB (None once it has gone).
pub fn rss_anon_kb(pid: i64) -> Option<i64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("RssAnon:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Samples the private memory of some processes until finished.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    base: Vec<i64>,
    handle: JoinHandle<Vec<i64>>,
}

impl Sampler {
    /// Starts sampling `pids`, taking their memory now as the base.
    pub fn start(pids: Vec<i64>) -> Sampler {
        let base = pids.iter().map(|p| rss_anon_kb(*p).unwrap_or(0)).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peaks = vec![0i64; pids.len()];
            loop {
                for (peak, pid) in peaks.iter_mut().zip(&pids) {
                    *peak = (*peak).max(rss_anon_kb(*pid).unwrap_or(0));
                }
                if flag.load(Ordering::Acquire) {
                    return peaks;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Sampler { stop, base, handle }
    }

    /// Stops sampling; returns each process's peak growth over its base, in MB.
    pub fn finish(self) -> Vec<f64> {
        self.stop.store(true, Ordering::Release);
        let peaks = self.handle.join().expect("sampler");
        peaks.iter().zip(&self.base).map(|(p, b)| (p - b).max(0) as f64 / 1024.0).collect()
    }
}

/// The pid of the one process of `node` that `filter` (a WHERE clause on pg_stat_activity)
/// selects, once there is exactly one.
pub fn pid_of(node: &Node, filter: &str) -> i64 {
    let sql = format!("SELECT count(*) FROM pg_stat_activity WHERE {filter}");
    assert!(wait_for(Duration::from_secs(60), || node.query_i64(&sql) == 1), "no single process where {filter}");
    node.query_i64(&format!("SELECT pid FROM pg_stat_activity WHERE {filter}"))
}

/// The filter (for [`pid_of`]) selecting the backend that serves a trompe worker's pulls.
pub const TROMPE_SERVING: &str = "application_name = 'trompe' AND backend_type = 'client backend'";
/// The filter selecting a node's trompe worker.
pub const TROMPE_APPLYING: &str = "backend_type = 'trompe worker'";
/// The filter selecting the walsender of subscription `bench`.
pub const NATIVE_SERVING: &str = "backend_type = 'walsender' AND application_name = 'bench'";
/// The filter selecting the apply worker of a native subscription.
pub const NATIVE_APPLYING: &str = "backend_type = 'logical replication worker'";
