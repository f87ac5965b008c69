//! The schema a joining node copies from its peer, read through the dump's table of contents:
//! the worker dumps the peer with `pg_dump --format=custom`, lists the archive with
//! `pg_restore -l`, leaves trompe's own entries (the extension, its comment, the capture
//! triggers on replicated tables) out of that list, since the joining node has trompe already
//! and adds its tables itself, and has `pg_restore -L` write the SQL of the rest twice: as it
//! is (what creates the schema) and with `--clean --if-exists` (the same, preceded by the
//! `DROP ... IF EXISTS` statements that undo it, run before a copy is attempted again).
//!
//! Text inside entries is never edited. Only pg_restore's own lines around them are read: its
//! preamble (header comments, `\restrict KEY`, the session settings) and its closing
//! `\unrestrict KEY`.

/// A schema dump made ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaScript {
    /// Drops every object the dump creates (if it exists), in dependency order; empty if the
    /// dump creates nothing.
    pub undo: String,
    /// Creates every object of the dump; empty if it creates nothing.
    pub create: String,
}

/// Why a dump was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DumpError {
    /// pg_restore's preamble holds a psql meta-command other than `\restrict KEY`.
    #[error("the schema dump holds a psql meta-command trompe cannot run: {0}")]
    MetaCommand(String),
    /// Not pg_restore's text output.
    #[error("the schema dump is not pg_restore output (no \"PostgreSQL database dump\" header)")]
    NotADump,
    /// A line of pg_restore's preamble that is neither a comment nor a setting.
    #[error("the schema dump's preamble holds an unexpected line: {0}")]
    UnexpectedPreamble(String),
    /// The output started with `\restrict KEY` but does not end with `\unrestrict KEY`.
    #[error("the schema dump does not end with the \\unrestrict line its \\restrict line calls for")]
    MissingUnrestrict,
    /// A line of `pg_restore -l` that is not a table of contents entry.
    #[error("pg_restore's table of contents holds an unexpected line: {0}")]
    BadTocLine(String),
    /// The script with `--clean` is not the script without it preceded by drop statements.
    #[error("pg_restore wrote different entries with --clean than without it")]
    CleanMismatch,
}

/// The relation (`pg_class` OID) of `pg_extension`, as the table of contents names it.
pub const PG_EXTENSION: u32 = 3079;
/// The relation (`pg_class` OID) of `pg_trigger`, as the table of contents names it.
pub const PG_TRIGGER: u32 = 2620;

/// Names of the row and TRUNCATE triggers `trompe.add_table` creates.
pub const OWN_TRIGGERS: [&str; 2] = ["trompe_capture", "trompe_truncate"];

/// One entry of a `pg_restore -l` listing:
/// `<dump id>; <catalog table oid> <object oid> <type> <schema> <name> <owner>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TocEntry<'a> {
    /// The entry's number in the archive (what `pg_restore -L` reads).
    pub dump_id: u32,
    /// The OID of the catalog the object is in (`pg_trigger`, ...), 0 for comments and ACLs.
    pub table_oid: u32,
    /// The object's OID in that catalog, 0 for comments and ACLs.
    pub oid: u32,
    /// The rest: type, schema (`-` for none), name and owner, separated by single spaces;
    /// which space separates what cannot be told when names hold spaces.
    pub rest: &'a str,
}

/// Parses one line of a `pg_restore -l` listing: `None` for its comments (`;`) and blank lines.
pub fn parse_toc_line(line: &str) -> Result<Option<TocEntry<'_>>, DumpError> {
    if line.trim().is_empty() || line.starts_with(';') {
        return Ok(None);
    }
    let bad = || DumpError::BadTocLine(line.chars().take(120).collect());
    let (id, after) = line.split_once("; ").ok_or_else(bad)?;
    let (table_oid, after) = after.split_once(' ').ok_or_else(bad)?;
    let (oid, rest) = after.split_once(' ').ok_or_else(bad)?;
    let number = |s: &str| s.parse::<u32>().ok().filter(|_| s.bytes().all(|b| b.is_ascii_digit()));
    Ok(Some(TocEntry {
        dump_id: number(id).ok_or_else(bad)?,
        table_oid: number(table_oid).ok_or_else(bad)?,
        oid: number(oid).ok_or_else(bad)?,
        rest,
    }))
}

