//! The schema a joining node copies from its peer: `pg_dump --schema-only --clean --if-exists`
//! output, split into what undoes it (its `DROP ... IF EXISTS` statements, run before a copy is
//! attempted again) and what creates it, made fit to run inside one transaction of the
//! joining node: psql meta-commands removed, session settings made local to the transaction,
//! and trompe's own objects (the extension, its capture triggers) left out, since the joining
//! node has trompe already and adds its tables itself.

/// A schema dump made ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaScript {
    /// Drops every object the dump creates (if it exists), in dependency order.
    pub undo: String,
    /// Creates every object of the dump.
    pub create: String,
}

/// Why a dump was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DumpError {
    /// A psql meta-command other than `\restrict` / `\unrestrict`: the dump cannot run as SQL.
    #[error("the schema dump holds a psql meta-command trompe cannot run: {0}")]
    MetaCommand(String),
    /// Not pg_dump output.
    #[error("the schema dump is not pg_dump output (no \"PostgreSQL database dump\" header)")]
    NotADump,
}

/// Names of the row and TRUNCATE triggers `trompe.add_table` creates.
const OWN_TRIGGERS: [&str; 2] = ["trompe_capture", "trompe_truncate"];

/// The table of contents header of one dump entry: `-- Name: n; Type: t; Schema: s; Owner: o`.
#[derive(Debug, PartialEq, Eq)]
struct EntryHeader<'a> {
    name: &'a str,
    kind: &'a str,
}

fn parse_header(line: &str) -> Option<EntryHeader<'_>> {
    let rest = line.strip_prefix("-- Name: ")?;
    let (name, rest) = rest.split_once("; Type: ")?;
    let (kind, _) = rest.split_once("; Schema: ")?;
    Some(EntryHeader { name, kind })
}

/// True for entries of trompe's own that the joining node must not run: the extension and
/// its comment, and the capture triggers on replicated tables.
fn is_trompes_own(header: &EntryHeader<'_>) -> bool {
    match header.kind {
        "EXTENSION" => header.name == "trompe",
        "COMMENT" => header.name == "EXTENSION trompe",
        "TRIGGER" => header.name.rsplit_once(' ').is_some_and(|(_, trigger)| OWN_TRIGGERS.contains(&trigger)),
        _ => false,
    }
}

/// A session setting made local to the transaction it runs in.
fn localized(line: &str) -> String {
    if let Some(rest) = line.strip_prefix("SET ") {
        return format!("SET LOCAL {rest}");
    }
    if line.starts_with("SELECT pg_catalog.set_config(") && line.ends_with(", false);") {
        return format!("{}, true);", &line[..line.len() - ", false);".len()]);
    }
    line.to_string()
}

/// True for `DROP` statements the undo part must not run: trompe itself and the schemas
/// every database has.
fn is_kept_drop(line: &str) -> bool {
    matches!(
        line,
        "DROP EXTENSION IF EXISTS trompe;" | "DROP SCHEMA IF EXISTS public;" | "DROP SCHEMA IF EXISTS trompe;"
    )
}

/// The parameter a `SET name = value;` line sets, if it is one.
fn set_parameter(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("SET ")?;
    let name = rest.split([' ', '=']).next()?;
    (!name.is_empty()).then_some(name)
}

/// The column option recent minor releases of older branches (15.20) keep internally in
/// `attoptions`: their own pg_dump leaves it out, a newer major's pg_dump (older than them)
/// dumps it, and no server accepts it back.
const ATTRIBUTE_VERSION_OPTION: &str = "pg_attver=";

