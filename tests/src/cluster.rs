//! A set of real PostgreSQL nodes for one test, with a proxy on every directed link between
//! them, cleaned up when the test ends (also when it fails, after printing the server logs).

use std::fs;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::node::{path_str, Node};
use crate::proxy::Proxy;
use crate::system::{make_postgres_dir, pg_bindir, run_as_postgres, scratch_root, template_datadir_for};

/// Options for a cluster.
pub struct ClusterBuilder {
    name: String,
    nodes: usize,
    extension: bool,
    settings: Vec<(String, String)>,
    env: Vec<(String, String)>,
    clock_offsets: Vec<(usize, String)>,
    bindirs: Vec<(usize, PathBuf)>,
}

impl ClusterBuilder {
    /// Runs node `i`'s server with its clock off by `offset` (libfaketime syntax: `+3s`, `-3s`),
    /// from its first start on.
    pub fn clock_offset(mut self, i: usize, offset: &str) -> Self {
        self.clock_offsets.push((i, offset.to_string()));
        self
    }

    /// Sets how many nodes to start (default 2).
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }

    /// Whether to run `CREATE EXTENSION trompe` in the test database of every node (default yes).
    pub fn with_extension(mut self, yes: bool) -> Self {
        self.extension = yes;
        self
    }

    /// Adds a postgresql.conf setting to every node (the value as written in the file).
    pub fn setting(mut self, key: &str, value: &str) -> Self {
        self.settings.push((key.to_string(), value.to_string()));
        self
    }

    /// Sets an environment variable for every node's server (e.g. `LANGUAGE`, which picks the
    /// language of its messages when `lc_messages` is not `C`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Runs node `i` on the PostgreSQL installation whose binaries are in `bindir` (with trompe
    /// installed) instead of the default one (`TROMPE_PG_BIN`).
    pub fn node_bindir(mut self, i: usize, bindir: PathBuf) -> Self {
        self.bindirs.push((i, bindir));
        self
    }

    /// Creates and starts the nodes.
    pub fn start(self) -> Cluster {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let root = scratch_root().join(format!("{}-{}", self.name, SEQ.fetch_add(1, Ordering::SeqCst)));
        let _ = fs::remove_dir_all(&root);
        make_postgres_dir(&root);
        let mut cluster = Cluster { name: self.name.clone(), root, nodes: Vec::new(), links: Vec::new() };
        for i in 0..self.nodes {
            let bindir =
                self.bindirs.iter().rev().find(|(n, _)| *n == i).map(|(_, d)| d.clone()).unwrap_or_else(pg_bindir);
            let offset = self.clock_offsets.iter().find(|(n, _)| *n == i).map(|(_, o)| o.clone());
            let node = start_node(&format!("n{}", i + 1), &cluster.root, &bindir, &self.settings, &self.env, offset);
            cluster.nodes.push(node);
        }
        for from in 0..self.nodes {
            let row = (0..self.nodes).map(|to| (from != to).then(|| Proxy::start(cluster.nodes[to].port))).collect();
            cluster.links.push(row);
        }
        if self.extension {
            for node in &cluster.nodes {
                node.exec("CREATE EXTENSION trompe");
            }
        }
        cluster
    }
}

/// Starts a node on a free port, trying another port if the one picked was taken meanwhile.
fn start_node(
    name: &str,
    root: &std::path::Path,
    bindir: &std::path::Path,
    settings: &[(String, String)],
    env: &[(String, String)],
    clock_offset: Option<String>,
) -> Node {
    let template = template_datadir_for(bindir);
    let mut last_error = String::new();
    for _ in 0..5 {
        let port = free_port();
        let mut node = Node::create(name, root, bindir, &template, port, settings);
        node.env = env.to_vec();
        node.clock_offset = clock_offset.clone();
        match node.try_start() {
            Ok(()) => return node,
            Err(e) => {
                last_error = format!("{e}\n{}", node.log_tail(30));
                let _ = fs::remove_dir_all(&node.datadir);
            }
        }
    }
    panic!("node {name} did not start: {last_error}");
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("can bind a port");
    listener.local_addr().expect("bound address").port()
}

/// Real nodes for one test. Index nodes from 0; node `i` is named `n{i+1}`.
pub struct Cluster {
    name: String,
    root: PathBuf,
    nodes: Vec<Node>,
    links: Vec<Vec<Option<Proxy>>>,
}

impl Cluster {
    /// Options for a cluster named `name` (used for its directory and kept logs).
    pub fn builder(name: &str) -> ClusterBuilder {
        ClusterBuilder {
            name: name.to_string(),
            nodes: 2,
            extension: true,
            settings: Vec::new(),
            env: Vec::new(),
            clock_offsets: Vec::new(),
            bindirs: Vec::new(),
        }
    }

