//! bench/capture: what change capture costs writers. pgbench TPC-B (scale 10, 2 clients) on one
//! node, three ways in one run, alternating: no capture, trompe's capture, and a PL/pgSQL
//! trigger writing `to_jsonb(NEW)` into a log table (what trigger-based replicators
//! traditionally do). Every variant has a bigserial primary key on pgbench_history; trompe
//! logs as with a peer attached (a second node pulls from this one, paused, so the log is
//! kept). Prints the TPS of each run and the ratios against no capture: of the medians, and
//! the median of each round's own ratio. Knobs: BENCH_SECONDS (20 per run), BENCH_ROUNDS (5),
//! BENCH_CLIENTS (2).

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
        "plpgsql" => {
            for t in TABLES {
                sql += &format!(
                    "CREATE TRIGGER plpgsql_log AFTER INSERT OR UPDATE OR DELETE ON {t} FOR EACH ROW EXECUTE FUNCTION plpgsql_log();"
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
         END $$;",
    );
    // A peer that pulls from this node but is paused: the log is kept as for a real peer.
    cluster.add_peer(1, 0);
    cluster.node(1).exec("SELECT trompe.pause_peer('n1')");

    let variants = ["none", "trompe", "plpgsql"];
    let mut tps: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    println!(
        "bench/capture: pgbench TPC-B scale 10, {clients} clients, {}s per run, {rounds} rounds",
        duration.as_secs()
    );
    // Each round runs the three variants in a different order, so that whatever drifts during
    // a run (checkpoints, the machine's other load) does not favour one variant.
    for round in 0..rounds {
        for k in 0..variants.len() {
            let i = (round + k) % variants.len();
            set_variant(node, variants[i]);
            let t = pgbench(node, clients, duration);
            println!("  round {} {:>8}: {:8.1} tps", round + 1, variants[i], t);
            tps[i].push(t);
        }
    }
    let base = median(&tps[0]);
    println!(
        "bench/capture results (median of {rounds} runs; ratio against no capture, and the median of the \
         ratios within each round, less exposed to the machine's drift):"
    );
    for (i, v) in variants.iter().enumerate() {
        let per_round: Vec<f64> = tps[i].iter().zip(&tps[0]).map(|(t, none)| t / none).collect();
        println!(
            "  {:>8}: {:8.1} tps  ratio {:.3}  per round {:.3}",
            v,
            median(&tps[i]),
            median(&tps[i]) / base,
            median(&per_round)
        );
    }
    println!("  log rows written by trompe: {}", node.query_i64("SELECT count(*) FROM trompe.log"));
}
