//! The binary format of a chunk of captured changes: one `trompe.log` row holds the changes
//! of one transaction (or a part of a large one), encoded compactly, written once at commit
//! instead of one row per change.
//!
//! ```text
//! chunk    := FORMAT(u8 = 1) count(varint) change*
//! change   := op(u8) seq(varint) nsp(str) rel(str) cols(strs) vals(opt optstrs)
//!             oldkey(opt optstrs) old(version)
//! str      := len(varint) utf8-bytes
//! strs     := n(varint) str*
//! optstrs  := n(varint) (0 | 1 str)*          -- 0 is NULL
//! opt X    := 0 | 1 X
//! version  := 0 (unknown) | 1 (written earlier in the same transaction) | 2 ts(i64 LE) node(16 bytes)
//! ```

use crate::logformat::Op;
use crate::nodeid::NodeId;

const FORMAT: u8 = 1;

/// The version of a row that a change replaced, as the origin saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OldVersion {
    /// Not known (no old row, frozen, or commit timestamps not kept).
    Unknown,
    /// Written earlier by the same transaction.
    SameTransaction,
    /// Committed at `ts` (PostgreSQL TimestampTz) by node `node`.
    Committed {
        /// Commit time.
        ts: i64,
        /// The node where it was written.
        node: NodeId,
    },
}

/// One decoded change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeRecord {
    /// Position of the change in its transaction.
    pub seq: u64,
    /// What kind of change.
    pub op: Op,
    /// Schema.
    pub nsp: String,
    /// Table.
    pub rel: String,
    /// Column names (primary key first).
    pub cols: Vec<String>,
    /// New values (I/U), options (T), statement parts (S).
    pub vals: Option<Vec<Option<String>>>,
    /// Old primary key (U/D).
    pub oldkey: Option<Vec<Option<String>>>,
    /// The row version this change replaced.
    pub old: OldVersion,
}

/// Why a chunk could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The chunk ends in the middle of something.
    #[error("truncated change chunk")]
    Truncated,
    /// A format this version does not know.
    #[error("unknown change chunk format {0}")]
    Format(u8),
    /// A field holds a value it cannot hold.
    #[error("malformed change chunk: {0}")]
    Malformed(&'static str),
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_str(buf: &mut Vec<u8>, s: &[u8]) {
    put_varint(buf, s.len() as u64);
    buf.extend_from_slice(s);
}

/// Builds one change into a chunk buffer, field by field, without intermediate allocations.
pub struct ChangeWriter<'a> {
    buf: &'a mut Vec<u8>,
}

impl<'a> ChangeWriter<'a> {
    /// Starts a change: its kind, position, schema and table.
    pub fn begin(buf: &'a mut Vec<u8>, op: Op, seq: u64, nsp: &[u8], rel: &[u8]) -> Self {
        buf.push(op.code().as_bytes()[0]);
        put_varint(buf, seq);
        put_str(buf, nsp);
        put_str(buf, rel);
        ChangeWriter { buf }
    }

    /// The column names.
    pub fn cols<'s>(self, names: impl ExactSizeIterator<Item = &'s [u8]>) -> Self {
        put_varint(self.buf, names.len() as u64);
        for n in names {
            put_str(self.buf, n);
        }
        self
    }

    /// An absent list (no values, or no old key).
    pub fn none(self) -> Self {
        self.buf.push(0);
        self
    }

    /// Starts a present list of `n` optional values, to be followed by exactly `n` calls of
    /// [`ChangeWriter::value`].
    pub fn list(self, n: usize) -> Self {
        self.buf.push(1);
        put_varint(self.buf, n as u64);
        self
    }

    /// One optional value of the current list.
    pub fn value(self, v: Option<&[u8]>) -> Self {
        match v {
            None => self.buf.push(0),
            Some(bytes) => {
                self.buf.push(1);
                put_str(self.buf, bytes);
            }
        }
        self
    }

    /// Ends the change with the version it replaced.
    pub fn finish(self, old: OldVersion) {
        match old {
            OldVersion::Unknown => self.buf.push(0),
            OldVersion::SameTransaction => self.buf.push(1),
            OldVersion::Committed { ts, node } => {
                self.buf.push(2);
                self.buf.extend_from_slice(&ts.to_le_bytes());
                self.buf.extend_from_slice(&node.0);
            }
        }
    }
}

