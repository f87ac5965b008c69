//! Compare and repair: `trompe.compare(peer)` tells, per replicated table, which rows differ
//! from a peer's, by hashing buckets of rows on both nodes and listing only the buckets that
//! differ; `trompe.repair(peer)` then makes this node's differing rows the peer's, with
//! ordinary (captured, replicated) writes recorded in `trompe.repairs`.

use std::time::Duration;

use pgrx::prelude::*;
use pgrx::PgRelation;
use trompe_core::compare::{bucket_count, diff_rows, differing_buckets, BucketDigest, RowDiff};
use trompe_core::conninfo::ConnInfo;
use trompe_core::pgarray::format_text_array;

use crate::error::{OrRaise, TrompeError};
use crate::large_objects;
use crate::libpq::{result_wait, send_wait, Conn, PgResult, PqError};
use crate::peer_calls::{connect_peer, peer_conninfo, scrub};
use crate::run_as::as_extension_owner;
use crate::sql;

/// How long one query on the peer may take (hashing a large table takes a while); the wait
/// can be cancelled like any query.
const PEER_QUERY_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
/// Rows fetched from the peer and written here per statement during a repair.
const REPAIR_BATCH: usize = 1000;

/// A connection to a peer inside one repeatable-read, read-only transaction, so that every
/// digest and row read from it comes from one snapshot.
struct PeerSnapshot {
    conn: Conn,
    name: String,
    info: ConnInfo,
}

impl PeerSnapshot {
    fn open(name: &str) -> Result<Self, TrompeError> {
        let conninfo =
            as_extension_owner(|| sql::value("SELECT conninfo FROM trompe.peers WHERE name = $1", &[Some(name)]))
                .map_err(TrompeError::Internal)?
                .ok_or_else(|| TrompeError::NoSuchPeer(name.to_string()))?;
        let info = peer_conninfo(&conninfo)?;
        let conn = connect_peer(name, &info)?;
        let mut peer = PeerSnapshot { conn, name: name.to_string(), info };
        peer.query("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY", &[])?;
        Ok(peer)
    }

    fn query(&mut self, sql: &str, params: &[Option<&str>]) -> Result<PgResult, TrompeError> {
        self.send(sql, params)?;
        self.result()
    }

    /// Starts a query on the peer; its result is collected with `result`, so that this node
    /// can work meanwhile.
    fn send(&mut self, sql: &str, params: &[Option<&str>]) -> Result<(), TrompeError> {
        send_wait(&mut self.conn, sql, params, PEER_QUERY_TIMEOUT).map_err(|e| self.failed(e))
    }

    fn result(&mut self) -> Result<PgResult, TrompeError> {
        result_wait(&mut self.conn, PEER_QUERY_TIMEOUT).map_err(|e| self.failed(e))
    }

    fn failed(&self, e: PqError) -> TrompeError {
        TrompeError::PeerFailed { name: self.name.clone(), message: scrub(&e.message, &self.info) }
    }
}

/// A replicated table as both nodes name it, and its estimated size here.
struct Table {
    name: String,
    estimated_rows: f64,
}

/// The replicated tables to compare: `rel` alone, or all of them.
fn tables(rel: Option<&PgRelation>) -> Result<Vec<Table>, TrompeError> {
    let relid = rel.map(|r| r.oid().to_u32().to_string());
    let rows = as_extension_owner(|| {
        sql::rows(
            "SELECT format('%I.%I', n.nspname, c.relname), greatest(c.reltuples, 0)::float8
               FROM trompe.tables t JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE $1::oid IS NULL OR t.relid = $1::oid
              ORDER BY 1",
            &[relid.as_deref()],
        )
    })
    .map_err(TrompeError::Internal)?;
    if let (Some(rel), true) = (rel, rows.is_empty()) {
        return Err(TrompeError::NotReplicated(rel.name().to_string()));
    }
    Ok(rows
        .into_iter()
        .map(|r| Table {
            name: r[0].clone().unwrap_or_default(),
            estimated_rows: r[1].as_deref().and_then(|v| v.parse().ok()).unwrap_or(0.0),
        })
        .collect())
}

/// How one table differs from the peer's.
struct TableDiff {
    rows_here: i64,
    rows_there: i64,
    rows: RowDiff,
}

const DIGEST_SQL: &str = "SELECT bucket, row_count, digest FROM trompe.table_digest($1::regclass, $2::int)";
const ROWS_SQL: &str = "SELECT key, h1 || ':' || h2 FROM trompe._row_digests($1::regclass, $2::int, $3::int[])";

