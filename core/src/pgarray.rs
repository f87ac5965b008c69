//! Reading PostgreSQL's text form of one-dimensional arrays (`{a,"b c",NULL}`), as libpq
//! returns `text[]` columns.

/// Why an array literal could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArrayError {
    /// Not of the form `{...}`.
    #[error("malformed array literal: {0}")]
    Malformed(&'static str),
}

/// Parses the text form of a one-dimensional array; unquoted `NULL` is a null element.
pub fn parse_text_array(text: &str) -> Result<Vec<Option<String>>, ArrayError> {
    let text = text.trim();
    // Arrays with explicit bounds print as "[0:1]={...}"; the bounds do not matter here.
    let body = match text.find("={") {
        Some(pos) if text.starts_with('[') => &text[pos + 1..],
        _ => text,
    };
    let inner =
        body.strip_prefix('{').and_then(|b| b.strip_suffix('}')).ok_or(ArrayError::Malformed("missing braces"))?;
    let mut out = Vec::new();
    if inner.trim().is_empty() {
        return Ok(out);
    }
    let mut chars = inner.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
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
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
        } else {
            let mut value = String::new();
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
                } else {
                    value.push(c);
                }
            }
            let trimmed = value.trim_end();
            if trimmed.is_empty() {
                return Err(ArrayError::Malformed("empty element"));
            }
            if trimmed.eq_ignore_ascii_case("NULL") {
                out.push(None);
            } else {
                out.push(Some(trimmed.to_string()));
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