/// Wraps encoded changes into a chunk.
pub fn chunk(count: u64, changes: &[u8]) -> Vec<u8> {
    let mut out = chunk_header(count);
    out.extend_from_slice(changes);
    out
}

/// What a chunk of `count` changes starts with; the encoded changes follow it.
pub fn chunk_header(count: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(11);
    out.push(FORMAT);
    put_varint(&mut out, count);
    out
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, DecodeError> {
        let b = *self.bytes.get(self.pos).ok_or(DecodeError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::Malformed("varint too long"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Truncated)?;
        let s = self.bytes.get(self.pos..end).ok_or(DecodeError::Truncated)?;
        self.pos = end;
        Ok(s)
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let bytes = self.string_bytes()?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::Malformed("string is not UTF-8"))
    }

    fn string_bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.varint()?;
        let n = usize::try_from(n).map_err(|_| DecodeError::Truncated)?;
        self.take(n)
    }

    fn skip_string(&mut self) -> Result<(), DecodeError> {
        self.string_bytes().map(drop)
    }

    fn op(&mut self) -> Result<Op, DecodeError> {
        let code = self.byte()?;
        Op::from_code(std::str::from_utf8(&[code]).map_err(|_| DecodeError::Malformed("bad op"))?)
            .map_err(|_| DecodeError::Malformed("unknown op"))
    }

    fn old_version(&mut self) -> Result<OldVersion, DecodeError> {
        Ok(match self.byte()? {
            0 => OldVersion::Unknown,
            1 => OldVersion::SameTransaction,
            2 => {
                let ts = i64::from_le_bytes(self.take(8)?.try_into().map_err(|_| DecodeError::Truncated)?);
                let node = NodeId(self.take(16)?.try_into().map_err(|_| DecodeError::Truncated)?);
                OldVersion::Committed { ts, node }
            }
            _ => return Err(DecodeError::Malformed("bad version marker")),
        })
    }

    /// A count that cannot exceed what is left (each item takes at least one byte).
    fn count(&mut self) -> Result<usize, DecodeError> {
        let n = self.varint()?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n > left {
            return Err(DecodeError::Truncated);
        }
        Ok(n as usize)
    }

    fn skip_optional_list(&mut self) -> Result<(), DecodeError> {
        match self.byte()? {
            0 => Ok(()),
            1 => {
                for _ in 0..self.count()? {
                    match self.byte()? {
                        0 => {}
                        1 => self.skip_string()?,
                        _ => return Err(DecodeError::Malformed("bad value marker")),
                    }
                }
                Ok(())
            }
            _ => Err(DecodeError::Malformed("bad list marker")),
        }
    }

    fn optional_list(&mut self) -> Result<Option<Vec<Option<String>>>, DecodeError> {
        match self.byte()? {
            0 => Ok(None),
            1 => {
                let n = self.count()?;
                let mut out = Vec::with_capacity(n);
                for _ in 0..n {
                    out.push(match self.byte()? {
                        0 => None,
                        1 => Some(self.string()?),
                        _ => return Err(DecodeError::Malformed("bad value marker")),
                    });
                }
                Ok(Some(out))
            }
            _ => Err(DecodeError::Malformed("bad list marker")),
        }
    }
}

/// How many changes a chunk holds and the position of its first change (None if it holds
/// none), read from its start without decoding the rest.
pub fn peek(bytes: &[u8]) -> Result<(u64, Option<u64>), DecodeError> {
    let mut r = Reader { bytes, pos: 0 };
    let format = r.byte()?;
    if format != FORMAT {
        return Err(DecodeError::Format(format));
    }
    let count = r.varint()?;
    if count == 0 {
        return Ok((0, None));
    }
    r.byte()?;
    Ok((count, Some(r.varint()?)))
}

