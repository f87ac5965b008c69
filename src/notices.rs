//! Warnings worth reading: each is sent once per session for what it is about (a table and a
//! cause), not again after every statement that finds the same thing.

use std::cell::RefCell;
use std::collections::HashSet;

thread_local! {
    static SENT: RefCell<HashSet<String>> = RefCell::new(HashSet::new());
}

/// Sends the warning `message()` unless one about `about` (e.g. `"no primary key 16384"`) was
/// sent in this session already.
pub fn warn_once(about: String, message: impl FnOnce() -> String) {
    if SENT.with(|s| s.borrow_mut().insert(about)) {
        pgrx::warning!("{}", message());
    }
}
