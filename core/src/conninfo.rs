//! Connection strings for peers: parsing both libpq forms (`key=value ...` and
//! `postgresql://...` URIs), adding trompe's defaults, and showing them without the password.
//!
//! The parsed pairs are handed to libpq as keyword/value arrays, so nothing is re-quoted on the
//! way and what trompe checked is exactly what libpq uses.

use std::fmt::Write as _;

/// Connection keywords a peer's connection string may use (those of libpq 15 and 16); the
/// libpq the server links checks them again when a peer is added (it may be older).
pub const KNOWN_KEYWORDS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "passfile",
    "channel_binding",
    "connect_timeout",
    "client_encoding",
    "options",
    "application_name",
    "fallback_application_name",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "replication",
    "gssencmode",
    "sslmode",
    "sslcompression",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "requirepeer",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "krbsrvname",
    "gsslib",
    "service",
    "target_session_attrs",
    "load_balance_hosts",
    "require_auth",
    "sslcertmode",
];

/// Keywords whose values are secrets and are never shown.
const SECRET_KEYWORDS: &[&str] = &["password", "sslpassword"];

/// Why a connection string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConninfoError {
    /// A `key=value` item has no `=`.
    #[error("invalid connection string: missing \"=\" after \"{0}\"")]
    MissingEquals(String),
    /// A quoted value is not closed.
    #[error("invalid connection string: unterminated quoted value for \"{0}\"")]
    UnterminatedQuote(String),
    /// A keyword libpq does not know.
    #[error("invalid connection string: unknown option \"{0}\"")]
    UnknownKeyword(String),
    /// A URI that cannot be read.
    #[error("invalid connection URI: {0}")]
    BadUri(String),
    /// The string is empty.
    #[error("invalid connection string: it is empty")]
    Empty,
}

/// A parsed connection string: keyword/value pairs in the order given (a later duplicate
/// replaces an earlier one, as in libpq).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ConnInfo {
    pairs: Vec<(String, String)>,
}

impl ConnInfo {
    /// Parses either form of a libpq connection string.
    pub fn parse(text: &str) -> Result<Self, ConninfoError> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(ConninfoError::Empty);
        }
        let info = if trimmed.starts_with("postgresql://") || trimmed.starts_with("postgres://") {
            parse_uri(trimmed)?
        } else {
            parse_keyword_value(trimmed)?
        };
        if let Some((key, _)) = info.pairs.iter().find(|(k, _)| !KNOWN_KEYWORDS.contains(&k.as_str())) {
            return Err(ConninfoError::UnknownKeyword(key.clone()));
        }
        Ok(info)
    }

    /// The value given for `key`, if any.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Sets `key` to `value`, replacing any earlier value.
    pub fn set(&mut self, key: &str, value: &str) {
        match self.pairs.iter_mut().find(|(k, _)| k == key) {
            Some(pair) => pair.1 = value.to_string(),
            None => self.pairs.push((key.to_string(), value.to_string())),
        }
    }

    /// Removes `key` and returns its value, if it had one.
    pub fn take(&mut self, key: &str) -> Option<String> {
        let at = self.pairs.iter().position(|(k, _)| k == key)?;
        Some(self.pairs.remove(at).1)
    }

    /// Sets `key` to `value` unless the user gave a value for it.
    pub fn set_default(&mut self, key: &str, value: &str) {
        if self.get(key).is_none() {
            self.pairs.push((key.to_string(), value.to_string()));
        }
    }

    /// The pairs, for libpq's `PQconnectStartParams`.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.pairs
    }

    /// The connection string in `key=value` form with every secret replaced by `********`,
    /// safe for logs, errors and views.
    pub fn redacted(&self) -> String {
        self.render(true)
    }

    /// The connection string in `key=value` form, secrets included.
    pub fn to_keyword_value(&self) -> String {
        self.render(false)
    }

    fn render(&self, hide_secrets: bool) -> String {
        let mut out = String::new();
        for (key, value) in &self.pairs {
            if !out.is_empty() {
                out.push(' ');
            }
            let shown = if hide_secrets && SECRET_KEYWORDS.contains(&key.as_str()) { "********" } else { value };
            let _ = write!(out, "{key}={}", quote_value(shown));
        }
        out
    }
}

