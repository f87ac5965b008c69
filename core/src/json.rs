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

/// The changes of one transaction as a JSON array, for people to read (the exception log):
/// each change with its position, kind, table, the new row (`new`, by column), the old primary
/// key (`old_key`), the options of a truncation or the parts of a DDL statement (`statement`,
/// `search_path`, `role`, `tag`).
pub fn changes(changes: &[crate::changeset::ChangeRecord]) -> String {
    let mut out = String::from("[");
    for (i, c) in changes.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_change(&mut out, c);
    }
    out.push(']');
    out
}

/// Appends one change as [`changes`] writes it (an array built change by change).
pub fn push_change(out: &mut String, c: &crate::changeset::ChangeRecord) {
    use crate::logformat::Op;
    let vals: Vec<Option<&str>> = c.vals.iter().flatten().map(|v| v.as_deref()).collect();
    out.push_str(&format!("{{\"seq\":{},\"op\":", c.seq));
    push_string(out, c.op.code());
    out.push_str(",\"table\":");
    push_string(out, &format!("{}.{}", c.nsp, c.rel));
    match c.op {
        Op::Insert | Op::Update => {
            out.push_str(",\"new\":");
            out.push_str(&object(c.cols.iter().map(String::as_str).zip(vals.iter().copied())));
        }
        Op::Truncate => {
            out.push_str(",\"options\":");
            out.push_str(&object(["restart_identity"].into_iter().zip(vals.iter().copied())));
        }
        Op::Ddl => {
            out.push(',');
            let names = ["statement", "search_path", "role", "tag"];
            let parts = object(names.into_iter().zip(vals.iter().copied()));
            out.push_str(&parts[1..parts.len() - 1]);
        }
        Op::Delete => {}
    }
    if let Some(old) = &c.oldkey {
        out.push_str(",\"old_key\":");
        out.push_str(&object(c.cols.iter().map(String::as_str).zip(old.iter().map(|v| v.as_deref()))));
    }
    out.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changeset::{ChangeRecord, OldVersion};
    use crate::logformat::Op;

    #[test]
    fn changes_read_as_json() {
        let change = |op, vals: Option<Vec<Option<&str>>>, oldkey: Option<Vec<Option<&str>>>| ChangeRecord {
            seq: 1,
            op,
            nsp: "public".into(),
            rel: "t\"x".into(),
            cols: vec!["id".into(), "v".into()],
            vals: vals.map(|v| v.into_iter().map(|x| x.map(str::to_string)).collect()),
            oldkey: oldkey.map(|v| v.into_iter().map(|x| x.map(str::to_string)).collect()),
            old: OldVersion::Unknown,
        };
        let json = changes(&[
            change(Op::Insert, Some(vec![Some("1"), None]), None),
            change(Op::Update, Some(vec![Some("2"), Some("b")]), Some(vec![Some("1")])),
            change(Op::Delete, None, Some(vec![Some("2")])),
            change(Op::Ddl, Some(vec![Some("DROP TABLE t"), Some("public"), Some(""), Some("DROP TABLE")]), None),
        ]);
        assert_eq!(
            json,
            concat!(
                r#"[{"seq":1,"op":"I","table":"public.t\"x","new":{"id":"1","v":null}},"#,
                r#"{"seq":1,"op":"U","table":"public.t\"x","new":{"id":"2","v":"b"},"old_key":{"id":"1"}},"#,
                r#"{"seq":1,"op":"D","table":"public.t\"x","old_key":{"id":"2"}},"#,
                r#"{"seq":1,"op":"S","table":"public.t\"x","statement":"DROP TABLE t","search_path":"public","role":"","tag":"DROP TABLE"}]"#
            )
        );
        assert_eq!(changes(&[]), "[]");
    }

    #[test]
    fn objects_escape_everything() {
        let j = object([("id", Some("1")), ("note", Some("a \"b\"\n\\c\u{1}")), ("gone", None)].into_iter());
        assert_eq!(j, r#"{"id":"1","note":"a \"b\"\n\\c\u0001","gone":null}"#);
        assert_eq!(object(std::iter::empty()), "{}");
    }
}
