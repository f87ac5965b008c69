//! A pull's log rows, kept as they arrive until they are applied: in memory while the pull is
//! small, in a temporary file past [`SPILL_BYTES`]. Nothing decoded is kept: a transaction is
//! read back from here in the order of its changes, a segment at a time (see
//! [`SpooledTxn::segments`]), so the worker never holds a whole large transaction, raw or
//! decoded, and a failed attempt is read again from here.
//!
//! The file is made under the data directory's `base/pgsql_tmp` and unlinked at once: it
//! disappears with its descriptor, also when the worker is killed.

use std::borrow::Cow;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;

use trompe_core::changeset::{decode, holds, peek};
use trompe_core::inorder::{ChunkRef, InOrder};
use trompe_core::logformat::Op;

use crate::worker::apply::Change;

/// Log rows of a pull are kept in memory up to this many bytes, in a file beyond.
const SPILL_BYTES: usize = 16 << 20;
/// A segment applied at once ends after this many changes...
const SEGMENT_CHANGES: usize = 4096;
/// ...or this many bytes of values.
const SEGMENT_BYTES: usize = 8 << 20;
/// Where PostgreSQL keeps temporary files of the default tablespace (relative to the data
/// directory, the worker's working directory); it empties it at start-up.
const TEMP_DIR: &str = "base/pgsql_tmp";

/// The raw log rows of one pull.
#[derive(Default)]
pub struct Spool {
    memory: Vec<u8>,
    file: Option<std::io::BufWriter<File>>,
    len: u64,
}

impl Spool {
    /// Keeps `bytes`; returns where they are.
    fn append(&mut self, bytes: &[u8]) -> Result<u64, String> {
        let at = self.len;
        if self.file.is_none() && self.memory.len() + bytes.len() > SPILL_BYTES {
            let mut file = std::io::BufWriter::with_capacity(1 << 20, temp_file()?);
            file.write_all(&self.memory).map_err(spool_error)?;
            self.memory = Vec::new();
            self.file = Some(file);
        }
        match self.file.as_mut() {
            Some(file) => file.write_all(bytes).map_err(spool_error)?,
            None => self.memory.extend_from_slice(bytes),
        }
        self.len += bytes.len() as u64;
        Ok(at)
    }

    /// Everything appended is readable (the file's buffer is written out).
    fn seal(&mut self) -> Result<(), String> {
        if let Some(file) = self.file.as_mut() {
            file.flush().map_err(spool_error)?;
        }
        Ok(())
    }

    /// The `len` bytes kept at `offset` (borrowed while they are in memory).
    fn read(&self, offset: u64, len: usize) -> Result<Cow<'_, [u8]>, String> {
        match &self.file {
            Some(file) => {
                let mut buf = vec![0u8; len];
                file.get_ref().read_exact_at(&mut buf, offset).map_err(spool_error)?;
                Ok(Cow::Owned(buf))
            }
            None => {
                let start = usize::try_from(offset).map_err(|_| "spool offset out of range".to_string())?;
                let end = start.checked_add(len).ok_or("spool read out of range")?;
                self.memory.get(start..end).map(Cow::Borrowed).ok_or_else(|| "spool read out of range".into())
            }
        }
    }

    /// Whether the rows went to a file (the pull was large).
    pub fn spilled(&self) -> bool {
        self.file.is_some()
    }
}

fn spool_error(e: std::io::Error) -> String {
    format!("keeping a large pull in a temporary file under {TEMP_DIR}: {e}")
}

/// A new temporary file, already unlinked.
fn temp_file() -> Result<File, String> {
    std::fs::create_dir_all(TEMP_DIR).map_err(spool_error)?;
    let path = format!("{TEMP_DIR}/pgsql_tmp{}.trompe_pull", std::process::id());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(spool_error)?;
    std::fs::remove_file(&path).map_err(spool_error)?;
    Ok(file)
}

/// One transaction of a pull, as its log rows were kept.
#[derive(Debug, Default)]
pub struct SpooledTxn {
    /// The log id of its last log row.
    pub txn_last: i64,
    /// Its commit time at the origin (PostgreSQL TimestampTz).
    pub commit_us: i64,
    /// How many changes it has.
    pub changes: u64,
    /// Whether any of them is DDL or a TRUNCATE, which may wait for a table's lock, or rewrite
    /// the table, for long.
    pub ddl_or_truncate: bool,
    chunks: Vec<ChunkRef>,
}

impl SpooledTxn {
    /// A transaction with no rows yet.
    pub fn new(txn_last: i64, commit_us: i64) -> Self {
        SpooledTxn { txn_last, commit_us, ..Default::default() }
    }

