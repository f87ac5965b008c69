//! The session settings a replicated DDL statement carries: those that change what DDL does or
//! accepts (whether function bodies are checked, how date, time and interval literals and
//! backslashes in strings read, where new tables and indexes go and with which access method,
//! how long it may wait for a lock). A peer sets them for the statement only, so it replays as
//! it ran at the origin.
//!
//! In a DDL log entry (`Op::Ddl`) the values list is `statement, search_path, role, command
//! tag`, followed by the settings as `name, value` pairs. Entries of versions that sent no
//! settings simply end after the tag; versions that know no settings ignore the pairs.

/// The settings captured with every DDL statement and set while it replays, in that order.
pub const REPLAYED: &[&str] = &[
    "check_function_bodies",
    "default_tablespace",
    "default_table_access_method",
    "default_toast_compression",
    "standard_conforming_strings",
    "escape_string_warning",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "timezone_abbreviations",
    "transform_null_equals",
    "array_nulls",
    "xmloption",
    "lock_timeout",
];

/// The setting that decides how backslashes in string literals read. It takes effect when a
/// statement is scanned, which for a string of several statements is before any of them runs:
/// the capture records the value the statement was scanned with.
pub const STANDARD_STRINGS: &str = "standard_conforming_strings";

/// Where the settings start in a DDL entry's values list.
pub const FIRST: usize = 4;

/// The settings of a DDL entry's values list (`vals[FIRST..]` as `name, value` pairs): only
/// names of [`REPLAYED`] (others, e.g. from a newer version, and NULLs are left out), each
/// once (the last pair wins), in the order of [`REPLAYED`].
pub fn decode(vals: &[Option<String>]) -> Vec<(&'static str, &str)> {
    let mut found: Vec<Option<&str>> = vec![None; REPLAYED.len()];
    let rest = vals.get(FIRST..).unwrap_or_default();
    for pair in rest.chunks_exact(2) {
        let (Some(name), Some(value)) = (&pair[0], &pair[1]) else { continue };
        if let Some(i) = REPLAYED.iter().position(|n| n.eq_ignore_ascii_case(name)) {
            found[i] = Some(value.as_str());
        }
    }
    REPLAYED.iter().zip(found).filter_map(|(name, value)| value.map(|v| (*name, v))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(items: &[Option<&str>]) -> Vec<Option<String>> {
        items.iter().map(|v| v.map(str::to_string)).collect()
    }

    #[test]
    fn entries_without_settings_have_none() {
        assert!(decode(&vals(&[Some("CREATE TABLE t ()"), Some("public"), Some("postgres"), Some("CREATE TABLE")]))
            .is_empty());
        assert!(decode(&vals(&[Some("CREATE TABLE t ()")])).is_empty());
        assert!(decode(&[]).is_empty());
    }

    #[test]
    fn known_pairs_are_kept_in_order_unknown_ones_left_out() {
        let v = vals(&[
            Some("stmt"),
            Some("sp"),
            Some("role"),
            Some("tag"),
            Some("TimeZone"),
            Some("Asia/Tokyo"),
            Some("session_replication_role"),
            Some("origin"),
            Some("check_function_bodies"),
            Some("off"),
            Some("datestyle"),
            None,
            Some("LOCK_TIMEOUT"),
            Some("1"),
            Some("lock_timeout"),
            Some("200"),
            Some("dangling"),
        ]);
        assert_eq!(
            decode(&v),
            vec![("check_function_bodies", "off"), ("TimeZone", "Asia/Tokyo"), ("lock_timeout", "200")]
        );
    }
}
