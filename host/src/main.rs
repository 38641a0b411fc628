//! The `nudge` binary: see [`nudge::cli`].

use std::process::ExitCode;

// Events allocate many small, short-lived strings and maps across threads;
// mimalloc handles that pattern markedly faster than glibc's malloc
// (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    nudge::cli::main()
}
