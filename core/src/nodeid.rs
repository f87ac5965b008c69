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
}
