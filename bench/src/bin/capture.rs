//! bench/capture: what change capture costs writers. pgbench TPC-B (scale 10, 2 clients) on one
//! node, four ways in one run, alternating: no capture, a row trigger that does nothing (the
//! floor any trigger-based capture pays: PostgreSQL's AFTER-row-trigger queue and a function
//! call per row), trompe's capture, and a PL/pgSQL trigger writing `to_jsonb(NEW)` into a log
//! table (what trigger-based replicators traditionally do). Every variant has a bigserial
//! primary key on pgbench_history; trompe logs as with a peer attached (a second node pulls
//! from this one, paused, so the log is kept). It runs twice: with PostgreSQL's default
//! synchronous commits, then with `synchronous_commit = off` (CPU-bound, far less noisy).
//! Prints the TPS of each run and, per mode, the ratios against no capture (of the medians,
//! and the median of each round's own ratio) and trompe's cost as a multiple of the no-op
//! trigger's. Knobs: BENCH_SECONDS (20 per run), BENCH_ROUNDS (5), BENCH_CLIENTS (2),
//! BENCH_MODES (`sync,async`).

use trompe_bench::{env_count, env_secs, median, pgbench};
use trompe_tests::Cluster;

const TABLES: [&str; 4] = ["pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history"];

fn set_variant(node: &trompe_tests::Node, variant: &str) {
    let mut sql = String::new();
    for t in TABLES {
        sql += &format!("SELECT trompe.remove_table('{t}'); DROP TRIGGER IF EXISTS plpgsql_log ON {t};");
    }
    match variant {
        "trompe" => {
            for t in TABLES {
                sql += &format!("SELECT trompe.add_table('{t}');");
            }
        }
        "plpgsql" | "no-op" => {
            let function = if variant == "plpgsql" { "plpgsql_log" } else { "noop_trigger" };
            for t in TABLES {
                sql += &format!(
                    "CREATE TRIGGER plpgsql_log AFTER INSERT OR UPDATE OR DELETE ON {t} FOR EACH ROW EXECUTE FUNCTION {function}();"
                );
            }
        }
        _ => {}
    }
    node.exec(&sql);
    node.exec("TRUNCATE plpgsql_changes; CHECKPOINT");
    let mut c = node.connect();
    c.batch_execute("VACUUM ANALYZE").expect("vacuum");
}

fn main() {
    let duration = env_secs("BENCH_SECONDS", 20);
    let rounds = env_count("BENCH_ROUNDS", 5);
    let clients = env_count("BENCH_CLIENTS", 2) as u32;
    // PostgreSQL's defaults for everything that affects write speed (the harness turns fsync
    // and full-page writes off to speed tests up).
    let cluster = Cluster::builder("bench-capture")
        .nodes(2)
        .setting("fsync", "on")
        .setting("full_page_writes", "on")
        .setting("shared_buffers", "128MB")
        .start();
    let node = cluster.node(0);
    let init = std::process::Command::new(trompe_tests::system::pg_bin("pgbench"))
        .args(["-i", "-q", "-s", "10", "-h", "127.0.0.1", "-U", "postgres", "-p", &node.port.to_string(), "app"])
        .output()
        .expect("pgbench -i runs");
    assert!(init.status.success(), "pgbench -i failed: {}", String::from_utf8_lossy(&init.stderr));
    node.exec(
        "ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY;
         CREATE TABLE plpgsql_changes (id bigserial PRIMARY KEY, tbl text, op text, data jsonb, at timestamptz DEFAULT now());
         CREATE FUNCTION plpgsql_log() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO plpgsql_changes (tbl, op, data) VALUES (TG_TABLE_NAME, TG_OP, to_jsonb(NEW));
             RETURN NULL;
         END $$;
         CREATE FUNCTION noop_trigger() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;",
    );
    // A peer that pulls from this node but is paused: the log is kept as for a real peer.
    cluster.add_peer(1, 0);
    cluster.node(1).exec("SELECT trompe.pause_peer('n1')");

    let variants = ["none", "no-op", "trompe", "plpgsql"];
    let modes = std::env::var("BENCH_MODES").unwrap_or_else(|_| "sync,async".into());
    println!(
        "bench/capture: pgbench TPC-B scale 10, {clients} clients, {}s per run, {rounds} rounds",
        duration.as_secs()
    );
    for mode in modes.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        let setting = match mode {
            "sync" => "on",
            "async" => "off",
            other => panic!("BENCH_MODES: unknown mode {other:?} (sync, async)"),
        };
        node.exec(&format!("ALTER SYSTEM SET synchronous_commit = {setting}"));
        node.exec("SELECT pg_reload_conf()");
        println!("synchronous_commit = {setting}:");
        let tps = run_rounds(node, &variants, rounds, clients, duration);
        report(&variants, &tps, rounds);
    }
    println!("  log rows written by trompe: {}", node.query_i64("SELECT count(*) FROM trompe.log"));
}

/// Runs every variant once per round, each round in a different order (so that whatever drifts
/// during a run, checkpoints or the machine's other load, favours no variant); the TPS of each
/// variant's runs.
fn run_rounds(
    node: &trompe_tests::Node,
    variants: &[&str],
    rounds: usize,
    clients: u32,
    duration: std::time::Duration,
) -> Vec<Vec<f64>> {
    let mut tps: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for round in 0..rounds {
        for k in 0..variants.len() {
            let i = (round + k) % variants.len();
            set_variant(node, variants[i]);
            let t = pgbench(node, clients, duration);
            println!("  round {} {:>8}: {:8.1} tps", round + 1, variants[i], t);
            tps[i].push(t);
        }
    }
    tps
}

/// Prints each variant's ratios against no capture (the first), and trompe's cost (1 - ratio)
/// as a multiple of the no-op trigger's.
fn report(variants: &[&str], tps: &[Vec<f64>], rounds: usize) {
    let base = median(&tps[0]);
    println!(
        "  results (median of {rounds} runs; ratio against no capture, and the median of the ratios \
         within each round, less exposed to the machine's drift):"
    );
    let mut per_round_ratio = Vec::new();
    for (i, v) in variants.iter().enumerate() {
        let per_round: Vec<f64> = tps[i].iter().zip(&tps[0]).map(|(t, none)| t / none).collect();
        per_round_ratio.push(median(&per_round));
        println!(
            "  {:>8}: {:8.1} tps  ratio {:.3}  per round {:.3}",
            v,
            median(&tps[i]),
            median(&tps[i]) / base,
            median(&per_round)
        );
    }
    let cost = |name: &str| variants.iter().position(|v| *v == name).map(|i| 1.0 - per_round_ratio[i]);
    if let (Some(trompe), Some(noop)) = (cost("trompe"), cost("no-op")) {
        println!(
            "  trompe's cost / the no-op trigger's (per-round ratios): {:.3} / {:.3} = {:.1}x",
            trompe,
            noop,
            trompe / noop.max(1e-3)
        );
    }
}