/// The objects of trompe's own on the dumped server, by OID: they are left out of the copy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnObjects {
    /// The `pg_extension` OID of trompe.
    pub extension: Option<u32>,
    /// The `pg_trigger` OIDs of trompe's capture triggers ([`OWN_TRIGGERS`]).
    pub triggers: Vec<u32>,
}

impl OwnObjects {
    /// True for an entry of trompe's own: the extension, its comment, its capture triggers.
    pub fn owns(&self, entry: &TocEntry<'_>) -> bool {
        match (entry.table_oid, entry.oid) {
            (PG_EXTENSION, oid) => self.extension == Some(oid),
            (PG_TRIGGER, oid) => self.triggers.contains(&oid),
            // A comment has no OID of its own; on an extension its schema is `-` and its owner empty.
            (0, 0) => matches!(entry.rest, "COMMENT - EXTENSION trompe " | "COMMENT - EXTENSION trompe"),
            _ => false,
        }
    }
}

/// The listing `pg_restore -L` reads to restore every entry of `listing` but trompe's own.
pub fn without_own_entries(listing: &str, own: &OwnObjects) -> Result<String, DumpError> {
    let mut kept = String::with_capacity(listing.len());
    for line in listing.lines() {
        if parse_toc_line(line)?.is_some_and(|entry| own.owns(&entry)) {
            continue;
        }
        kept.push_str(line);
        kept.push('\n');
    }
    Ok(kept)
}

/// Whether `pg_restore --help` lists `--restrict-key` (15.14, 16.10, 17.6, 18.0 and later).
pub fn restore_has_restrict_key(help: &str) -> bool {
    help.contains("--restrict-key")
}

/// Column options servers keep internally in `attoptions` (recent minor releases of older
/// branches, 15.20, keep `pg_attver`): their own pg_dump leaves them out, a newer major's
/// pg_dump dumps them (`ALTER TABLE ... ALTER COLUMN c SET (pg_attver=...)`), and no server
/// accepts them back, so the joining node drops them from such statements.
pub fn is_internal_column_option(name: &str) -> bool {
    name == "pg_attver"
}

/// pg_restore's text output split into its own lines and the entries.
#[derive(Debug, PartialEq, Eq)]
struct RestoreOutput<'a> {
    /// Everything up to the entries (or the drop statements before them), as written.
    preamble: &'a str,
    /// The preamble's settings lines.
    settings: Vec<&'a str>,
    /// The rest, without the closing `\unrestrict KEY` line.
    body: &'a str,
}

/// A session setting of pg_restore's preamble.
fn is_setting(line: &str) -> bool {
    (line.starts_with("SET ") || line.starts_with("SELECT pg_catalog.set_config(")) && line.ends_with(';')
}

/// Splits pg_restore's text output: its preamble ends with the blank line after its block of
/// settings (settings between entries come later, each after a blank line of its own).
fn split_output(text: &str) -> Result<RestoreOutput<'_>, DumpError> {
    if !text.starts_with("--\n-- PostgreSQL database dump\n--\n") {
        return Err(DumpError::NotADump);
    }
    let mut key = None;
    let mut settings = Vec::new();
    let mut at = 0;
    let mut end = None;
    for line in text.split_inclusive('\n') {
        let start = at;
        at += line.len();
        let line = line.strip_suffix('\n').unwrap_or(line);
        if !settings.is_empty() && !is_setting(line) {
            // The blank line closing the settings belongs to the preamble.
            end = Some(if line.is_empty() { at } else { start });
            break;
        }
        if is_setting(line) {
            settings.push(line);
        } else if let Some(meta) = line.strip_prefix('\\') {
            match meta.strip_prefix("restrict ") {
                Some(k) if key.is_none() && !k.is_empty() => key = Some(k),
                _ => return Err(DumpError::MetaCommand(line.chars().take(60).collect())),
            }
        } else if !(line.is_empty() || line.starts_with("--")) {
            return Err(DumpError::UnexpectedPreamble(line.chars().take(120).collect()));
        }
    }
    let end = end.unwrap_or(text.len());
    let (preamble, mut body) = text.split_at(end);
    if let Some(key) = key {
        let closing = format!("\\unrestrict {key}\n");
        let trimmed = body.trim_end_matches('\n');
        let without = trimmed.strip_suffix(closing.trim_end_matches('\n')).ok_or(DumpError::MissingUnrestrict)?;
        if !without.is_empty() && !without.ends_with('\n') {
            return Err(DumpError::MissingUnrestrict);
        }
        body = without;
    }
    Ok(RestoreOutput { preamble, settings, body })
}

