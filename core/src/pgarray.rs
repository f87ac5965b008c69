//! Reading PostgreSQL's text form of one-dimensional arrays (`{a,"b c",NULL}`), as libpq
//! returns `text[]` columns.

/// Why an array literal could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArrayError {
    /// Not of the form `{...}`.
    #[error("malformed array literal: {0}")]
    Malformed(&'static str),
}

/// The spaces PostgreSQL skips around array elements (`array_isspace`): ASCII only, so an
/// element holding other spaces (U+00A0, U+2003, ...) is printed unquoted and keeps them.
fn array_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

/// Parses the text form of a one-dimensional array; unquoted `NULL` is a null element.
pub fn parse_text_array(text: &str) -> Result<Vec<Option<String>>, ArrayError> {
    let text = text.trim_matches(array_space);
    // Arrays with explicit bounds print as "[0:1]={...}"; the bounds do not matter here.
    let body = match text.find("={") {
        Some(pos) if text.starts_with('[') => &text[pos + 1..],
        _ => text,
    };
    let inner =
        body.strip_prefix('{').and_then(|b| b.strip_suffix('}')).ok_or(ArrayError::Malformed("missing braces"))?;
    let mut out = Vec::new();
    if inner.trim_matches(array_space).is_empty() {
        return Ok(out);
    }
    let mut chars = inner.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| array_space(*c)) {
            chars.next();
        }
        if chars.peek() == Some(&'"') {
            chars.next();
            let mut value = String::new();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.push(chars.next().ok_or(ArrayError::Malformed("dangling backslash"))?),
                    '"' => {
                        closed = true;
                        break;
                    }
                    other => value.push(other),
                }
            }
            if !closed {
                return Err(ArrayError::Malformed("unterminated quoted element"));
            }
            out.push(Some(value));
            while chars.peek().is_some_and(|c| array_space(*c)) {
                chars.next();
            }
        } else {
            let mut value = String::new();
            // Bytes up to the last escaped character: trailing spaces before it are kept.
            let mut escaped_to = None;
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                if c == '{' || c == '"' {
                    return Err(ArrayError::Malformed("unexpected character in unquoted element"));
                }
                chars.next();
                if c == '\\' {
                    value.push(chars.next().ok_or(ArrayError::Malformed("dangling backslash"))?);
                    escaped_to = Some(value.len());
                } else {
                    value.push(c);
                }
            }
            let end = value.trim_end_matches(array_space).len().max(escaped_to.unwrap_or(0));
            value.truncate(end);
            if value.is_empty() && escaped_to.is_none() {
                return Err(ArrayError::Malformed("empty element"));
            }
            if escaped_to.is_none() && value.eq_ignore_ascii_case("NULL") {
                out.push(None);
            } else {
                out.push(Some(value));
            }
        }
        match chars.next() {
            None => break,
            Some(',') => continue,
            Some(_) => return Err(ArrayError::Malformed("expected a comma between elements")),
        }
    }
    Ok(out)
}