/// Decodes a chunk.
pub fn decode(bytes: &[u8]) -> Result<Vec<ChangeRecord>, DecodeError> {
    let mut r = Reader { bytes, pos: 0 };
    let format = r.byte()?;
    if format != FORMAT {
        return Err(DecodeError::Format(format));
    }
    let count = r.count()?;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let op = r.op()?;
        let seq = r.varint()?;
        let nsp = r.string()?;
        let rel = r.string()?;
        let ncols = r.count()?;
        let mut cols = Vec::with_capacity(ncols);
        for _ in 0..ncols {
            cols.push(r.string()?);
        }
        let vals = r.optional_list()?;
        let oldkey = r.optional_list()?;
        let old = r.old_version()?;
        out.push(ChangeRecord { seq, op, nsp, rel, cols, vals, oldkey, old });
    }
    if r.pos != bytes.len() {
        return Err(DecodeError::Malformed("trailing bytes"));
    }
    Ok(out)
}

/// Whether a chunk holds a change of a kind `wanted` accepts, read without decoding names and
/// values.
pub fn holds(bytes: &[u8], wanted: impl Fn(Op) -> bool) -> Result<bool, DecodeError> {
    let mut r = Reader { bytes, pos: 0 };
    let format = r.byte()?;
    if format != FORMAT {
        return Err(DecodeError::Format(format));
    }
    let count = r.count()?;
    for _ in 0..count {
        if wanted(r.op()?) {
            return Ok(true);
        }
        r.varint()?;
        r.skip_string()?;
        r.skip_string()?;
        for _ in 0..r.count()? {
            r.skip_string()?;
        }
        r.skip_optional_list()?;
        r.skip_optional_list()?;
        r.old_version()?;
    }
    if r.pos != bytes.len() {
        return Err(DecodeError::Malformed("trailing bytes"));
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Vec<u8>, Vec<ChangeRecord>) {
        let mut buf = Vec::new();
        ChangeWriter::begin(&mut buf, Op::Update, 7, b"public", b"t")
            .cols([&b"id"[..], b"note"].into_iter())
            .list(2)
            .value(Some(b"1"))
            .value(None)
            .list(1)
            .value(Some(b"1"))
            .finish(OldVersion::Committed { ts: -5, node: NodeId([9; 16]) });
        ChangeWriter::begin(&mut buf, Op::Ddl, 300, "sch\u{e9}ma".as_bytes(), b"")
            .cols(std::iter::empty())
            .list(1)
            .value(Some("ALTER TABLE t ADD c int -- \u{1f600}".as_bytes()))
            .none()
            .finish(OldVersion::SameTransaction);
        let expected = vec![
            ChangeRecord {
                seq: 7,
                op: Op::Update,
                nsp: "public".into(),
                rel: "t".into(),
                cols: vec!["id".into(), "note".into()],
                vals: Some(vec![Some("1".into()), None]),
                oldkey: Some(vec![Some("1".into())]),
                old: OldVersion::Committed { ts: -5, node: NodeId([9; 16]) },
            },
            ChangeRecord {
                seq: 300,
                op: Op::Ddl,
                nsp: "sch\u{e9}ma".into(),
                rel: "".into(),
                cols: vec![],
                vals: Some(vec![Some("ALTER TABLE t ADD c int -- \u{1f600}".into())]),
                oldkey: None,
                old: OldVersion::SameTransaction,
            },
        ];
        (chunk(2, &buf), expected)
    }

    #[test]
    fn round_trip() {
        let (bytes, expected) = sample();
        assert_eq!(decode(&bytes).unwrap(), expected);
    }

    #[test]
    fn peek_reads_the_count_and_first_position() {
        let (bytes, _) = sample();
        assert_eq!(peek(&bytes), Ok((2, Some(7))));
        assert_eq!(peek(&chunk(0, &[])), Ok((0, None)));
        assert_eq!(peek(&bytes[..2]), Err(DecodeError::Truncated));
        assert_eq!(peek(&[2, 0]), Err(DecodeError::Format(2)));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let (bytes, _) = sample();
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "prefix of {len} bytes decoded");
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert_eq!(decode(&extra), Err(DecodeError::Malformed("trailing bytes")));
    }

    #[test]
    fn hostile_counts_do_not_allocate_wildly() {
        let mut bytes = vec![FORMAT];
        put_varint(&mut bytes, u64::MAX >> 1);
        assert_eq!(decode(&bytes), Err(DecodeError::Truncated));
        assert_eq!(decode(&[2, 0]), Err(DecodeError::Format(2)));
    }

    #[test]
    fn varints() {
        for v in [0u64, 1, 127, 128, 300, 1 << 40, u64::MAX] {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            let mut r = Reader { bytes: &buf, pos: 0 };
            assert_eq!(r.varint().unwrap(), v);
        }
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![Just(Op::Insert), Just(Op::Update), Just(Op::Delete), Just(Op::Truncate), Just(Op::Ddl)]
    }

    fn values() -> impl Strategy<Value = Option<Vec<Option<String>>>> {
        proptest::option::of(proptest::collection::vec(proptest::option::of(any::<String>()), 0..5))
    }

    fn old_version() -> impl Strategy<Value = OldVersion> {
        prop_oneof![
            Just(OldVersion::Unknown),
            Just(OldVersion::SameTransaction),
            (any::<i64>(), any::<[u8; 16]>()).prop_map(|(ts, node)| OldVersion::Committed { ts, node: NodeId(node) }),
        ]
    }

    fn record() -> impl Strategy<Value = ChangeRecord> {
        (
            any::<u64>(),
            op(),
            any::<String>(),
            any::<String>(),
            proptest::collection::vec(any::<String>(), 0..5),
            values(),
            values(),
            old_version(),
        )
            .prop_map(|(seq, op, nsp, rel, cols, vals, oldkey, old)| ChangeRecord {
                seq,
                op,
                nsp,
                rel,
                cols,
                vals,
                oldkey,
                old,
            })
    }

    fn encode(records: &[ChangeRecord]) -> Vec<u8> {
        let mut buf = Vec::new();
        for r in records {
            let mut w = ChangeWriter::begin(&mut buf, r.op, r.seq, r.nsp.as_bytes(), r.rel.as_bytes())
                .cols(r.cols.iter().map(|c| c.as_bytes()));
            for list in [&r.vals, &r.oldkey] {
                w = match list {
                    None => w.none(),
                    Some(items) => {
                        let mut w = w.list(items.len());
                        for v in items {
                            w = w.value(v.as_deref().map(str::as_bytes));
                        }
                        w
                    }
                };
            }
            w.finish(r.old);
        }
        chunk(records.len() as u64, &buf)
    }

    proptest! {
        #[test]
        fn what_capture_writes_decodes_back(records in proptest::collection::vec(record(), 0..6)) {
            prop_assert_eq!(decode(&encode(&records)), Ok(records));
        }

        #[test]
        fn any_bytes_decode_or_are_refused_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..96)) {
            let _ = decode(&bytes);
            let _ = holds(&bytes, |op| op == Op::Ddl);
        }

        #[test]
        fn holds_tells_the_kinds_decode_finds(records in proptest::collection::vec(record(), 0..6), wanted in op()) {
            let bytes = encode(&records);
            prop_assert_eq!(holds(&bytes, |op| op == wanted), Ok(records.iter().any(|r| r.op == wanted)));
        }

        #[test]
        fn a_cut_or_altered_chunk_is_refused_or_decodes_without_panic(
            records in proptest::collection::vec(record(), 1..4),
            cut in any::<proptest::sample::Index>(),
            flip in any::<(proptest::sample::Index, u8)>(),
        ) {
            let bytes = encode(&records);
            let at = cut.index(bytes.len());
            prop_assert!(decode(&bytes[..at]).is_err(), "a chunk cut short must be refused");
            let _ = holds(&bytes[..at], |op| op == Op::Ddl);
            let mut altered = bytes.clone();
            let i = flip.0.index(altered.len());
            altered[i] ^= flip.1;
            let _ = decode(&altered);
        }
    }
}
