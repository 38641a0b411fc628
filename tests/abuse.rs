//! Careless and hostile clients against `nudge serve`: connections that
//! send nothing, stop halfway through their headers or body, or stay open
//! idle, cannot lock ingest out.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use nudge_integration_tests::*;

fn server(max_connections: usize) -> (tempfile::TempDir, Server) {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = test_config(data.path());
    cfg.server.max_connections = max_connections;
    cfg.server.header_read_timeout = nudge::config::Dur(Duration::from_millis(500));
    cfg.server.idle_timeout = nudge::config::Dur(Duration::from_secs(1));
    let s = Server::start(cfg);
    (data, s)
}

/// Waits until the server closes `s` (a read gives end of file or an
/// error); panics after `within`.
fn closed_by_server(s: &mut TcpStream, within: Duration) {
    s.set_read_timeout(Some(within)).unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            // A 408 or 400 the server sends before closing is fine.
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!("still open after {:?}", start.elapsed())
            }
            Err(_) => return,
        }
    }
}

fn event() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "userId": "c-abuse", "event": "Ping", "messageId": "m-abuse",
    }))
    .unwrap()
}

#[test]
fn idle_connections_past_the_limit_do_not_lock_ingest_out() {
    let (_data, server) = server(8);
    // Twice the limit, none sending a byte.
    let mut idle: Vec<TcpStream> = (0..16)
        .map(|_| TcpStream::connect(server.addr).unwrap())
        .collect();
    // A real client gets in once the idle ones are closed.
    let r = server.post("/v1/track", None, &[], event());
    assert_eq!(r.status, 200, "{}", r.body);
    for s in idle.iter_mut().take(8) {
        closed_by_server(s, Duration::from_secs(10));
    }
    server.stop().unwrap();
}

#[test]
fn a_client_stalled_in_its_headers_or_body_is_dropped() {
    let (_data, server) = server(64);
    let mut headers = TcpStream::connect(server.addr).unwrap();
    headers
        .write_all(b"POST /v1/track HTTP/1.1\r\nHost: nudge\r\nContent-Type: appl")
        .unwrap();
    let mut body = TcpStream::connect(server.addr).unwrap();
    body.write_all(
        b"POST /v1/track HTTP/1.1\r\nHost: nudge\r\nContent-Length: 1000\r\n\r\n{\"userId\":",
    )
    .unwrap();
    let mut keep_alive = TcpStream::connect(server.addr).unwrap();
    let req = event();
    keep_alive
        .write_all(
            format!(
                "POST /v1/track HTTP/1.1\r\nHost: nudge\r\nContent-Length: {}\r\n\r\n",
                req.len()
            )
            .as_bytes(),
        )
        .unwrap();
    keep_alive.write_all(&req).unwrap();
    for s in [&mut headers, &mut body, &mut keep_alive] {
        closed_by_server(s, Duration::from_secs(10));
    }
    // The server still serves.
    assert_eq!(server.get("/healthz", None).status, 200);
    server.stop().unwrap();
}
