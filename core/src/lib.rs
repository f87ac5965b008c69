//! The parts of trompe that need no PostgreSQL server: transaction snapshots and replication
//! positions, connection strings, the change-log format, backoff and conflict rules.
//!
//! Everything here is plain Rust so that `cargo test -p trompe-core` exercises it without a server.

pub mod backoff;
pub mod changeset;
pub mod committime;
pub mod compare;
pub mod conflict;
pub mod conninfo;
pub mod copytext;
pub mod ddlsettings;
pub mod dump;
pub mod ident;
pub mod inorder;
pub mod json;
pub mod large_object;
pub mod logformat;
pub mod merge;
pub mod nodeid;
pub mod pgarray;
pub mod position;
pub mod pqmessage;
pub mod seqslot;
pub mod snapshot;
pub mod sqlstate;
pub mod timestamp;
pub mod walpos;
