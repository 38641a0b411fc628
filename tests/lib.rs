//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};

/// The repository root (tests run with the package folder as cwd).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

/// A fixture file under `tests/fixtures`.
pub fn fixture(rel: &str) -> PathBuf {
    root().join("tests/fixtures").join(rel)
}

/// The fault plugins built by this crate's build script.
pub fn test_plugin(name: &str) -> PathBuf {
    Path::new(env!("NUDGE_TEST_PLUGINS")).join(format!("{name}.wasm"))
}

/// The compiled-plugin cache shared by the tests, so each plugin is
/// compiled once per build rather than once per test.
pub fn cache_dir() -> PathBuf {
    root().join("target/nudge-test-cache")
}
