//! The host's log: `tracing` to stderr, as text or JSON Lines.
//!
//! Every control character that reaches the writer inside a line is
//! escaped (`\n` becomes the two characters `\n`), so no logged field, be
//! it a plugin's message, a customer id or an event name, can start a line
//! of its own and forge an entry. A record is formatted whole and written
//! in one call, so the only newline left as it is is the one ending it.

use std::io::{IsTerminal, Write};

use tracing_subscriber::fmt::MakeWriter;

/// Installs the global subscriber: `filter` in `RUST_LOG` syntax (an
/// invalid one falls back to `warn`); JSON Lines if `json`, else text.
pub fn init(filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Colours only on a terminal; then their escape sequences are the
    // formatter's own (it escapes those in field values itself).
    let colour = std::io::stderr().is_terminal() && !json;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(Stderr { keep_esc: colour });
    if json {
        builder.json().init()
    } else {
        builder.init()
    }
}

/// Makes [`Escaping`] writers to stderr.
#[derive(Clone, Copy)]
struct Stderr {
    keep_esc: bool,
}

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Escaping<std::io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        Escaping {
            inner: std::io::stderr(),
            keep_esc: self.keep_esc,
        }
    }
}

/// A writer that escapes control characters inside each record.
pub struct Escaping<W> {
    inner: W,
    /// Leave ESC alone (the formatter's colours).
    keep_esc: bool,
}

impl<W: Write> Escaping<W> {
    pub fn new(inner: W) -> Self {
        Escaping {
            inner,
            keep_esc: false,
        }
    }
}

fn needs_escape(b: u8, keep_esc: bool) -> bool {
    (b < 0x20 && b != b'\t' && !(keep_esc && b == 0x1b)) || b == 0x7f
}

/// `buf` with every control character but a final newline escaped.
pub fn escape_record(buf: &[u8], keep_esc: bool) -> std::borrow::Cow<'_, [u8]> {
    let (body, end) = match buf.strip_suffix(b"\n") {
        Some(body) => (body, &b"\n"[..]),
        None => (buf, &b""[..]),
    };
    if !body.iter().any(|&b| needs_escape(b, keep_esc)) {
        return std::borrow::Cow::Borrowed(buf);
    }
    let mut out = Vec::with_capacity(buf.len() + 16);
    for &b in body {
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b if needs_escape(b, keep_esc) => {
                out.extend_from_slice(format!("\\x{b:02x}").as_bytes())
            }
            b => out.push(b),
        }
    }
    out.extend_from_slice(end);
    std::borrow::Cow::Owned(out)
}

impl<W: Write> Write for Escaping<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write_all(&escape_record(buf, self.keep_esc))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newline_inside_a_record_cannot_start_a_line() {
        let rec = b"WARN nudge: plugin said ok\n2026-01-01 ERROR forged\r\x1b[2J\n";
        let out = escape_record(rec, false);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "WARN nudge: plugin said ok\\n2026-01-01 ERROR forged\\r\\x1b[2J\n"
        );
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
    }

    #[test]
    fn plain_records_and_colours_pass_unchanged() {
        let rec = b"\x1b[33mWARN\x1b[0m nudge: tab\tok\n";
        assert!(matches!(
            escape_record(rec, true),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(
            &*escape_record(rec, false),
            &b"\\x1b[33mWARN\\x1b[0m nudge: tab\tok\n"[..]
        );
    }
}
