//! The change log: appending entries, choosing the table to append to, reading it for peers,
//! and retiring tables that every peer has confirmed.

pub mod rotation;
pub mod writer;

/// Number of log tables used in turn (`trompe.log_0` .. `trompe.log_2`).
pub const LOG_SLOTS: usize = 3;