    /// `n` started nodes with trompe created in the test database.
    pub fn start(name: &str, n: usize) -> Cluster {
        Cluster::builder(name).nodes(n).start()
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// All nodes.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The proxy of the directed link `from` → `to`: what `from` uses to reach `to`.
    pub fn link(&self, from: usize, to: usize) -> &Proxy {
        self.links[from][to].as_ref().expect("no link from a node to itself")
    }

    /// Resets the link `from` → `to` and refuses new connections on it.
    pub fn cut(&self, from: usize, to: usize) {
        self.link(from, to).cut();
    }

    /// Cuts both directions between `a` and `b`.
    pub fn partition(&self, a: usize, b: usize) {
        self.cut(a, b);
        self.cut(b, a);
    }

    /// Restores both directions between `a` and `b`.
    pub fn heal_pair(&self, a: usize, b: usize) {
        self.link(a, b).heal();
        self.link(b, a).heal();
    }

    /// The connection string node `from` uses to reach node `to` (through their link's proxy).
    pub fn peer_conninfo(&self, from: usize, to: usize) -> String {
        format!("host=127.0.0.1 port={} dbname={} user=postgres", self.link(from, to).port, crate::node::TEST_DB)
    }

    /// Makes node `from` pull from node `to` (`trompe.add_peer` on `from`, named after `to`).
    pub fn add_peer(&self, from: usize, to: usize) {
        let sql = format!("SELECT trompe.add_peer('{}', '{}')", self.nodes[to].name, self.peer_conninfo(from, to));
        self.nodes[from].exec(&sql);
    }

    /// Full mesh: every node pulls from every other node.
    pub fn mesh(&self) {
        for from in 0..self.nodes.len() {
            for to in 0..self.nodes.len() {
                if from != to {
                    self.add_peer(from, to);
                }
            }
        }
    }

    /// Runs the same statements on every node.
    pub fn exec_all(&self, sql: &str) {
        for node in &self.nodes {
            node.exec(sql);
        }
    }

    /// Asserts that `trompe.wait_sync` returns true on every node within `timeout`.
    ///
    /// It calls `wait_sync` for two seconds at a time: a call's transaction holds a snapshot,
    /// which a `CREATE INDEX CONCURRENTLY` being replayed on that node waits for.
    pub fn wait_sync(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        for node in &self.nodes {
            let synced = crate::wait::wait_for(deadline.saturating_duration_since(std::time::Instant::now()), || {
                node.query_text("SELECT trompe.wait_sync(interval '2 seconds')").as_deref() == Some("t")
            });
            assert!(synced, "trompe.wait_sync timed out on node {}", node.name);
        }
    }

    /// Runs `sql` (one text value) on every node and asserts all nodes return the same; returns it.
    pub fn assert_same(&self, sql: &str) -> Option<String> {
        let values: Vec<Option<String>> = self.nodes.iter().map(|n| n.query_text(sql)).collect();
        for (node, v) in self.nodes.iter().zip(&values) {
            assert_eq!(
                v, &values[0],
                "nodes differ on `{sql}`: {} has {v:?}, {} has {:?}",
                node.name, self.nodes[0].name, values[0]
            );
        }
        values.into_iter().next().flatten()
    }

    /// Writes `contents` to `file` next to the kept server logs (for what a failing test
    /// wants to keep: dumps of diverging data); returns the path.
    pub fn keep_file(&self, file: &str, contents: &str) -> PathBuf {
        let keep = self.kept_logs_dir();
        let _ = fs::create_dir_all(&keep);
        let path = keep.join(file);
        let _ = fs::write(&path, contents);
        path
    }

    /// Where logs of a failed run are kept.
    fn kept_logs_dir(&self) -> PathBuf {
        let base = std::env::var_os("TROMPE_FAILED_LOGS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/failed-test-logs"));
        base.join(&self.name)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let keep_always = std::env::var_os("TROMPE_KEEP_LOGS").is_some();
        if keep_always && !std::thread::panicking() {
            let keep = self.kept_logs_dir();
            let _ = fs::create_dir_all(&keep);
            for node in &self.nodes {
                let _ = fs::copy(&node.logfile, keep.join(format!("{}.log", node.name)));
            }
        }
        if std::thread::panicking() {
            let keep = self.kept_logs_dir();
            let _ = fs::create_dir_all(&keep);
            for node in &self.nodes {
                eprintln!("\n===== server log of node {} (last 150 lines) =====\n{}", node.name, node.log_tail(150));
                let _ = fs::copy(&node.logfile, keep.join(format!("{}.log", node.name)));
            }
            eprintln!("===== full logs kept in {} =====", keep.display());
        }
        self.links.clear();
        for node in &self.nodes {
            let _ = run_as_postgres(
                &node.pg_bin("pg_ctl"),
                &["stop", "-w", "-m", "immediate", "-D", path_str(&node.datadir)],
            );
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}
