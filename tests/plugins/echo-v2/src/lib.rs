//! Test plugin `echo` 2.0.0: fires `pong` on every Ping.

const VERSION: &str = "2.0.0";
const EVERY: bool = true;

include!("../../echo-v1/src/echo.rs");
