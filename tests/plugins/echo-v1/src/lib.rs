//! Test plugin `echo` 1.0.0: fires `pong` on Pings with an even `n`.

const VERSION: &str = "1.0.0";
const EVERY: bool = false;

include!("echo.rs");
