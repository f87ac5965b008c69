//! SQLSTATE codes as PostgreSQL packs them into an integer (`MAKE_SQLSTATE`), and error
//! messages folded onto one line for `trompe.status`.

/// The five-character SQLSTATE of a code packed by PostgreSQL's `MAKE_SQLSTATE` (six bits per
/// character, first character lowest).
pub fn text(code: i64) -> String {
    (0..5).map(|i| char::from(((code >> (6 * i)) & 0x3F) as u8 + b'0')).collect()
}

/// `message` on one line (line breaks and runs of white space become one space), cut at
/// `max` bytes on a character boundary with `…` appended when it was longer.
pub fn one_line(message: &str, max: usize) -> String {
    let folded = message.split_whitespace().collect::<Vec<_>>().join(" ");
    if folded.len() <= max {
        return folded;
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !folded.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &folded[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make(s: &str) -> i64 {
        s.bytes().enumerate().map(|(i, b)| i64::from(b - b'0') << (6 * i)).sum()
    }

    #[test]
    fn codes_unpack() {
        for code in ["23514", "42P01", "XX000", "40001", "0A000"] {
            assert_eq!(text(make(code)), code);
        }
    }

    #[test]
    fn messages_fold_onto_one_line() {
        assert_eq!(one_line("a\n  b\tc\r\n", 100), "a b c");
        let long = "é".repeat(100);
        let cut = one_line(&long, 11);
        assert!(cut.len() <= 11 && cut.ends_with('…'), "{cut}");
    }
}
