//! Fuzz target `log_entry`: see `checks::log_entry` (fuzz/checks.rs) for what it checks.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::guarded(checks::log_entry, data));
