//! How a reference to a large object travels between nodes. Each node gives a large object its
//! own oid, so a replicated `oid`/`lo` column does not carry the oid: it carries the object's
//! global id, the node that created it and the oid it has there, as `lo:<node uuid>:<oid>`.
//! Every node maps global ids to its own copies. Plain oids (no large object behind them) are
//! sent as they are: an oid's text is only digits, so the two cannot be confused.

/// A large object's identity across nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalLo {
    /// The node that created it (a UUID, as text).
    pub origin: String,
    /// Its oid on that node.
    pub oid: u32,
}

/// Why a large-object reference could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed large object reference {0:?}")]
pub struct BadReference(pub String);

const PREFIX: &str = "lo:";

impl GlobalLo {
    /// The text sent in place of the column's oid.
    pub fn reference(&self) -> String {
        format!("{PREFIX}{}:{}", self.origin, self.oid)
    }

    /// Reads a column value: `None` if it is a plain value (not a reference), an error if it is
    /// a malformed reference.
    pub fn parse(text: &str) -> Option<Result<GlobalLo, BadReference>> {
        let rest = text.strip_prefix(PREFIX)?;
        let bad = || BadReference(text.chars().take(80).collect());
        let parsed = rest.split_once(':').and_then(|(origin, oid)| {
            let uuid_like = origin.len() == 36 && origin.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
            let oid = oid.parse::<u32>().ok().filter(|o| *o != 0)?;
            uuid_like.then(|| GlobalLo { origin: origin.to_ascii_lowercase(), oid })
        });
        Some(parsed.ok_or_else(bad))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: &str = "0b0a6c6e-3f4e-4a4b-9a7e-6a1c2d3e4f50";

    #[test]
    fn a_reference_round_trips() {
        let lo = GlobalLo { origin: NODE.into(), oid: 16_385 };
        assert_eq!(lo.reference(), format!("lo:{NODE}:16385"));
        assert_eq!(GlobalLo::parse(&lo.reference()), Some(Ok(lo)));
    }

    #[test]
    fn plain_oids_are_not_references() {
        assert_eq!(GlobalLo::parse("16385"), None);
        assert_eq!(GlobalLo::parse(""), None);
    }

    #[test]
    fn malformed_references_are_refused() {
        for bad in [
            "lo:",
            "lo:x:1",
            &format!("lo:{NODE}"),
            &format!("lo:{NODE}:0"),
            &format!("lo:{NODE}:-1"),
            &format!("lo:{NODE}:4294967296"),
            "lo:0b0a6c6e-3f4e-4a4b-9a7e-6a1c2d3e4f5z:1",
        ] {
            assert!(matches!(GlobalLo::parse(bad), Some(Err(_))), "{bad}");
        }
    }
}
