//! Compiles the fault plugins in `tests/plugins/` (and the examples, for
//! tests that load plugins from a folder) for wasm32-wasip2.

include!("../host/build_guests.rs");

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let faults = build_guests(
        &[
            "fault-trap",
            "fault-spin",
            "fault-membomb",
            "test-echo-v1",
            "test-echo-v2",
            "fault-channel",
            "hostile",
            "hostile-describe",
            "hostile-channel",
        ],
        &["tests/plugins"],
    );
    let dir = out.join("test-plugins");
    copy_into(&faults, &dir);
    println!("cargo:rustc-env=NUDGE_TEST_PLUGINS={}", dir.display());
}
