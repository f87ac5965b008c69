//! Comparing a table on two nodes without shipping it: both sides hash their rows into the same
//! buckets (by a hash of the primary key); only buckets whose digests differ are listed row by
//! row, and the row lists tell which keys are only on one side or differ.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Rows per bucket aimed at: a differing bucket costs listing about this many keys.
pub const ROWS_PER_BUCKET: f64 = 256.0;
/// The most buckets a table is split into.
pub const MAX_BUCKETS: i32 = 16_384;

/// How many buckets to split a table of about `estimated_rows` rows into (at least one).
pub fn bucket_count(estimated_rows: f64) -> i32 {
    if !estimated_rows.is_finite() || estimated_rows <= ROWS_PER_BUCKET {
        return 1;
    }
    (estimated_rows / ROWS_PER_BUCKET).ceil().min(MAX_BUCKETS as f64) as i32
}

/// One bucket's digest: its row count and the combined hash of its rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketDigest {
    /// The bucket number.
    pub bucket: i32,
    /// Rows in the bucket.
    pub rows: i64,
    /// The combined hash of the bucket's rows.
    pub digest: String,
}

/// The buckets whose digests differ between the two sides (a bucket present on one side only
/// differs), in ascending order.
pub fn differing_buckets(here: &[BucketDigest], there: &[BucketDigest]) -> Vec<i32> {
    let index = |side: &[BucketDigest]| -> BTreeMap<i32, (i64, String)> {
        side.iter().map(|b| (b.bucket, (b.rows, b.digest.clone()))).collect()
    };
    let (here, there) = (index(here), index(there));
    let buckets: BTreeSet<i32> = here.keys().chain(there.keys()).copied().collect();
    buckets.into_iter().filter(|b| here.get(b) != there.get(b)).collect()
}

/// Which keys differ between two lists of (key, row hash).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RowDiff {
    /// Keys of rows this node has and the peer has not.
    pub only_here: Vec<String>,
    /// Keys of rows the peer has and this node has not.
    pub only_there: Vec<String>,
    /// Keys of rows both have, with different contents.
    pub different: Vec<String>,
}

impl RowDiff {
    /// True when both sides hold the same rows.
    pub fn is_empty(&self) -> bool {
        self.only_here.is_empty() && self.only_there.is_empty() && self.different.is_empty()
    }
}

/// Classifies every key of two (key, row hash) lists; each list's order does not matter, and
/// the result's lists are sorted.
pub fn diff_rows(here: Vec<(String, String)>, there: Vec<(String, String)>) -> RowDiff {
    let mut theirs: HashMap<String, String> = there.into_iter().collect();
    let mut diff = RowDiff::default();
    for (key, hash) in here {
        match theirs.remove(&key) {
            None => diff.only_here.push(key),
            Some(other) if other != hash => diff.different.push(key),
            Some(_) => {}
        }
    }
    diff.only_there = theirs.into_keys().collect();
    diff.only_here.sort();
    diff.only_there.sort();
    diff.different.sort();
    diff
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(bucket: i32, rows: i64, digest: &str) -> BucketDigest {
        BucketDigest { bucket, rows, digest: digest.into() }
    }

    fn kv(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn bucket_count_grows_with_the_table_and_is_capped() {
        assert_eq!(bucket_count(-1.0), 1);
        assert_eq!(bucket_count(0.0), 1);
        assert_eq!(bucket_count(f64::NAN), 1);
        assert_eq!(bucket_count(256.0), 1);
        assert_eq!(bucket_count(257.0), 2);
        assert_eq!(bucket_count(1_000_000.0), 3907);
        assert_eq!(bucket_count(1e12), MAX_BUCKETS);
    }

    #[test]
    fn equal_digests_differ_nowhere() {
        let side = vec![b(0, 3, "1:2"), b(5, 1, "3:4")];
        assert!(differing_buckets(&side, &side.clone()).is_empty());
    }

    #[test]
    fn a_bucket_differs_by_digest_count_or_presence() {
        let here = vec![b(0, 3, "1:2"), b(1, 2, "5:5"), b(2, 1, "7:7"), b(4, 1, "9:9")];
        let there = vec![b(0, 3, "1:2"), b(1, 2, "5:6"), b(2, 2, "7:7"), b(3, 1, "8:8")];
        assert_eq!(differing_buckets(&here, &there), vec![1, 2, 3, 4]);
    }

    #[test]
    fn rows_are_classified_by_key_and_hash() {
        let here = kv(&[("k1", "a"), ("k2", "b"), ("k3", "c")]);
        let there = kv(&[("k4", "d"), ("k2", "x"), ("k1", "a"), ("k0", "e")]);
        let diff = diff_rows(here, there);
        assert_eq!(diff.only_here, vec!["k3"]);
        assert_eq!(diff.only_there, vec!["k0", "k4"]);
        assert_eq!(diff.different, vec!["k2"]);
        assert!(!diff.is_empty());
    }

    #[test]
    fn identical_lists_in_any_order_do_not_differ() {
        let diff = diff_rows(kv(&[("a", "1"), ("b", "2")]), kv(&[("b", "2"), ("a", "1")]));
        assert!(diff.is_empty());
    }
}