fn digests(rows: impl Iterator<Item = [Option<String>; 3]>) -> Vec<BucketDigest> {
    rows.map(|[bucket, count, digest]| BucketDigest {
        bucket: bucket.and_then(|v| v.parse().ok()).unwrap_or(-1),
        rows: count.and_then(|v| v.parse().ok()).unwrap_or(0),
        digest: digest.unwrap_or_default(),
    })
    .collect()
}

fn local_rows(sql: &str, args: &[Option<&str>]) -> Result<Vec<sql::Row>, TrompeError> {
    as_extension_owner(|| sql::rows(sql, args)).map_err(TrompeError::Internal)
}

fn result_rows<const N: usize>(result: &PgResult) -> impl Iterator<Item = [Option<String>; N]> + '_ {
    (0..result.rows()).map(move |r| std::array::from_fn(|c| result.get(r, c).map(str::to_string)))
}

fn row_array<const N: usize>(row: sql::Row) -> [Option<String>; N] {
    let mut row = row.into_iter();
    std::array::from_fn(|_| row.next().flatten())
}

fn key_hashes(rows: impl Iterator<Item = [Option<String>; 2]>) -> Vec<(String, String)> {
    rows.map(|[key, hash]| (key.unwrap_or_default(), hash.unwrap_or_default())).collect()
}

/// Compares one table with the peer's: bucket digests first, rows of differing buckets only;
/// both nodes hash at the same time.
fn diff_table(peer: &mut PeerSnapshot, table: &Table) -> Result<TableDiff, TrompeError> {
    let buckets = bucket_count(table.estimated_rows).to_string();
    let args = [Some(table.name.as_str()), Some(buckets.as_str())];
    peer.send(DIGEST_SQL, &args)?;
    let here = digests(local_rows(DIGEST_SQL, &args)?.into_iter().map(row_array));
    let there_result = peer.result()?;
    let there = digests(result_rows(&there_result));
    let rows_here = here.iter().map(|b| b.rows).sum();
    let rows_there = there.iter().map(|b| b.rows).sum();
    let wanted = differing_buckets(&here, &there);
    if wanted.is_empty() {
        return Ok(TableDiff { rows_here, rows_there, rows: RowDiff::default() });
    }
    let wanted: Vec<String> = wanted.iter().map(i32::to_string).collect();
    let wanted = format_text_array(&wanted.iter().map(|b| Some(b.as_str())).collect::<Vec<_>>());
    let args = [Some(table.name.as_str()), Some(buckets.as_str()), Some(wanted.as_str())];
    peer.send(ROWS_SQL, &args)?;
    let here = key_hashes(local_rows(ROWS_SQL, &args)?.into_iter().map(row_array));
    let there_result = peer.result()?;
    let there = key_hashes(result_rows(&there_result));
    Ok(TableDiff { rows_here, rows_there, rows: diff_rows(here, there) })
}

/// One row of `trompe.compare`: table, rows here, rows there, only here, only there, different.
type CompareRow = (String, i64, i64, i64, i64, i64);