    /// Keeps one of its log rows in `spool`.
    pub fn add_row(&mut self, spool: &mut Spool, bytes: &[u8]) -> Result<(), String> {
        // A row that does not decode is reported when it is applied (where the transaction can
        // be set aside with `trompe.skip`); until then it counts as one change, first in the
        // transaction, and as DDL, the careful side.
        let (count, first_seq) = match peek(bytes) {
            Ok((count, first_seq)) => (count, first_seq),
            Err(_) => (1, Some(0)),
        };
        let Some(first_seq) = first_seq else { return Ok(()) };
        self.ddl_or_truncate |= holds(bytes, |op| matches!(op, Op::Ddl | Op::Truncate)).unwrap_or(true);
        let offset = spool.append(bytes)?;
        self.chunks.push(ChunkRef { first_seq, count, offset, len: bytes.len() });
        self.changes += count;
        Ok(())
    }

    /// Its changes in order, read back from `spool`.
    pub fn changes<'a>(&'a self, spool: &'a Spool) -> impl Iterator<Item = Result<Change, String>> + 'a {
        let (txn_last, commit_us) = (self.txn_last, self.commit_us);
        InOrder::new(&self.chunks, move |c: &ChunkRef| {
            let bytes = spool.read(c.offset, c.len)?;
            decode(&bytes).map_err(|e| format!("log row of transaction {txn_last}: {e}"))
        })
        .map(move |r| r.map(|record| Change { txn_last, commit_us, record }))
    }

    /// Its log rows as they arrived, undecoded (what is kept of a transaction whose rows do
    /// not decode).
    pub fn raw_rows<'a>(&'a self, spool: &'a Spool) -> impl Iterator<Item = Result<Vec<u8>, String>> + 'a {
        self.chunks.iter().map(move |c| spool.read(c.offset, c.len).map(Cow::into_owned))
    }

    /// Its changes in order, in segments of bounded size; a run of truncations of tables
    /// truncated together is never split (they are truncated by one statement).
    pub fn segments<'a>(&'a self, spool: &'a Spool) -> Segments<impl Iterator<Item = Result<Change, String>> + 'a> {
        Segments { changes: self.changes(spool).peekable() }
    }

    /// Change `at` (counted from 0), read back from `spool`.
    pub fn change_at(&self, spool: &Spool, at: usize) -> Option<Change> {
        self.changes(spool).nth(at).and_then(Result::ok)
    }
}

/// See [`SpooledTxn::segments`].
pub struct Segments<I: Iterator<Item = Result<Change, String>>> {
    changes: std::iter::Peekable<I>,
}

impl<I: Iterator<Item = Result<Change, String>>> Iterator for Segments<I> {
    type Item = Result<Vec<Change>, String>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut segment: Vec<Change> = Vec::new();
        let mut bytes = 0usize;
        loop {
            let full = segment.len() >= SEGMENT_CHANGES || bytes >= SEGMENT_BYTES;
            if full {
                let last = segment.last();
                let continues_truncation = match (last, self.changes.peek()) {
                    (Some(l), Some(Ok(n))) => l.op == Op::Truncate && n.op == Op::Truncate && n.vals == l.vals,
                    _ => false,
                };
                if !continues_truncation {
                    break;
                }
            }
            match self.changes.next() {
                None => break,
                Some(Err(e)) => return Some(Err(e)),
                Some(Ok(change)) => {
                    bytes += change.vals.iter().flatten().flatten().map(String::len).sum::<usize>() + 64;
                    segment.push(change);
                }
            }
        }
        (!segment.is_empty()).then_some(Ok(segment))
    }
}

/// Builds [`Spool`] and its transactions as a pull's log rows arrive.
#[derive(Default)]
pub struct SpoolBuilder {
    spool: Spool,
    txns: Vec<SpooledTxn>,
}

impl SpoolBuilder {
    /// Keeps a log row of transaction `txn_last` (rows of one transaction arrive together).
    pub fn row(&mut self, txn_last: i64, commit_us: i64, bytes: &[u8]) -> Result<(), String> {
        if self.txns.last().is_none_or(|t| t.txn_last != txn_last) {
            self.txns.push(SpooledTxn::new(txn_last, commit_us));
        }
        let txn = self.txns.last_mut().ok_or("no transaction")?;
        txn.add_row(&mut self.spool, bytes)
    }

    /// The rows kept and their transactions, ready to be read.
    pub fn finish(mut self) -> Result<(Spool, Vec<SpooledTxn>), String> {
        self.spool.seal()?;
        Ok((self.spool, self.txns))
    }
}