/// A line of the dump without the internal column option, `None` if nothing is left of it
/// (`ALTER TABLE ONLY t ALTER COLUMN c SET (pg_attver=22163696);`).
fn without_internal_options(line: &str) -> Option<String> {
    let Some(at) = line.find(" SET (").filter(|_| line.starts_with("ALTER TABLE ") && line.ends_with(");")) else {
        return Some(line.to_string());
    };
    let (head, options) = (&line[..at], &line[at + " SET (".len()..line.len() - ");".len()]);
    if !options.contains(ATTRIBUTE_VERSION_OPTION) {
        return Some(line.to_string());
    }
    let kept: Vec<&str> =
        options.split(", ").filter(|o| !o.trim_start().starts_with(ATTRIBUTE_VERSION_OPTION)).collect();
    (!kept.is_empty()).then(|| format!("{head} SET ({});", kept.join(", ")))
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

/// Splits and prepares a `pg_dump --schema-only --clean --if-exists` script.
pub fn prepare(dump: &str) -> Result<SchemaScript, DumpError> {
    prepare_for(dump, |_| true)
}

/// As [`prepare`], for a server that knows only the parameters `known` accepts: a dump made
/// by a newer `pg_dump` (to read a newer source) sets parameters an older server lacks
/// (`transaction_timeout`), which are left out.
pub fn prepare_for(dump: &str, known: impl Fn(&str) -> bool) -> Result<SchemaScript, DumpError> {
    if !dump.contains("-- PostgreSQL database dump") {
        return Err(DumpError::NotADump);
    }
    let mut settings = Vec::new();
    let mut undo = Vec::new();
    let mut create = Vec::new();
    let mut in_entries = false;
    let mut skipping = false;
    let mut previous_blank_comment = false;
    for line in dump.lines() {
        if let Some(meta) = line.strip_prefix('\\') {
            if meta.starts_with("restrict ") || meta.starts_with("unrestrict ") {
                continue;
            }
            return Err(DumpError::MetaCommand(line.chars().take(60).collect()));
        }
        if previous_blank_comment {
            if let Some(header) = parse_header(line) {
                in_entries = true;
                skipping = is_trompes_own(&header);
            }
        }
        previous_blank_comment = line == "--";
        if set_parameter(line).is_some_and(|name| !known(name)) {
            continue;
        }
        if !in_entries {
            if line.starts_with("SET ") || line.starts_with("SELECT pg_catalog.set_config(") {
                settings.push(localized(line));
            } else if (line.starts_with("DROP ") || line.starts_with("ALTER ")) && !is_kept_drop(line) {
                undo.push(line.to_string());
            }
            continue;
        }
        // Settings between entries hold for the entries after them, even after a skipped one.
        if !skipping || line.starts_with("SET ") {
            if let Some(line) = without_internal_options(line) {
                create.push(localized(&line));
            }
        }
    }
    let settings = settings.join("\n");
    let join = |body: Vec<String>| {
        if body.is_empty() {
            String::new()
        } else {
            format!("{settings}\n{}\n", body.join("\n"))
        }
    };
    Ok(SchemaScript { undo: join(undo), create: join(create) })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = "--
-- PostgreSQL database dump
--

\\restrict abc123

SET statement_timeout = 0;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;

DROP TRIGGER IF EXISTS trompe_capture ON public.t;
ALTER TABLE IF EXISTS ONLY public.t DROP CONSTRAINT IF EXISTS t_pkey;
DROP TABLE IF EXISTS public.t;
DROP EXTENSION IF EXISTS trompe;
DROP EXTENSION IF EXISTS lo;
DROP SCHEMA IF EXISTS public;
--
-- Name: lo; Type: EXTENSION; Schema: -; Owner: -
--

CREATE EXTENSION IF NOT EXISTS lo WITH SCHEMA public;


--
-- Name: trompe; Type: EXTENSION; Schema: -; Owner: -
--

CREATE EXTENSION IF NOT EXISTS trompe WITH SCHEMA trompe;


--
-- Name: EXTENSION trompe; Type: COMMENT; Schema: -; Owner: 
--

COMMENT ON EXTENSION trompe IS 'trompe';


SET default_tablespace = '';

--
-- Name: t; Type: TABLE; Schema: public; Owner: postgres
--

CREATE TABLE public.t (
    id integer NOT NULL
);


--
-- Name: t trompe_capture; Type: TRIGGER; Schema: public; Owner: postgres
--

CREATE TRIGGER trompe_capture AFTER INSERT OR DELETE OR UPDATE ON public.t FOR EACH ROW EXECUTE FUNCTION trompe.capture_row();


--
-- Name: t audit; Type: TRIGGER; Schema: public; Owner: postgres
--

CREATE TRIGGER audit AFTER INSERT ON public.t FOR EACH ROW EXECUTE FUNCTION public.audit();


--
-- PostgreSQL database dump complete
--

\\unrestrict abc123
";

    #[test]
    fn splits_undo_from_create() {
        let s = prepare(DUMP).unwrap();
        assert!(s.undo.contains("DROP TABLE IF EXISTS public.t;"));
        assert!(s.undo.contains("ALTER TABLE IF EXISTS ONLY public.t DROP CONSTRAINT IF EXISTS t_pkey;"));
        assert!(s.undo.contains("DROP EXTENSION IF EXISTS lo;"));
        assert!(!s.undo.contains("DROP EXTENSION IF EXISTS trompe;"), "{}", s.undo);
        assert!(!s.undo.contains("DROP SCHEMA IF EXISTS public;"));
        assert!(!s.undo.contains("CREATE"));
        assert!(s.create.contains("CREATE EXTENSION IF NOT EXISTS lo WITH SCHEMA public;"));
        assert!(s.create.contains("CREATE TABLE public.t ("));
        assert!(!s.create.contains("DROP "));
    }

    #[test]
    fn leaves_out_trompes_own_objects_only() {
        let s = prepare(DUMP).unwrap();
        assert!(!s.create.contains("CREATE EXTENSION IF NOT EXISTS trompe"));
        assert!(!s.create.contains("COMMENT ON EXTENSION trompe"));
        assert!(!s.create.contains("trompe.capture_row"));
        assert!(s.create.contains("CREATE TRIGGER audit"), "user triggers are kept");
    }

    #[test]
    fn settings_stay_inside_the_transaction() {
        let s = prepare(DUMP).unwrap();
        for part in [&s.undo, &s.create] {
            assert!(part.starts_with("SET LOCAL statement_timeout = 0;"), "{part}");
            assert!(part.contains("SELECT pg_catalog.set_config('search_path', '', true);"));
            assert!(!part.contains("\\"), "no meta-commands: {part}");
            assert!(!part.lines().any(|l| l.starts_with("SET ") && !l.starts_with("SET LOCAL ")));
        }
        assert!(s.create.contains("SET LOCAL default_tablespace = '';"));
    }

    #[test]
    fn refuses_other_meta_commands_and_non_dumps() {
        let with_connect = DUMP.replace("\\restrict abc123", "\\connect other");
        assert!(matches!(prepare(&with_connect), Err(DumpError::MetaCommand(_))));
        assert_eq!(prepare("SELECT 1;"), Err(DumpError::NotADump));
    }

    #[test]
    fn settings_the_server_lacks_are_left_out() {
        let newer =
            DUMP.replace("SET statement_timeout = 0;", "SET statement_timeout = 0;\nSET transaction_timeout = 0;");
        let s = prepare_for(&newer, |name| name != "transaction_timeout").unwrap();
        assert!(!s.create.contains("transaction_timeout"), "{}", s.create);
        assert!(s.create.contains("SET LOCAL statement_timeout = 0;"));
        assert!(prepare(&newer).unwrap().create.contains("SET LOCAL transaction_timeout = 0;"));
    }

    #[test]
    fn internal_column_options_of_older_branches_are_left_out() {
        let newer = DUMP.replace(
            "CREATE TRIGGER audit",
            "ALTER TABLE ONLY public.t ALTER COLUMN id SET (pg_attver=22163696);\n\
             ALTER TABLE ONLY public.t ALTER COLUMN v SET (n_distinct=-1, pg_attver=22163696);\n\
             CREATE TRIGGER audit",
        );
        let s = prepare(&newer).unwrap();
        assert!(!s.create.contains("pg_attver"), "{}", s.create);
        assert!(s.create.contains("ALTER TABLE ONLY public.t ALTER COLUMN v SET (n_distinct=-1);"), "{}", s.create);
        assert_eq!(
            without_internal_options("ALTER TABLE ONLY t SET (fillfactor=50);").as_deref(),
            Some("ALTER TABLE ONLY t SET (fillfactor=50);")
        );
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

    #[test]
    fn an_empty_database_gives_empty_scripts() {
        let s = prepare("--\n-- PostgreSQL database dump\n--\n\nSET x = 1;\n").unwrap();
        assert_eq!(s.undo, "");
        assert_eq!(s.create, "");
    }
}
