//! Node identities: 16 random bytes, printed as a UUID, ordered bytewise (the tie-breaker of
//! conflict resolution, so every node orders them the same way).

use std::fmt;
use std::str::FromStr;

/// A node's identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct NodeId(pub [u8; 16]);

/// Why text is not a node id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid node id \"{0}\": expected a UUID")]
pub struct NodeIdError(pub String);

impl FromStr for NodeId {
    type Err = NodeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || NodeIdError(s.chars().take(40).collect());
        let hex: Vec<u8> = s.bytes().filter(|b| *b != b'-').collect();
        if hex.len() != 32 {
            return Err(err());
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            let pair = std::str::from_utf8(&hex[2 * i..2 * i + 2]).map_err(|_| err())?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| err())?;
        }
        Ok(NodeId(out))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The name of the replication origin through which database `database` (its oid) applies the
/// changes of peer `node` (`trompe_<node id>_<database oid>`): it records the node the applied
/// rows came from, and the database's position in that peer's log. Replication origins belong
/// to the whole cluster, so two databases pulling from one peer need one each.
pub fn origin_name(node: impl std::fmt::Display, database: u32) -> String {
    format!("{ORIGIN_PREFIX}{node}_{database}")
}

/// The name trompe 0.4.0 and earlier gave that origin (`trompe_<node id>`, shared by every
/// database of the cluster).
pub fn legacy_origin_name(node: impl std::fmt::Display) -> String {
    format!("{ORIGIN_PREFIX}{node}")
}

/// The node whose changes a replication origin named `name` applies, if it is one of trompe's
/// (named either way).
pub fn node_of_origin(name: &str) -> Option<NodeId> {
    let rest = name.strip_prefix(ORIGIN_PREFIX)?;
    let (node, database) = rest.split_at_checked(36)?;
    match database.strip_prefix('_') {
        None if database.is_empty() => {}
        Some(oid) if !oid.is_empty() && oid.bytes().all(|b| b.is_ascii_digit()) => {}
        _ => return None,
    }
    node.parse().ok()
}

const ORIGIN_PREFIX: &str = "trompe_";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_order() {
        let text = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        let id: NodeId = text.parse().unwrap();
        assert_eq!(id.to_string(), text);
        let other: NodeId = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12".parse().unwrap();
        assert!(id < other);
        assert!("xyz".parse::<NodeId>().is_err());
        assert!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1g".parse::<NodeId>().is_err());
    }

    #[test]
    fn origin_names_name_their_node() {
        let node: NodeId = "0b7c2f4e-8a1d-4c3b-9e5f-1a2b3c4d5e6f".parse().unwrap();
        assert_eq!(origin_name(node, 16384), "trompe_0b7c2f4e-8a1d-4c3b-9e5f-1a2b3c4d5e6f_16384");
        assert_eq!(node_of_origin(&origin_name(node, 16384)), Some(node));
        assert_eq!(legacy_origin_name(node), "trompe_0b7c2f4e-8a1d-4c3b-9e5f-1a2b3c4d5e6f");
        assert_eq!(node_of_origin(&legacy_origin_name(node)), Some(node));
        assert_eq!(node_of_origin("pg_16384"), None);
        assert_eq!(node_of_origin("trompe_junk"), None);
        assert_eq!(node_of_origin("trompe_0b7c2f4e-8a1d-4c3b-9e5f-1a2b3c4d5e6f_"), None);
        assert_eq!(node_of_origin("trompe_0b7c2f4e-8a1d-4c3b-9e5f-1a2b3c4d5e6f_1x"), None);
        assert_eq!(node_of_origin("trompe_0b7c2f4e-8a1d-4c3b-9e5f-1a2b3c4d5e6fx"), None);
        assert_eq!(node_of_origin("trompe_é"), None);
    }
}
