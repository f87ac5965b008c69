//! Reading libpq's connection error messages without depending on their language.
//!
//! libpq reports a failed connection only as text (there is no result to ask for the error's
//! fields), translated into the language of the client and of the server. With the connection's
//! error verbosity set to `PQERRORS_VERBOSE`, every error the server sent carries its SQLSTATE:
//! `<severity>:  <SQLSTATE>: <message>`, followed by a `LOCATION:  <function>, <file>:<line>`
//! line. [`split_verbose`] takes the SQLSTATE out and gives back the message as the default
//! verbosity would have shown it; [`is_login_failure`] tells from the SQLSTATE whether the peer
//! refused the login.

/// The SQLSTATE of the last server error in a verbose libpq error message (libpq tries each
/// host of a connection string in turn and reports every attempt; the last one decides), and
/// the message without SQLSTATEs and source locations.
pub fn split_verbose(text: &str) -> (Option<String>, String) {
    let mut sqlstate = None;
    let mut lines = Vec::new();
    for line in text.lines() {
        if is_location(line) {
            continue;
        }
        match find_sqlstate(line) {
            Some((at, code)) => {
                sqlstate = Some(code.to_string());
                lines.push(format!("{}{}", &line[..at], &line[at + code.len() + 2..]));
            }
            None => lines.push(line.to_string()),
        }
    }
    (sqlstate, lines.join("\n").trim_end().to_string())
}

/// Where `<severity>:  ` is followed by a SQLSTATE and `: `: the SQLSTATE's byte offset and text.
fn find_sqlstate(line: &str) -> Option<(usize, &str)> {
    let mut from = 0;
    while let Some(found) = line[from..].find(":  ") {
        let at = from + found + 3;
        if let Some(code) = line.get(at..at + 5) {
            let sqlstate = code.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_uppercase());
            if sqlstate && line[at + 5..].starts_with(": ") {
                return Some((at, code));
            }
        }
        from = at;
    }
    None
}

/// A verbose message's source location line (`LOCATION:  auth_failed, auth.c:334`, its first
/// word translated): a label, two spaces, and a C file name with a line number at the end.
fn is_location(line: &str) -> bool {
    let Some((_, rest)) = line.split_once(":  ") else {
        return false;
    };
    let Some((file, number)) = rest.rsplit_once(':') else {
        return false;
    };
    let file = file.rsplit([' ', ',']).next().unwrap_or("");
    file.ends_with(".c") && !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit())
}

/// Whether a server's SQLSTATE says the login was refused: class 28 (invalid authorization:
/// wrong password, no `pg_hba.conf` entry, unknown role, role not allowed to log in) or 42501
/// (no `CONNECT` privilege on the database).
pub fn is_login_failure(sqlstate: &str) -> bool {
    sqlstate.starts_with("28") || sqlstate == "42501"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_sqlstate_and_location_out() {
        let text = "connection to server at \"127.0.0.1\", port 5433 failed: FATAL:  28P01: password authentication failed for user \"alice\"\nLOCATION:  auth_failed, auth.c:334\n";
        let (code, message) = split_verbose(text);
        assert_eq!(code.as_deref(), Some("28P01"));
        assert_eq!(
            message,
            "connection to server at \"127.0.0.1\", port 5433 failed: FATAL:  password authentication failed for user \"alice\""
        );
    }

    #[test]
    fn does_not_depend_on_the_language() {
        let text = "Verbindung zum Server auf »127.0.0.1«, Port 5433 fehlgeschlagen: FATAL:  28P01: Passwort-Authentifizierung für Benutzer »alice« fehlgeschlagen\nORT:  auth_failed, auth.c:334";
        let (code, message) = split_verbose(text);
        assert_eq!(code.as_deref(), Some("28P01"));
        assert!(message.ends_with("Passwort-Authentifizierung für Benutzer »alice« fehlgeschlagen"), "{message}");
        assert!(!message.contains("auth.c"));
        assert!(is_login_failure("28P01"));
    }

    #[test]
    fn the_last_attempt_decides_and_client_side_errors_have_none() {
        let text = "connection to server at \"127.0.0.1\", port 1 failed: Connection refused\n\tIs the server running on that host and accepting TCP/IP connections?\nconnection to server at \"127.0.0.1\", port 5433 failed: FATAL:  3D000: database \"nodb\" does not exist\nLOCATION:  InitPostgres, postinit.c:948";
        let (code, message) = split_verbose(text);
        assert_eq!(code.as_deref(), Some("3D000"));
        assert!(!is_login_failure("3D000"));
        assert!(message.contains("Connection refused\n\tIs the server running"), "{message}");
        assert!(message.ends_with("FATAL:  database \"nodb\" does not exist"), "{message}");
        let (code, message) = split_verbose("fe_sendauth: no password supplied\n");
        assert_eq!((code, message.as_str()), (None, "fe_sendauth: no password supplied"));
    }

    #[test]
    fn text_that_only_looks_alike_is_left_alone() {
        let (code, message) = split_verbose("FATAL:  role \"AB:  CDEFG\" is odd");
        assert_eq!(code, None);
        assert_eq!(message, "FATAL:  role \"AB:  CDEFG\" is odd");
        assert!(is_login_failure("28000") && is_login_failure("42501") && !is_login_failure("53300"));
    }
}