/// The parameter a `SET name ...;` line sets, if it is one.
fn set_parameter(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("SET ")?;
    let name = rest.split([' ', '=']).next()?;
    (!name.is_empty()).then_some(name)
}

/// True if `text` holds SQL beyond comments and blank lines.
fn has_statements(text: &str) -> bool {
    text.lines().any(|l| !l.trim().is_empty() && !l.starts_with("--"))
}

/// Prepares the schema script from pg_restore's text output of the same listing without
/// (`plain`) and with `--clean --if-exists` (`clean`), for a server that knows only the
/// parameters `known` accepts: a newer pg_restore's preamble sets parameters an older server
/// lacks (`transaction_timeout`), which are left out. Both outputs must carry the same
/// `\restrict` key (pg_restore's `--restrict-key`), or none.
pub fn prepare(plain: &str, clean: &str, known: impl Fn(&str) -> bool) -> Result<SchemaScript, DumpError> {
    let create = split_output(plain)?;
    let with_drops = split_output(clean)?;
    if create.preamble != with_drops.preamble {
        return Err(DumpError::CleanMismatch);
    }
    let drops = with_drops.body.strip_suffix(create.body).ok_or(DumpError::CleanMismatch)?;
    let settings: Vec<&str> =
        create.settings.iter().copied().filter(|line| set_parameter(line).is_none_or(&known)).collect();
    let settings = settings.join("\n");
    let script = |body: &str| if has_statements(body) { format!("{settings}\n\n{body}") } else { String::new() };
    Ok(SchemaScript { undo: script(drops), create: script(create.body) })
}