/// Formats a one-dimensional `text[]` literal, every element quoted (`None` is NULL).
pub fn format_text_array(items: &[Option<&str>]) -> String {
    let mut out = String::from("{");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match item {
            None => out.push_str("NULL"),
            Some(s) => {
                out.push('"');
                for c in s.chars() {
                    if c == '"' || c == '\\' {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out.push('"');
            }
        }
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[Option<&str>]) -> Vec<Option<String>> {
        v.iter().map(|x| x.map(str::to_string)).collect()
    }

    #[test]
    fn plain_quoted_and_null_elements() {
        assert_eq!(parse_text_array("{}").unwrap(), s(&[]));
        assert_eq!(parse_text_array("{a,b}").unwrap(), s(&[Some("a"), Some("b")]));
        assert_eq!(
            parse_text_array(r#"{"a b",NULL,"NULL","x\"y","back\\slash",""}"#).unwrap(),
            s(&[Some("a b"), None, Some("NULL"), Some("x\"y"), Some("back\\slash"), Some("")])
        );
        assert!(parse_text_array("{ünï,{}}").is_err());
        assert_eq!(parse_text_array("[0:1]={7,8}").unwrap(), s(&[Some("7"), Some("8")]));
    }

    #[test]
    fn nested_literals_stay_text() {
        // A text element that is itself an array literal is quoted by array_out.
        assert_eq!(parse_text_array(r#"{"{1,2}","(1,\"x,y\")"}"#).unwrap(), s(&[Some("{1,2}"), Some("(1,\"x,y\")")]));
    }

    #[test]
    fn formatting_round_trips() {
        let items = [Some("a b"), None, Some("NULL"), Some("q\"uote\\"), Some("")];
        let text = format_text_array(&items);
        let back = parse_text_array(&text).unwrap();
        assert_eq!(back, items.iter().map(|i| i.map(str::to_string)).collect::<Vec<_>>());
    }

    #[test]
    fn malformed() {
        assert!(parse_text_array("a,b").is_err());
        assert!(parse_text_array("{\"a}").is_err());
        assert!(parse_text_array("{a,,b}").is_err());
        assert!(parse_text_array("{\"a\" b}").is_err());
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// PostgreSQL's `array_out` for `text[]`: an element is quoted only when it must be (empty,
    /// `NULL` in any case, or holding `"`, `\`, `{`, `}`, `,` or one of the spaces
    /// `array_isspace` knows).
    fn pg_array_out(items: &[Option<String>]) -> String {
        let parts: Vec<String> = items
            .iter()
            .map(|item| match item {
                None => "NULL".to_string(),
                Some(s) => {
                    let special = |c: char| {
                        matches!(c, '"' | '\\' | '{' | '}' | ',' | ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
                    };
                    if s.is_empty() || s.eq_ignore_ascii_case("NULL") || s.chars().any(special) {
                        let escaped: String = s
                            .chars()
                            .flat_map(|c| if c == '"' || c == '\\' { vec!['\\', c] } else { vec![c] })
                            .collect();
                        format!("\"{escaped}\"")
                    } else {
                        s.clone()
                    }
                }
            })
            .collect();
        format!("{{{}}}", parts.join(","))
    }

    fn element() -> impl Strategy<Value = Option<String>> {
        let tricky = "[a-zA-Z0-9 ,{}\"\\\\\t\n\r\u{b}\u{c}\u{a0}\u{2003}\u{85}é]{0,8}";
        proptest::option::weighted(0.9, prop_oneof![any::<String>(), tricky, Just("NULL".to_string())])
    }

    proptest! {
        #[test]
        fn what_format_writes_parses_back(items in proptest::collection::vec(element(), 0..8)) {
            let refs: Vec<Option<&str>> = items.iter().map(|i| i.as_deref()).collect();
            prop_assert_eq!(parse_text_array(&format_text_array(&refs)), Ok(items));
        }

        #[test]
        fn what_postgresql_prints_parses_back(items in proptest::collection::vec(element(), 0..8)) {
            prop_assert_eq!(parse_text_array(&pg_array_out(&items)), Ok(items));
        }

        #[test]
        fn any_text_is_parsed_or_refused_without_panic(text in "\\PC*|[{}\",\\\\ NUL]{0,16}") {
            let _ = parse_text_array(&text);
        }
    }

    #[test]
    fn unicode_spaces_are_part_of_an_unquoted_element() {
        // PostgreSQL prints these unquoted: only ASCII spaces are around elements.
        let items = vec![Some("a\u{a0}".to_string()), Some("\u{2003}b".to_string())];
        assert_eq!(parse_text_array(&pg_array_out(&items)), Ok(items));
    }

    #[test]
    fn an_escaped_space_at_the_end_of_an_unquoted_element_is_kept() {
        assert_eq!(parse_text_array("{a\\ ,b}"), Ok(vec![Some("a ".to_string()), Some("b".to_string())]));
    }
}