/// Compares every replicated table (or only `rel`) with peer `peer`: per table, its row count
/// on both nodes and how many rows are only here, only there, or different. Reads the peer in
/// one snapshot; rows changing while it runs (replication still on its way) may show up as
/// differences, so compare a quiet cluster or after `trompe.wait_sync()`.
#[pg_extern(volatile, parallel_unsafe)]
fn compare(
    peer: &str,
    rel: default!(Option<PgRelation>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(table_name, String),
        name!(rows_here, i64),
        name!(rows_there, i64),
        name!(only_here, i64),
        name!(only_there, i64),
        name!(different, i64),
    ),
> {
    let rows = compare_impl(peer, rel.as_ref()).or_raise();
    TableIterator::new(rows)
}

fn compare_impl(peer: &str, rel: Option<&PgRelation>) -> Result<Vec<CompareRow>, TrompeError> {
    let tables = tables(rel)?;
    let mut snapshot = PeerSnapshot::open(peer)?;
    let mut out = Vec::with_capacity(tables.len());
    for (i, table) in tables.iter().enumerate() {
        let started = std::time::Instant::now();
        let diff = diff_table(&mut snapshot, table)?;
        pgrx::notice!(
            "trompe: compared {} with {peer} (table {} of {}, {:.1} s): {} rows here, {} there; {} only here, {} only there, {} different",
            table.name,
            i + 1,
            tables.len(),
            started.elapsed().as_secs_f64(),
            diff.rows_here,
            diff.rows_there,
            diff.rows.only_here.len(),
            diff.rows.only_there.len(),
            diff.rows.different.len()
        );
        out.push((
            table.name.clone(),
            diff.rows_here,
            diff.rows_there,
            diff.rows.only_here.len() as i64,
            diff.rows.only_there.len() as i64,
            diff.rows.different.len() as i64,
        ));
    }
    Ok(out)
}

/// One row of `trompe.repair`: table, rows inserted, updated, deleted.
type RepairRow = (String, i64, i64, i64);

/// Makes this node's rows of every replicated table (or only `rel`) the same as peer `peer`'s:
/// rows only here are deleted, rows only there inserted, different rows updated to the peer's.
/// These are ordinary writes in the calling transaction: they are captured and replicated, so
/// every node ends up with the peer's rows, and each is recorded in `trompe.repairs`. Run it
/// when both nodes have caught up (`trompe.wait_sync()`), or a change still on its way may be
/// overwritten.
#[pg_extern(volatile, parallel_unsafe)]
fn repair(
    peer: &str,
    rel: default!(Option<PgRelation>, "NULL"),
) -> TableIterator<'static, (name!(table_name, String), name!(inserted, i64), name!(updated, i64), name!(deleted, i64))>
{
    let rows = repair_impl(peer, rel.as_ref()).or_raise();
    TableIterator::new(rows)
}

const REPAIR_SQL: &str =
    "SELECT inserted, updated, deleted FROM trompe._repair_rows($1::regclass, $2, $3::text[], $4::jsonb)";
const FETCH_SQL: &str = "SELECT row_data::text FROM trompe.fetch_rows($1::regclass, $2::text[])";

fn text_array(keys: &[String]) -> String {
    format_text_array(&keys.iter().map(|k| Some(k.as_str())).collect::<Vec<_>>())
}

/// Runs `_repair_rows` here; returns (inserted, updated, deleted).
fn repair_rows(table: &str, peer: &str, gone: &[String], incoming_json: &str) -> Result<[i64; 3], TrompeError> {
    let gone = text_array(gone);
    let counts =
        as_extension_owner(|| sql::row(REPAIR_SQL, &[Some(table), Some(peer), Some(&gone), Some(incoming_json)]))
            .map_err(TrompeError::Internal)?
            .unwrap_or_default();
    let mut counts = counts.into_iter().map(|v| v.and_then(|v| v.parse().ok()).unwrap_or(0));
    Ok(std::array::from_fn(|_| counts.next().unwrap_or(0)))
}

fn repair_impl(peer: &str, rel: Option<&PgRelation>) -> Result<Vec<RepairRow>, TrompeError> {
    let tables = tables(rel)?;
    let mut snapshot = PeerSnapshot::open(peer)?;
    let mut out = Vec::with_capacity(tables.len());
    for (i, table) in tables.iter().enumerate() {
        let started = std::time::Instant::now();
        let diff = diff_table(&mut snapshot, table)?;
        let mut totals = [0i64; 3];
        let mut add = |counts: [i64; 3]| totals.iter_mut().zip(counts).for_each(|(t, c)| *t += c);
        for gone in diff.rows.only_here.chunks(REPAIR_BATCH) {
            add(repair_rows(&table.name, peer, gone, "[]")?);
        }
        let wanted: Vec<String> = diff.rows.only_there.into_iter().chain(diff.rows.different).collect();
        let has_large_objects = !wanted.is_empty() && large_objects::refers_to_large_objects(&table.name)?;
        for keys in wanted.chunks(REPAIR_BATCH) {
            let fetched = snapshot.query(FETCH_SQL, &[Some(&table.name), Some(&text_array(keys))])?;
            let rows: Vec<&str> = (0..fetched.rows()).filter_map(|r| fetched.get(r, 0)).collect();
            let incoming = format!("[{}]", rows.join(","));
            if has_large_objects {
                large_objects::copy_referenced_large_objects(
                    &mut snapshot.conn,
                    &snapshot.name,
                    &table.name,
                    &incoming,
                )?;
            }
            add(repair_rows(&table.name, peer, &[], &incoming)?);
        }
        pgrx::notice!(
            "trompe: repaired {} from {peer} (table {} of {}, {:.1} s): {} rows inserted, {} updated, {} deleted",
            table.name,
            i + 1,
            tables.len(),
            started.elapsed().as_secs_f64(),
            totals[0],
            totals[1],
            totals[2]
        );
        out.push((table.name.clone(), totals[0], totals[1], totals[2]));
    }
    Ok(out)
}
