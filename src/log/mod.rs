//! The change log: appending entries (`writer`), serving them to the peers that pull them
//! (`serve`, in steps that end at `marks` when a consumer is far behind), choosing the table to append to and retiring tables that every peer has confirmed
//! (`rotation`).

pub mod marks;
pub mod rotation;
pub mod serve;
pub mod writer;

/// Number of log tables used in turn (`trompe.log_0` .. `trompe.log_2`).
pub const LOG_SLOTS: usize = 3;
