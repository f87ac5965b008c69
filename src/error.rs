//! trompe's errors: one enum, each variant with the SQLSTATE a client sees.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

/// Every error trompe raises on purpose. Messages name the object at fault; none contains a
/// password.
#[derive(Debug, thiserror::Error)]
pub enum TrompeError {
    /// The library is not in `shared_preload_libraries`, so there is no shared memory or worker.
    #[error("trompe is not loaded through shared_preload_libraries")]
    NotPreloaded,
    /// A table to replicate has no primary key.
    #[error("table {0} has no primary key")]
    NoPrimaryKey(String),
    /// The DDL would remove the primary key of a replicated table.
    #[error("cannot remove the primary key of replicated table {0}")]
    DropPrimaryKey(String),
    /// Temporary or unlogged tables cannot be replicated.
    #[error("table {table} is {kind}; only permanent tables can be replicated")]
    NotPermanent {
        /// The table.
        table: String,
        /// "temporary" or "unlogged".
        kind: &'static str,
    },
    /// An identity column GENERATED ALWAYS outside the primary key cannot be replicated.
    #[error("column \"{column}\" of table {table} is an identity column GENERATED ALWAYS outside the primary key")]
    AlwaysIdentityOutsideKey {
        /// The table.
        table: String,
        /// The column.
        column: String,
    },
    /// The DDL would disable or remove trompe's capture triggers on a replicated table.
    #[error("cannot disable or remove the capture triggers of replicated table {0}")]
    CaptureDisabled(String),
    /// The DDL would make a replicated table unlogged.
    #[error("cannot make replicated table {0} unlogged")]
    MadeUnlogged(String),
    /// Only ordinary tables can be replicated.
    #[error("{name} is {kind}, not an ordinary table")]
    NotATable {
        /// The relation.
        name: String,
        /// What it is instead.
        kind: &'static str,
    },
    /// A schema given by name does not exist.
    #[error("schema {} does not exist", quoted_as_written(.0))]
    NoSuchSchema(String),
    /// trompe's own schema or a system schema cannot be replicated.
    #[error("schema \"{0}\" cannot be replicated")]
    ReservedSchema(String),
    /// A request from a peer that does not make sense.
    #[error("invalid request: {0}")]
    BadRequest(String),
    /// A node pulls without being registered as a consumer here.
    #[error("node {0} is not registered as a consumer of this node")]
    NotAConsumer(String),
    /// A login acts for a node it is not registered for.
    #[error("permission denied for node {node}: login \"{login}\" is not registered for it")]
    NotNodesLogin {
        /// The login (session user).
        login: String,
        /// The node it tried to act for.
        node: String,
    },
    /// The peer does not let this connection string's login act for this node.
    #[error("peer \"{name}\" does not accept this login for this node: {message}")]
    PeerDeniesNode {
        /// The peer.
        name: String,
        /// The peer's error.
        message: String,
    },
    /// A login serves no node that pulls from this one.
    #[error("permission denied: login \"{0}\" is not registered for any node pulling from this one")]
    NotAPeerLogin(String),
    /// A position a consumer asks to resume from, whose changes this node no longer keeps.
    #[error("this node no longer keeps its log from position {0}")]
    LogNotKept(String),
    /// The peer no longer keeps its log from where this node stopped pulling it.
    #[error("peer \"{0}\" no longer keeps its log from where this node stopped pulling it")]
    ResumeImpossible(String),
    /// A connection string that reaches another node than the peer's.
    #[error("peer \"{name}\" is node {expected}, but the new connection string reaches node {found}")]
    OtherNode {
        /// The peer.
        name: String,
        /// Its node id.
        expected: String,
        /// The node the connection string reaches.
        found: String,
    },
    /// A role named as a consumer's login does not exist.
    #[error("role \"{0}\" does not exist")]
    NoSuchRole(String),
    /// A consumer fell behind past `trompe.max_log_size`: the log kept for it was given up.
    #[error("node {node} was marked lost by this node: {reason}")]
    ConsumerLost { node: String, reason: String },
    /// A consumer's position went back past what it had confirmed.
    #[error("node {0} asks for changes older than it had confirmed; the log may have been pruned")]
    PositionRegressed(String),
    /// A peer name that is not acceptable.
    #[error("invalid peer name \"{0}\": use 1 to 63 characters")]
    BadPeerName(String),
    /// The connection string does not parse.
    #[error("{0}")]
    BadConninfo(String),
    /// A peer name is already in use.
    #[error("peer \"{0}\" already exists")]
    PeerExists(String),
    /// The node is already a peer under another name.
    #[error("node {node} is already peer \"{existing}\"")]
    NodeAlreadyPeer {
        /// Its node id.
        node: String,
        /// The name it is known by.
        existing: String,
    },
    /// No peer by that name.
    #[error("peer \"{0}\" does not exist")]
    NoSuchPeer(String),
    /// The peer cannot be reached.
    #[error("could not connect to peer \"{name}\": {message}")]
    PeerUnreachable {
        /// The peer.
        name: String,
        /// libpq's message (never contains the password).
        message: String,
    },
    /// The peer refused the login.
    #[error("peer \"{name}\" refused the login: {message}")]
    PeerLoginRefused {
        /// The peer.
        name: String,
        /// libpq's message (never contains the password).
        message: String,
    },
    /// The peer's database has no trompe.
    #[error("peer \"{0}\" does not have the trompe extension installed")]
    PeerWithoutTrompe(String),
    /// The peer is this very node.
    #[error("peer \"{0}\" is this node itself")]
    PeerIsSelf(String),
    /// A query on the peer failed.
    #[error("peer \"{name}\" failed: {message}")]
    PeerFailed {
        /// The peer.
        name: String,
        /// The error it returned.
        message: String,
    },
    /// A setting needed for replication is off.
    #[error("{0}")]
    SettingRequired(String),
    /// A row version replaced by this transaction was committed too far in this node's future.
    #[error("this transaction replaces a row version committed {ahead_ms} ms in this node's future")]
    ClockSkew {
        /// How far ahead.
        ahead_ms: i64,
    },
    /// A conflict rule that is not offered.
    #[error("{0}")]
    BadRule(String),
    /// A sequence slot that does not make sense.
    #[error("{0}")]
    BadSequenceSlot(String),
    /// A sequence has no value left in this node's slot.
    #[error("sequence {0} has no values left in this node's slot")]
    SequenceExhausted(String),
    /// The table is not replicated.
    #[error("table {0} is not replicated by trompe")]
    NotReplicated(String),
    /// Something in trompe's own state is not as it must be.
    /// `add_peer(..., sync => true)` on a node that is not new and empty.
    #[error("add_peer with sync => true needs a new, empty node: {0}")]
    SyncNeedsEmptyNode(String),
    /// A peer added while this node is still copying from another.
    #[error("this node is still copying its data from peer \"{0}\"")]
    SyncInProgress(String),
    /// The node a joining node must start pulling from no longer keeps its log for it.
    #[error("peer \"{0}\" no longer keeps its log for this node, which copied its data from another node")]
    StartPositionLost(String),
    /// `trompe.skip` for a peer whose stream is not stopped by a failing transaction.
    #[error("peer \"{0}\" has no transaction that fails to apply")]
    NothingToSkip(String),
    /// `trompe.skip` naming another transaction than the one that fails.
    #[error("transaction {txn} of peer \"{peer}\" is not the one that fails to apply ({failing})")]
    NotTheFailingTransaction {
        /// The peer.
        peer: String,
        /// The transaction named.
        txn: i64,
        /// The transaction that fails.
        failing: i64,
    },
    /// DDL on a replicated table that would leave the nodes with different data.
    #[error("{what} on replicated table {table} would give each node different values: {reason}")]
    DivergentDdl {
        /// What the statement does.
        what: String,
        /// The table.
        table: String,
        /// Why the values would differ.
        reason: String,
        /// What to do instead.
        hint: &'static str,
    },
    /// DDL that cannot be replayed on the peers.
    #[error("{0} cannot be replicated")]
    UnreplicableDdl(String, &'static str),
    /// DDL on replicated objects that peers would refuse to run (src/peer_ddl.rs).
    #[error("{0}: peers would refuse to run it")]
    PeersRefuseDdl(String),
    /// A change too large for the change log (PostgreSQL holds at most 1 GB in one value).
    #[error(
        "a change to {table} takes {mb} MB in the change log, more than the {max_mb} MB a change may take \
         (a log entry is one value, and PostgreSQL holds at most 1 GB in one value)"
    )]
    ChangeTooLarge {
        /// The table (or object of DDL).
        table: String,
        /// Its size once encoded, in MB.
        mb: u64,
        /// The most a change may take, in MB.
        max_mb: u64,
    },
    /// This database is a copy of another that is the node.
    #[error("this database is a copy of database \"{0}\" and has its node identity; it does not act as that node")]
    CopyOfNode(String),
    #[error("trompe internal error: {0}")]
    Internal(String),
}

