//! The background workers: a supervisor per server that starts one worker per database with
//! trompe, and that worker, which pulls every peer and applies its changes.

pub mod dbguard;
