//! The `nudge` command line, built inside the tests package so the crash
//! test can run it as a subprocess and kill it: the same code as the `nudge`
//! binary (which only adds its allocator).

fn main() -> std::process::ExitCode {
    nudge::cli::main()
}
