//! Rows of PostgreSQL's COPY text format (`COPY ... TO STDOUT`): columns separated by tabs,
//! `\N` for NULL, backslash escapes for special characters.

/// Why a COPY row was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CopyTextError {
    /// The row has another number of columns than expected.
    #[error("a COPY row has {found} columns, not {expected}")]
    Columns {
        /// Columns expected.
        expected: usize,
        /// Columns found.
        found: usize,
    },
    /// A column is not UTF-8 once unescaped.
    #[error("a COPY row's column {0} is not valid UTF-8")]
    NotUtf8(usize),
}

fn unescape(field: &[u8]) -> Vec<u8> {
    if !field.contains(&b'\\') {
        return field.to_vec();
    }
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let b = field[i];
        i += 1;
        if b != b'\\' || i >= field.len() {
            out.push(b);
            continue;
        }
        let c = field[i];
        i += 1;
        match c {
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0b),
            b'0'..=b'7' => {
                let mut value = u32::from(c - b'0');
                for _ in 0..2 {
                    match field.get(i) {
                        Some(d @ b'0'..=b'7') => {
                            value = value * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push((value & 0xff) as u8);
            }
            b'x' if field.get(i).is_some_and(u8::is_ascii_hexdigit) => {
                let mut value = 0u32;
                for _ in 0..2 {
                    match field.get(i).and_then(|d| (*d as char).to_digit(16)) {
                        Some(d) => {
                            value = value * 16 + d;
                            i += 1;
                        }
                        None => break,
                    }
                }
                out.push(value as u8);
            }
            other => out.push(other),
        }
    }
    out
}

/// Splits one COPY text row (with or without its newline) into `expected` columns.
pub fn parse_row(row: &[u8], expected: usize) -> Result<Vec<Option<String>>, CopyTextError> {
    let row = row.strip_suffix(b"\n").unwrap_or(row);
    let fields: Vec<&[u8]> = row.split(|b| *b == b'\t').collect();
    if fields.len() != expected {
        return Err(CopyTextError::Columns { expected, found: fields.len() });
    }
    fields
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            if f == b"\\N" {
                return Ok(None);
            }
            String::from_utf8(unescape(f)).map(Some).map_err(|_| CopyTextError::NotUtf8(i))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_nulls_and_escapes() {
        let row = b"{\"a\": \"x\\\\ty\\\\\\\\z\"}\t\\N\tplain\n";
        let got = parse_row(row, 3).unwrap();
        assert_eq!(got[0].as_deref(), Some("{\"a\": \"x\\ty\\\\z\"}"));
        assert_eq!(got[1], None);
        assert_eq!(got[2].as_deref(), Some("plain"));
    }

    #[test]
    fn control_characters_octal_and_hex() {
        let got = parse_row(b"a\\tb\\nc\\rd\\\\e\\101\\x42\\x4\\q", 1).unwrap();
        assert_eq!(got[0].as_deref(), Some("a\tb\nc\rd\\eAB\u{4}q"));
    }

    #[test]
    fn unicode_passes_through() {
        let got = parse_row("é✓\t".as_bytes(), 2).unwrap();
        assert_eq!(got, vec![Some("é✓".to_string()), Some(String::new())]);
    }

    #[test]
    fn wrong_column_counts_and_bad_utf8_are_refused() {
        assert_eq!(parse_row(b"a\tb", 3), Err(CopyTextError::Columns { expected: 3, found: 2 }));
        assert_eq!(parse_row(b"\\377", 1), Err(CopyTextError::NotUtf8(0)));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// A row as PostgreSQL's `COPY ... TO STDOUT` (text format) prints it.
    fn copy_out(fields: &[Option<String>]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, field) in fields.iter().enumerate() {
            if i > 0 {
                out.push(b'\t');
            }
            match field {
                None => out.extend_from_slice(b"\\N"),
                Some(s) => {
                    for &b in s.as_bytes() {
                        match b {
                            b'\\' => out.extend_from_slice(b"\\\\"),
                            0x08 => out.extend_from_slice(b"\\b"),
                            0x0c => out.extend_from_slice(b"\\f"),
                            b'\n' => out.extend_from_slice(b"\\n"),
                            b'\r' => out.extend_from_slice(b"\\r"),
                            b'\t' => out.extend_from_slice(b"\\t"),
                            0x0b => out.extend_from_slice(b"\\v"),
                            other => out.push(other),
                        }
                    }
                }
            }
        }
        out.push(b'\n');
        out
    }

    fn field() -> impl Strategy<Value = Option<String>> {
        proptest::option::weighted(0.9, prop_oneof![any::<String>(), "[a\\\\\t\n\r\u{8}\u{b}\u{c}N0-7x]{0,8}"])
    }

    proptest! {
        #[test]
        fn what_postgresql_prints_parses_back(fields in proptest::collection::vec(field(), 1..8)) {
            prop_assert_eq!(parse_row(&copy_out(&fields), fields.len()), Ok(fields));
        }

        #[test]
        fn any_bytes_are_parsed_or_refused_without_panic(
            row in proptest::collection::vec(any::<u8>(), 0..64),
            expected in 0usize..6,
        ) {
            let _ = parse_row(&row, expected);
        }
    }
}
