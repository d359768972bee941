//! Fuzz target `client_stream`: see `checks::client_stream` (fuzz/checks.rs) for what it checks.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::guarded(checks::client_stream, data));