/// The major version a `pg_dump --version` output names (`pg_dump (PostgreSQL) 18.4`,
/// `pg_dump (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)`, `... 19devel`).
pub fn pg_dump_major(version_output: &str) -> Option<u32> {
    let version = version_output.split_whitespace().skip_while(|w| *w != "(PostgreSQL)").nth(1)?;
    let digits: String = version.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Which `pg_dump` reads a source server of major version `source_major`: the first of
/// `candidates` (in order of preference, each with its major version) at least that new.
pub fn choose_pg_dump<T>(candidates: &[(T, u32)], source_major: u32) -> Option<&T> {
    candidates.iter().find(|(_, major)| *major >= source_major).map(|(c, _)| c)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const LISTING: &str = ";
; Archive created at 2026-01-01 00:00:00 UTC
;     dbname: app
;
; Selected TOC Entries:
;
7; 2615 2200 SCHEMA - public postgres
2; 3079 16400 EXTENSION - trompe 
3364; 0 0 COMMENT - EXTENSION trompe 
3; 3079 16500 EXTENSION - lo 
3365; 0 0 COMMENT - EXTENSION lo 
217; 1259 16384 TABLE public t postgres
3366; 0 0 COMMENT public TABLE t postgres
3213; 2620 16394 TRIGGER public t trompe_capture postgres
3214; 2620 16395 TRIGGER public t trompe_truncate postgres
3215; 2620 16396 TRIGGER public trompe_capture t postgres
";

    fn own() -> OwnObjects {
        OwnObjects { extension: Some(16400), triggers: vec![16394, 16395] }
    }

    #[test]
    fn parses_entries_and_skips_comments() {
        assert_eq!(parse_toc_line("; Selected TOC Entries:"), Ok(None));
        assert_eq!(parse_toc_line(""), Ok(None));
        assert_eq!(
            parse_toc_line("3213; 2620 16394 TRIGGER my schema t x trompe_capture bob smith"),
            Ok(Some(TocEntry {
                dump_id: 3213,
                table_oid: 2620,
                oid: 16394,
                rest: "TRIGGER my schema t x trompe_capture bob smith"
            }))
        );
        for bad in ["x; 1 2 TABLE", "1; 2 TABLE", "1;2 3 TABLE", "-1; 2 3 TABLE", "1; +2 3 TABLE", "99999999999; 0 0 X"]
        {
            assert!(matches!(parse_toc_line(bad), Err(DumpError::BadTocLine(_))), "{bad}");
        }
    }

    #[test]
    fn leaves_out_trompes_own_entries_only() {
        let kept = without_own_entries(LISTING, &own()).unwrap();
        for gone in ["EXTENSION - trompe", "COMMENT - EXTENSION trompe", "t trompe_capture", "t trompe_truncate"] {
            assert!(!kept.contains(gone), "{gone} left out: {kept}");
        }
        for stays in [
            "; Selected TOC Entries:",
            "7; 2615 2200 SCHEMA - public postgres",
            "3; 3079 16500 EXTENSION - lo ",
            "3365; 0 0 COMMENT - EXTENSION lo ",
            "3366; 0 0 COMMENT public TABLE t postgres",
            "3215; 2620 16396 TRIGGER public trompe_capture t postgres",
        ] {
            assert!(kept.lines().any(|l| l == stays), "{stays} kept: {kept}");
        }
        assert_eq!(
            without_own_entries(LISTING, &OwnObjects::default()).unwrap().lines().count(),
            LISTING.lines().count() - 1
        );
        assert!(matches!(without_own_entries("1; 2 3 TABLE\ngarbage\n", &own()), Err(DumpError::BadTocLine(_))));
    }

    const PREAMBLE: &str = "--
-- PostgreSQL database dump
--

\\restrict abc123

-- Dumped from database version 18.4
-- Dumped by pg_dump version 18.4

SET statement_timeout = 0;
SET lock_timeout = 0;
SET transaction_timeout = 0;
SET client_encoding = 'UTF8';
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;

";

    const DROPS: &str = "DROP TRIGGER IF EXISTS audit ON public.t;
DROP TABLE IF EXISTS public.t;
DROP FUNCTION IF EXISTS public.f();
-- *not* dropping schema, since initdb creates it
";

    const ENTRIES: &str = "--
-- Name: f(); Type: FUNCTION; Schema: public; Owner: postgres
--

CREATE FUNCTION public.f() RETURNS void
    LANGUAGE plpgsql
    AS $$
BEGIN
SET work_mem = '64MB';
SET LOCAL work_mem = '1MB';
\\not a meta-command
END $$;


SET default_tablespace = '';

--
-- Name: t; Type: TABLE; Schema: public; Owner: postgres
--

CREATE TABLE public.t (
    id integer NOT NULL,
    v text DEFAULT 'a
\\unrestrict abc123
'::text
);


--
-- PostgreSQL database dump complete
--

";

    fn output(drops: &str) -> String {
        format!("{PREAMBLE}{drops}{ENTRIES}\\unrestrict abc123\n\n")
    }

    #[test]
    fn the_entries_run_as_pg_restore_wrote_them() {
        let s = prepare(&output(""), &output(DROPS), |_| true).unwrap();
        assert!(s.create.ends_with(ENTRIES), "{}", s.create);
        assert!(s.undo.ends_with(DROPS), "{}", s.undo);
        for part in [&s.create, &s.undo] {
            assert!(part.starts_with("SET statement_timeout = 0;\n"), "{part}");
            assert!(part.contains("SELECT pg_catalog.set_config('search_path', '', false);\n"));
            assert!(!part.contains("\\restrict"), "{part}");
            assert!(!part.contains("Dumped from"), "{part}");
        }
        assert!(!s.undo.contains("CREATE"));
        assert!(!s.create.contains("DROP "));
        assert!(!s.create.ends_with("\\unrestrict abc123\n"), "the closing line is left out");
    }

    #[test]
    fn settings_the_server_lacks_are_left_out_of_the_preamble_only() {
        let s = prepare(&output(""), &output(DROPS), |name| name != "transaction_timeout").unwrap();
        assert!(!s.create.contains("transaction_timeout"), "{}", s.create);
        assert!(s.create.contains("SET lock_timeout = 0;\nSET client_encoding"), "{}", s.create);
        let s =
            prepare(&output(""), &output(DROPS), |name| name != "work_mem" && name != "default_tablespace").unwrap();
        assert!(s.create.ends_with(ENTRIES), "entries are never edited: {}", s.create);
    }

    #[test]
    fn without_restrict_lines() {
        let plain = output("").replace("\\restrict abc123\n\n", "").replace("\\unrestrict abc123\n\n", "");
        let clean = output(DROPS).replace("\\restrict abc123\n\n", "").replace("\\unrestrict abc123\n\n", "");
        let s = prepare(&plain, &clean, |_| true).unwrap();
        assert!(s.create.ends_with(ENTRIES), "{}", s.create);
        assert!(s.undo.ends_with(DROPS));
    }

    #[test]
    fn refuses_what_pg_restore_does_not_write() {
        let connect = output("").replace("\\restrict abc123", "\\connect other");
        assert!(matches!(prepare(&connect, &output(DROPS), |_| true), Err(DumpError::MetaCommand(_))));
        assert_eq!(prepare("SELECT 1;", "SELECT 1;", |_| true), Err(DumpError::NotADump));
        let unclosed = output("").replace("\\unrestrict abc123\n\n", "");
        assert_eq!(prepare(&unclosed, &output(DROPS), |_| true), Err(DumpError::MissingUnrestrict));
        let other_key = output(DROPS).replace("abc123", "def456");
        assert_eq!(prepare(&output(""), &other_key, |_| true), Err(DumpError::CleanMismatch));
        let other_entries = output(DROPS).replace("public.f()", "public.g()");
        assert_eq!(prepare(&output(""), &other_entries, |_| true), Err(DumpError::CleanMismatch));
        let odd = output("").replace("-- Dumped by", "CREATE TABLE x ();\n-- Dumped by");
        assert!(matches!(prepare(&odd, &odd, |_| true), Err(DumpError::UnexpectedPreamble(_))));
    }

    #[test]
    fn an_empty_database_gives_empty_scripts() {
        let empty = format!("{PREAMBLE}--\n-- PostgreSQL database dump complete\n--\n\n\\unrestrict abc123\n\n");
        let s = prepare(&empty, &empty, |_| true).unwrap();
        assert_eq!(s, SchemaScript { undo: String::new(), create: String::new() });
    }

    #[test]
    fn internal_column_options() {
        assert!(is_internal_column_option("pg_attver"));
        assert!(!is_internal_column_option("n_distinct"));
        assert!(restore_has_restrict_key("  --restrict-key=RESTRICT_KEY  use provided string as psql \\restrict key"));
        assert!(!restore_has_restrict_key("  --role=ROLENAME"));
    }

    #[test]
    fn the_pg_dump_for_a_source_is_the_first_new_enough() {
        assert_eq!(pg_dump_major("pg_dump (PostgreSQL) 18.4\n"), Some(18));
        assert_eq!(pg_dump_major("pg_dump (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)"), Some(15));
        assert_eq!(pg_dump_major("pg_dump (PostgreSQL) 19devel"), Some(19));
        assert_eq!(pg_dump_major("pg_dump: not found"), None);
        let candidates = [("own", 15), ("configured", 18), ("debian", 16)];
        assert_eq!(choose_pg_dump(&candidates, 15), Some(&"own"));
        assert_eq!(choose_pg_dump(&candidates, 16), Some(&"configured"));
        assert_eq!(choose_pg_dump(&candidates, 18), Some(&"configured"));
        assert_eq!(choose_pg_dump(&candidates, 19), None);
    }

    /// Any text in entries: lines starting with `SET`, `\`, `--`, the closing line's text.
    fn entry_text() -> impl Strategy<Value = String> {
        let line = prop_oneof![
            any::<String>().prop_map(|s| s.replace('\n', " ")),
            "(SET |SET LOCAL |\\\\|--|\\\\unrestrict abc123|SELECT pg_catalog.set_config\\()[a-z ;=']{0,12}",
            Just(String::new()),
        ];
        proptest::collection::vec(line, 0..12).prop_map(|lines| lines.join("\n"))
    }

    proptest! {
        #[test]
        fn entries_and_drops_are_kept_byte_for_byte(text in entry_text(), drops in entry_text()) {
            let entries = format!("--\n-- Name: f; Type: FUNCTION; Schema: public; Owner: o\n--\n\nCREATE FUNCTION f() AS $$\n{text}\n$$;\n\n--\n-- PostgreSQL database dump complete\n--\n\n");
            let drops = format!("DROP x;\n{drops}\n");
            let plain = format!("{PREAMBLE}{entries}\\unrestrict abc123\n\n");
            let clean = format!("{PREAMBLE}{drops}{entries}\\unrestrict abc123\n\n");
            let s = prepare(&plain, &clean, |name| name != "transaction_timeout").unwrap();
            prop_assert!(s.create.ends_with(&entries));
            prop_assert!(s.undo.ends_with(&drops));
        }

        #[test]
        fn listing_lines_round_trip(id: u32, table_oid: u32, oid: u32, rest in "[^\n]{0,40}") {
            let line = format!("{id}; {table_oid} {oid} {rest}");
            let parsed = parse_toc_line(&line).unwrap().unwrap();
            prop_assert_eq!(parsed, TocEntry { dump_id: id, table_oid, oid, rest: &rest });
        }

        #[test]
        fn any_listing_line_is_parsed_or_refused_without_panic(line in "[^\n]{0,40}") {
            let _ = parse_toc_line(&line);
        }
    }
}
