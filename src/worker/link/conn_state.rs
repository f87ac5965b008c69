//! The connection state of a link, as `trompe.status` shows it.

/// Connection state shown in `trompe.status`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Not connected (waiting to retry, or never tried).
    Disconnected = 0,
    /// Connecting or checking the peer's identity.
    Connecting = 1,
    /// Connected and replicating.
    Connected = 2,
    /// Paused by `trompe.pause_peer`.
    Paused = 3,
    /// Connected, but a transaction of the peer cannot be applied (retried with backoff).
    Error = 4,
    /// The peer marked this node lost (`trompe.max_log_size` there): it must join again.
    Lost = 5,
}

impl ConnState {
    /// The name shown in `trompe.status`.
    pub fn label(v: u32) -> &'static str {
        match v {
            1 => "connecting",
            2 => "connected",
            3 => "paused",
            4 => "error",
            5 => "lost",
            _ => "disconnected",
        }
    }
}
