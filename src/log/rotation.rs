//! Which log table writers append to.

use pgrx::prelude::*;

use crate::error::TrompeError;
use crate::log::writer::as_extension_owner;
use crate::log::LOG_SLOTS;

/// The log table new transactions append to.
pub fn current_slot() -> Result<usize, TrompeError> {
    let slot = as_extension_owner(|| {
        Spi::get_one::<i32>("SELECT slot FROM trompe.log_rotation WHERE is_current")
    })
    .map_err(|e| TrompeError::Internal(format!("reading trompe.log_rotation: {e}")))?
    .ok_or_else(|| TrompeError::Internal("trompe.log_rotation has no current log table".into()))?;
    usize::try_from(slot)
        .ok()
        .filter(|s| *s < LOG_SLOTS)
        .ok_or_else(|| TrompeError::Internal(format!("trompe.log_rotation names log table {slot}")))
}