impl TrompeError {
    /// The SQLSTATE of this error.
    pub fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            TrompeError::NotPreloaded => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            TrompeError::ChangeTooLarge { .. } => ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            TrompeError::NoPrimaryKey(_) | TrompeError::DropPrimaryKey(_) => ERRCODE_INVALID_TABLE_DEFINITION,
            TrompeError::NotPermanent { .. } | TrompeError::MadeUnlogged(_) => ERRCODE_FEATURE_NOT_SUPPORTED,
            TrompeError::CaptureDisabled(_) => ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
            TrompeError::AlwaysIdentityOutsideKey { .. } => ERRCODE_FEATURE_NOT_SUPPORTED,
            TrompeError::NotATable { .. } => ERRCODE_WRONG_OBJECT_TYPE,
            TrompeError::NoSuchSchema(_) => ERRCODE_INVALID_SCHEMA_NAME,
            TrompeError::ReservedSchema(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            TrompeError::BadRequest(_) => ERRCODE_PROTOCOL_VIOLATION,
            TrompeError::ConsumerLost { .. } => ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            TrompeError::NotAConsumer(_) | TrompeError::PositionRegressed(_) => {
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
            TrompeError::NotNodesLogin { .. } | TrompeError::NotAPeerLogin(_) | TrompeError::PeerDeniesNode { .. } => {
                ERRCODE_INSUFFICIENT_PRIVILEGE
            }
            TrompeError::LogNotKept(_) | TrompeError::ResumeImpossible(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            TrompeError::OtherNode { .. } => ERRCODE_INVALID_PARAMETER_VALUE,
            TrompeError::NoSuchRole(_) => ERRCODE_UNDEFINED_OBJECT,
            TrompeError::BadPeerName(_) | TrompeError::BadConninfo(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            TrompeError::PeerExists(_) | TrompeError::NodeAlreadyPeer { .. } => ERRCODE_DUPLICATE_OBJECT,
            TrompeError::NoSuchPeer(_) => ERRCODE_UNDEFINED_OBJECT,
            TrompeError::PeerUnreachable { .. } => ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
            TrompeError::PeerLoginRefused { .. } => ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION,
            TrompeError::PeerWithoutTrompe(_) => ERRCODE_UNDEFINED_OBJECT,
            TrompeError::PeerIsSelf(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            TrompeError::PeerFailed { .. } => ERRCODE_CONNECTION_FAILURE,
            TrompeError::SettingRequired(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            TrompeError::ClockSkew { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            TrompeError::BadRule(_) | TrompeError::BadSequenceSlot(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            TrompeError::SequenceExhausted(_) => ERRCODE_SEQUENCE_GENERATOR_LIMIT_EXCEEDED,
            TrompeError::NotReplicated(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            TrompeError::SyncNeedsEmptyNode(_) | TrompeError::SyncInProgress(_) | TrompeError::StartPositionLost(_) => {
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
            TrompeError::NothingToSkip(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            TrompeError::NotTheFailingTransaction { .. } => ERRCODE_INVALID_PARAMETER_VALUE,
            TrompeError::DivergentDdl { .. } | TrompeError::UnreplicableDdl(..) => ERRCODE_FEATURE_NOT_SUPPORTED,
            TrompeError::PeersRefuseDdl(_) => ERRCODE_FEATURE_NOT_SUPPORTED,
            TrompeError::CopyOfNode(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            TrompeError::Internal(_) => ERRCODE_INTERNAL_ERROR,
        }
    }

    /// A hint for the user, where there is a useful one.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            TrompeError::NotPreloaded => {
                Some("Add trompe to shared_preload_libraries in postgresql.conf and restart the server.")
            }
            TrompeError::NoPrimaryKey(_) => Some("Add a primary key to the table, then replicate it."),
            TrompeError::DropPrimaryKey(_) | TrompeError::CaptureDisabled(_) => {
                Some("Stop replicating the table with trompe.remove_table() first, or keep a primary key on it.")
            }
            TrompeError::PeerWithoutTrompe(_) => Some("Run CREATE EXTENSION trompe in the peer's database first."),
            TrompeError::CopyOfNode(_) => Some(COPY_HINT),
            TrompeError::AlwaysIdentityOutsideKey { .. } => {
                Some("Use GENERATED BY DEFAULT AS IDENTITY for it: a peer must be able to set the origin's value.")
            }
            TrompeError::PositionRegressed(_) => {
                Some("Remove the peer on the node that lags and add it again with sync => true.")
            }
            TrompeError::ConsumerLost { .. } => Some(
                "The changes it had not applied are no longer kept: on that node, remove this peer and add it again \
                 with sync => true (its data is copied anew).",
            ),
            TrompeError::NotAConsumer(_) => Some(
                "That node no longer keeps its log for this one (it was removed there, or dropped by an administrator): \
                 remove the peer here and add it again, which resumes if its log still goes back far enough.",
            ),
            TrompeError::NotNodesLogin { .. } => Some(
                "A node's registration belongs to the login it registered with; an administrator of this node can \
                 change it with trompe.set_consumer_logins().",
            ),
            TrompeError::PeerDeniesNode { .. } => Some(
                "An administrator of the peer lets the login act for this node with trompe.set_consumer_logins() there \
                 (list the old login too while the node switches).",
            ),
            TrompeError::NotAPeerLogin(_) => Some(
                "Only the logins nodes pull this node with may call this; an administrator can register one with \
                 trompe.set_consumer_logins().",
            ),
            TrompeError::ResumeImpossible(_) => Some(
                "Changes made there since would be lost: join again with add_peer(..., sync => true) on a new, empty node.",
            ),
            TrompeError::SyncNeedsEmptyNode(_) => Some(
                "Join with a database that has only the trompe extension in it; add peers without sync => true otherwise.",
            ),
            TrompeError::SyncInProgress(_) => {
                Some("Wait until trompe.status shows sync_state 'done' for that peer, then add this one.")
            }
            TrompeError::StartPositionLost(_) => Some(
                "Remove every peer on this node, drop and create the extension in an empty database, and join again.",
            ),
            TrompeError::NotReplicated(_) => Some("Replicate it first with trompe.add_table() or trompe.add_schema()."),
            TrompeError::BadRule(_) => {
                Some("See \"Conflicts\" in trompe's README for why only convergent rules are offered.")
            }
            TrompeError::NothingToSkip(_) => {
                Some("trompe.status shows state 'error' and the transaction in last_error while a stream is stopped.")
            }
            TrompeError::DivergentDdl { hint, .. } | TrompeError::UnreplicableDdl(_, hint) => Some(hint),
            TrompeError::PeersRefuseDdl(_) => Some(
                "Peers run only the DDL listed under \"DDL from peers\" in trompe's README; keep other objects out of \
                 replicated schemas.",
            ),
            _ => None,
        }
    }

    /// Raises this error as a PostgreSQL ERROR; never returns.
    pub fn raise(self) -> ! {
        let mut report = ErrorReport::new(self.sqlstate(), self.to_string(), "trompe");
        if let Some(h) = self.hint() {
            report = report.set_hint(h);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("ereport(ERROR) returned")
    }
}

/// Unwraps a result, raising the error as a PostgreSQL ERROR.
pub trait OrRaise<T> {
    /// The value, or the error raised.
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for Result<T, TrompeError> {
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => e.raise(),
        }
    }
}

/// A name as the user wrote it, in double quotes unless it already is (a quoted identifier).
fn quoted_as_written(name: &str) -> String {
    if name.len() >= 2 && name.starts_with('"') && name.ends_with('"') {
        name.to_string()
    } else {
        format!("\"{name}\"")
    }
}

/// What to do in a copy of a node's database (see [`TrompeError::CopyOfNode`]).
pub const COPY_HINT: &str = "Give this database an identity of its own: DROP EXTENSION trompe CASCADE; CREATE EXTENSION trompe; then add its tables and peers again (or drop the original database).";
