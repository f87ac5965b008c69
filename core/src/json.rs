//! Writing small JSON objects (row images in the conflict log) without a JSON library.

/// Appends `s` as a JSON string literal.
pub fn push_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A JSON object of text values (`None` is null), keys in the given order.
pub fn object<'a>(pairs: impl Iterator<Item = (&'a str, Option<&'a str>)>) -> String {
    let mut out = String::from("{");
    for (i, (k, v)) in pairs.enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_string(&mut out, k);
        out.push(':');
        match v {
            Some(v) => push_string(&mut out, v),
            None => out.push_str("null"),
        }
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_escape_everything() {
        let j = object([("id", Some("1")), ("note", Some("a \"b\"\n\\c\u{1}")), ("gone", None)].into_iter());
        assert_eq!(j, r#"{"id":"1","note":"a \"b\"\n\\c\u0001","gone":null}"#);
        assert_eq!(object(std::iter::empty()), "{}");
    }
}
