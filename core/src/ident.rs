//! SQL identifiers that come from peers: checked, then always quoted.

/// Longest identifier PostgreSQL keeps (NAMEDATALEN - 1 bytes).
pub const MAX_IDENTIFIER_BYTES: usize = 63;

/// Why an identifier sent by a peer was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentError {
    /// Empty identifiers do not exist in PostgreSQL.
    #[error("invalid identifier: it is empty")]
    Empty,
    /// Longer than PostgreSQL would ever store.
    #[error("invalid identifier \"{0}\": longer than 63 bytes")]
    TooLong(String),
    /// Contains a NUL byte.
    #[error("invalid identifier: it contains a NUL byte")]
    Nul,
}

/// Checks that `ident` could be the name of a PostgreSQL object.
pub fn check_identifier(ident: &str) -> Result<(), IdentError> {
    if ident.is_empty() {
        return Err(IdentError::Empty);
    }
    if ident.contains('\0') {
        return Err(IdentError::Nul);
    }
    if ident.len() > MAX_IDENTIFIER_BYTES {
        return Err(IdentError::TooLong(ident.chars().take(80).collect()));
    }
    Ok(())
}

/// The name a single SQL identifier as written in SQL stands for, as PostgreSQL reads it
/// (`regnamespace` input): `"My Schema"` (quoted, `""` for a quote) is taken as written,
/// anything else is folded to lower case (ASCII, as PostgreSQL folds). `None` when `text` is
/// not one identifier (an unterminated or misplaced quote).
pub fn parse_identifier(text: &str) -> Option<String> {
    if let Some(inner) = text.strip_prefix('"') {
        let inner = inner.strip_suffix('"')?;
        let mut out = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            if c == '"' {
                // Inside quotes a quote stands only doubled.
                if chars.next() != Some('"') {
                    return None;
                }
            }
            out.push(c);
        }
        return Some(out);
    }
    if text.contains('"') {
        return None;
    }
    Some(text.to_ascii_lowercase())
}

/// Quotes an identifier unconditionally: `a"b` becomes `"a""b"`.
pub fn quote_ident(ident: &str) -> String {
    let mut out = String::with_capacity(ident.len() + 2);
    out.push('"');
    for c in ident.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Quotes a schema-qualified name.
pub fn quote_qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// A schema-qualified name for people to read (as in `trompe.conflicts`): each part quoted
/// only when it is not a plain lower-case identifier, as `quote_ident()` does (keywords aside).
pub fn readable_qualified(schema: &str, name: &str) -> String {
    let part = |s: &str| {
        let plain = s.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
        if plain {
            s.to_string()
        } else {
            quote_ident(s)
        }
    };
    format!("{}.{}", part(schema), part(name))
}

#[cfg(test)]
mod tests {
    #[test]
    fn identifiers_read_as_postgresql_reads_them() {
        assert_eq!(parse_identifier("App").as_deref(), Some("app"));
        assert_eq!(parse_identifier("\"App\"").as_deref(), Some("App"));
        assert_eq!(parse_identifier("\"my \"\"x\"\"\"").as_deref(), Some("my \"x\""));
        assert_eq!(parse_identifier("\"open"), None);
        assert_eq!(parse_identifier("\"a\"b\""), None);
        assert_eq!(parse_identifier("a\"b"), None);
    }

    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("t"), "\"t\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_qualified("public", "My Table"), "\"public\".\"My Table\"");
        assert_eq!(readable_qualified("public", "t_1"), "public.t_1");
        assert_eq!(readable_qualified("App", "1t"), "\"App\".\"1t\"");
    }

    #[test]
    fn checks() {
        assert_eq!(check_identifier(""), Err(IdentError::Empty));
        assert_eq!(check_identifier("a\0b"), Err(IdentError::Nul));
        assert!(matches!(check_identifier(&"x".repeat(64)), Err(IdentError::TooLong(_))));
        assert!(check_identifier(&"x".repeat(63)).is_ok());
        assert!(check_identifier("ünïcode; DROP TABLE x").is_ok());
    }
}