/// Quotes a value for a `key=value` connection string when it needs it.
fn quote_value(value: &str) -> String {
    let plain = !value.is_empty() && !value.chars().any(|c| c.is_whitespace() || c == '\'' || c == '\\');
    if plain {
        return value.to_string();
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

fn parse_keyword_value(text: &str) -> Result<ConnInfo, ConninfoError> {
    let mut info = ConnInfo::default();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(ConninfoError::MissingEquals(key));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some(escaped) => value.push(escaped),
                        None => break,
                    },
                    '\'' => {
                        closed = true;
                        break;
                    }
                    other => value.push(other),
                }
            }
            if !closed {
                return Err(ConninfoError::UnterminatedQuote(key));
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        info.set(&key, &value);
    }
    if info.pairs.is_empty() {
        return Err(ConninfoError::Empty);
    }
    Ok(info)
}

fn percent_decode(text: &str) -> Result<String, ConninfoError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ConninfoError::BadUri(format!("invalid percent-encoded token \"{}\"", &text[i..])))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ConninfoError::BadUri("percent-encoding is not valid UTF-8".into()))
}

fn parse_uri(text: &str) -> Result<ConnInfo, ConninfoError> {
    let mut info = ConnInfo::default();
    let rest = text.split_once("://").map(|(_, r)| r).unwrap_or_default();
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (authority, dbname) = match before_query.split_once('/') {
        Some((a, d)) => (a, Some(d)),
        None => (before_query, None),
    };
    let (userinfo, hostlist) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    if let Some(userinfo) = userinfo {
        let (user, password) = match userinfo.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (userinfo, None),
        };
        if !user.is_empty() {
            info.set("user", &percent_decode(user)?);
        }
        if let Some(password) = password {
            info.set("password", &percent_decode(password)?);
        }
    }
    if !hostlist.is_empty() {
        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        for spec in hostlist.split(',') {
            let (host, port) = if let Some(inner) = spec.strip_prefix('[') {
                let (h, after) = inner
                    .split_once(']')
                    .ok_or_else(|| ConninfoError::BadUri(format!("unterminated IPv6 address in \"{spec}\"")))?;
                (h.to_string(), after.strip_prefix(':').map(str::to_string))
            } else {
                match spec.split_once(':') {
                    Some((h, p)) => (percent_decode(h)?, Some(p.to_string())),
                    None => (percent_decode(spec)?, None),
                }
            };
            if let Some(p) = &port {
                if p.is_empty() || !p.chars().all(|c| c.is_ascii_digit()) {
                    return Err(ConninfoError::BadUri(format!("invalid port \"{p}\"")));
                }
            }
            hosts.push(host);
            ports.push(port.unwrap_or_default());
        }
        if hosts.iter().any(|h| !h.is_empty()) {
            info.set("host", &hosts.join(","));
        }
        if ports.iter().any(|p| !p.is_empty()) {
            info.set("port", &ports.join(","));
        }
    }
    if let Some(db) = dbname {
        if !db.is_empty() {
            info.set("dbname", &percent_decode(db)?);
        }
    }
    if let Some(query) = query {
        for item in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| ConninfoError::BadUri(format!("missing \"=\" in parameter \"{item}\"")))?;
            let key = percent_decode(k)?;
            // libpq's URI aliases
            let key = match key.as_str() {
                "ssl" if v == "true" => {
                    info.set("sslmode", "require");
                    continue;
                }
                _ => key,
            };
            info.set(&key, &percent_decode(v)?);
        }
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyword_value_with_quotes_and_escapes() {
        let c = ConnInfo::parse(r"host=localhost port = 5433 dbname='my db' password='it\'s' user=a\ b").unwrap();
        assert_eq!(c.get("host"), Some("localhost"));
        assert_eq!(c.get("port"), Some("5433"));
        assert_eq!(c.get("dbname"), Some("my db"));
        assert_eq!(c.get("password"), Some("it's"));
        assert_eq!(c.get("user"), Some("a b"));
    }

    #[test]
    fn later_duplicate_wins() {
        let c = ConnInfo::parse("port=1 port=2").unwrap();
        assert_eq!(c.get("port"), Some("2"));
        assert_eq!(c.pairs().len(), 1);
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(ConnInfo::parse("   "), Err(ConninfoError::Empty));
        assert_eq!(ConnInfo::parse("host"), Err(ConninfoError::MissingEquals("host".into())));
        assert_eq!(ConnInfo::parse("host='x"), Err(ConninfoError::UnterminatedQuote("host".into())));
        assert_eq!(ConnInfo::parse("hots=x"), Err(ConninfoError::UnknownKeyword("hots".into())));
        assert!(matches!(ConnInfo::parse("postgresql://h:port/db"), Err(ConninfoError::BadUri(_))));
        assert!(matches!(ConnInfo::parse("postgresql://h/db?x"), Err(ConninfoError::BadUri(_))));
        assert!(matches!(ConnInfo::parse("postgresql://h/%zz"), Err(ConninfoError::BadUri(_))));
    }

    #[test]
    fn uri_form() {
        let c = ConnInfo::parse(
            "postgresql://al%40x:s%3Acret@db1:5432,[::1]:6543/app?sslmode=disable&application_name=a%20b",
        )
        .unwrap();
        assert_eq!(c.get("user"), Some("al@x"));
        assert_eq!(c.get("password"), Some("s:cret"));
        assert_eq!(c.get("host"), Some("db1,::1"));
        assert_eq!(c.get("port"), Some("5432,6543"));
        assert_eq!(c.get("dbname"), Some("app"));
        assert_eq!(c.get("sslmode"), Some("disable"));
        assert_eq!(c.get("application_name"), Some("a b"));
        let bare = ConnInfo::parse("postgres://").unwrap();
        assert!(bare.pairs().is_empty());
    }

    #[test]
    fn redaction_hides_secrets_only() {
        let c = ConnInfo::parse("host=h password=hunter2 sslpassword=x user='a b'").unwrap();
        let shown = c.redacted();
        assert!(!shown.contains("hunter2"));
        assert_eq!(shown, "host=h password=******** sslpassword=******** user='a b'");
        assert!(c.to_keyword_value().contains("hunter2"));
    }

    #[test]
    fn rendering_round_trips() {
        let c = ConnInfo::parse(r"host=h dbname='a \'b\' \\c' options='-c x=1' application_name=''").unwrap();
        let again = ConnInfo::parse(&c.to_keyword_value()).unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn defaults_do_not_override() {
        let mut c = ConnInfo::parse("host=h connect_timeout=3").unwrap();
        c.set_default("connect_timeout", "10");
        c.set_default("keepalives", "1");
        assert_eq!(c.get("connect_timeout"), Some("3"));
        assert_eq!(c.get("keepalives"), Some("1"));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn pairs() -> impl Strategy<Value = Vec<(String, String)>> {
        let key = proptest::sample::select(KNOWN_KEYWORDS.to_vec()).prop_map(str::to_string);
        let value = prop_oneof!["\\PC{0,12}", "[a ='\\\\\t\u{a0}]{0,8}"];
        // Each keyword once: a repeated one is read as libpq reads it, the last value winning.
        proptest::collection::btree_map(key, value, 1..6).prop_map(|m| m.into_iter().collect())
    }

    proptest! {
        #[test]
        fn what_it_writes_parses_back(pairs in pairs()) {
            let info = ConnInfo { pairs };
            let parsed = ConnInfo::parse(&info.to_keyword_value());
            prop_assert_eq!(parsed, Ok(info));
        }

        #[test]
        fn the_redacted_form_never_shows_a_password(secret in "[a-zA-Z0-9]{12,20}", pairs in pairs()) {
            let mut info = ConnInfo { pairs };
            info.set("password", &secret);
            prop_assert!(!info.redacted().contains(&secret));
        }

        #[test]
        fn any_text_is_parsed_or_refused_without_panic(text in "\\PC{0,40}|(postgres(ql)?://)[a-z@:/?=&%0-9.\\[\\]]{0,30}") {
            let _ = ConnInfo::parse(&text);
        }
    }
}
