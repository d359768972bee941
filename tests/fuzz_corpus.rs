//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`) and the
//! saved crash reproducers (`fuzz/regressions/<target>/`) through the same
//! checks the fuzz targets make (`fuzz/checks.rs`), without a fuzzer.

use std::path::{Path, PathBuf};

#[path = "../fuzz/checks.rs"]
mod checks;

/// Every file of the target's corpus and regressions, through its check.
fn replay(target: &str) {
    let (_, check) = checks::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .expect("a known target");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        files.extend(entries.map(|e| e.expect("readable directory").path()));
    }
    files.sort();
    assert!(!files.is_empty(), "no corpus for {target}");
    let mut failed = Vec::new();
    for path in &files {
        let data = std::fs::read(path).expect("readable corpus file");
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} inputs fail the {target} checks (reproduce with `fuzz/run --repro {target} FILE`):\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
}

#[test]
fn client_stream() {
    replay("client_stream");
}

#[test]
fn sql() {
    replay("sql");
}

#[test]
fn log_entry() {
    replay("log_entry");
}

#[test]
fn config() {
    replay("config");
}

#[test]
fn admin() {
    replay("admin");
}
