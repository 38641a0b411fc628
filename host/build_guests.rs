// Shared by the build scripts of `nudge` (example plugins, embedded in the
// binary) and `nudge-integration-tests` (fault plugins): compiles guest
// crates of this workspace for wasm32-wasip2, like wasmtime's test-programs,
// so a plain `cargo build` or `cargo test` needs no manual step.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";

fn ensure_target() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim().to_string()));
    let installed = sysroot
        .as_ref()
        .is_some_and(|s| s.join("lib/rustlib").join(TARGET).exists());
    if !installed {
        // rust-toolchain.toml asks rustup for the target, but the inner cargo
        // bypasses the rustup proxy; install it here the same way.
        let status = Command::new("rustup").args(["target", "add", TARGET]).status();
        if !matches!(status, Ok(s) if s.success()) {
            panic!("the {TARGET} target is missing and `rustup target add {TARGET}` failed");
        }
    }
}

/// Builds `crates` (package names) and returns (package, .wasm path) pairs.
fn build_guests(crates: &[&str], dirs: &[&str]) -> Vec<(String, PathBuf)> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir.parent().expect("workspace root").to_path_buf();
    for d in dirs.iter().chain(["sdk"].iter()) {
        println!("cargo:rerun-if-changed={}", workspace.join(d).display());
    }
    println!("cargo:rerun-if-changed={}", workspace.join("Cargo.lock").display());
    ensure_target();
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("wasm-guests");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&workspace)
        .args(["build", "--release", "--target", TARGET, "--target-dir"])
        .arg(&target_dir);
    for c in crates {
        cmd.args(["-p", c]);
    }
    // The outer build's settings are not the guests': drop them, keep the
    // jobserver so the two builds share the machine's cores.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if (k.starts_with("CARGO_") && k != "CARGO_HOME" && k != "CARGO_MAKEFLAGS")
            || k.starts_with("RUSTC")
            || k == "RUSTFLAGS"
            || k == "RUSTDOCFLAGS"
        {
            cmd.env_remove(&k);
        }
    }
    cmd.env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "true");
    let status = cmd.status().expect("running cargo for the wasm guests");
    assert!(status.success(), "building the wasm guests {crates:?} failed");
    crates
        .iter()
        .map(|c| {
            let file = target_dir
                .join(TARGET)
                .join("release")
                .join(format!("{}.wasm", c.replace('-', "_")));
            assert!(file.exists(), "{} was not built", file.display());
            (c.to_string(), file)
        })
        .collect()
}

/// Copies the built guests into `dir` as `<package>.wasm`.
fn copy_into(guests: &[(String, PathBuf)], dir: &Path) -> Vec<(String, PathBuf)> {
    std::fs::create_dir_all(dir).expect("creating the guests folder");
    guests
        .iter()
        .map(|(name, file)| {
            let to = dir.join(format!("{name}.wasm"));
            std::fs::copy(file, &to).expect("copying a guest");
            (name.clone(), to)
        })
        .collect()
}
